"""vLLM on GPUs, through a real fleet: a task given two GPUs runs with tensor parallelism
across them, and an engine that cannot fit is recorded as `cuda_oom`. Skipped, with the
reason, without vLLM's CUDA build or without enough NVIDIA GPUs (CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Orchestrator
from tests.e2e.test_gpu import nvml_gpus

pytestmark = pytest.mark.gpu


def cuda_vllm(count: int) -> None:
    pytest.importorskip("vllm", reason="needs vLLM's CUDA build: uv sync --extra vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs vLLM's CUDA build and a GPU: torch sees no CUDA device here")
    if len(nvml_gpus()) < count:
        pytest.skip(f"needs {count} NVIDIA GPU(s): NVML sees {len(nvml_gpus())}")


def tiny_model(tmp_path: Path) -> Path:
    from flowmesh.tiny_models import build_tiny_llama

    # Positions enough for the oversized engine below to be refused for memory, not length.
    return build_tiny_llama(tmp_path / "tiny", head_dim=64, max_positions=262_144)


def spec(model: Path, gpus: int, **vllm: object) -> dict:
    return {
        "spec": {
            "taskType": "inference",
            "model": {"source": {"identifier": str(model)}, "engine": "vllm", "vllm": vllm},
            "resources": {"hardware": {"gpu": {"count": gpus}}},
            "data": {"items": ["the quick brown fox", "hello world"]},
            "inference": {"max_tokens": 8, "temperature": 0},
            "maxAttempts": 1,
        }
    }


@pytest.mark.timeout(600)
def test_a_task_given_two_gpus_runs_tensor_parallel(
    orchestrator: Orchestrator, start_worker, tmp_path: Path
):
    cuda_vllm(2)
    gpu_model = tiny_model(tmp_path)
    start_worker("gpu", WORKER_EXECUTORS="vllm", HEARTBEAT_INTERVAL_SEC="2")
    (task_id,) = orchestrator.submit(spec(gpu_model, 2, enforce_eager=True, max_model_len=256))
    task = orchestrator.wait(task_id, timeout=540)
    assert task["status"] == "DONE", task["error"]
    assert task["result"]["device"].startswith("cuda")
    assert [r["completion_tokens"] > 0 for r in task["result"]["responses"]] == [True, True]


@pytest.mark.timeout(600)
def test_an_engine_that_does_not_fit_is_recorded_as_cuda_oom(
    orchestrator: Orchestrator, start_worker, tmp_path: Path
):
    cuda_vllm(1)
    gpu_model = tiny_model(tmp_path)
    start_worker("gpu", WORKER_EXECUTORS="vllm", HEARTBEAT_INTERVAL_SEC="2")
    # A KV cache of 0.1 % of the GPU cannot hold one sequence of 200k tokens.
    oversized = spec(gpu_model, 1, gpu_memory_utilization=0.001, max_model_len=200_000)
    (task_id,) = orchestrator.submit(oversized)
    task = orchestrator.wait(task_id, timeout=540)
    assert task["status"] == "FAILED"
    assert task["error"]["kind"] == "cuda_oom", task["error"]
