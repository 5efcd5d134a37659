"""Training on NVIDIA GPUs (marked gpu): bf16 on one GPU, torchrun across two, and
`allow_multi_gpu: false` keeping a task with two GPUs to one process. They skip, saying
why, without CUDA torch and a GPU; CI has none."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("trl", reason="needs the training extra: uv sync --extra training")

from executors.base import ExecutorConfig
from tests.training.conftest import FAST, SFT_ITEMS, MakeRun, Run

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def needs(count: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        _gpus() < count, reason=f"needs {count} NVIDIA GPU(s) visible to CUDA torch"
    )


def _on(run_devices: tuple[int, ...], make_run: MakeRun, **training: Any) -> tuple[Run, Any]:
    run = make_run("lora_sft", {**FAST, "max_steps": 4, **training}, SFT_ITEMS)
    run.executor.setup(ExecutorConfig("gpu-test", devices=run_devices))
    run.ctx.devices = run_devices
    return run, run.executor.run(run.ctx)


@needs(1)
def test_lora_sft_on_one_gpu_in_bf16(make_run: MakeRun) -> None:
    run, result = _on((0,), make_run)
    assert result["world_size"] == 1 and result["global_step"] == 4
    assert "precision bf16" in run.trainer_log()
    assert (run.ctx.artifacts_dir / "final_lora" / "adapter_model.safetensors").is_file()


@needs(2)
def test_torchrun_across_two_gpus(make_run: MakeRun) -> None:
    _, result = _on((0, 1), make_run)
    assert result["world_size"] == 2


@needs(2)
def test_allow_multi_gpu_false_keeps_one_process(make_run: MakeRun) -> None:
    _, result = _on((0, 1), make_run, allow_multi_gpu=False)
    assert result["world_size"] == 1
