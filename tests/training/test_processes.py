"""The trainer as a process: cancel stops it, torchrun runs two ranks, failures map to errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("trl", reason="needs the training extra: uv sync --extra training")

from executors.base import PermanentError
from executors.trl.runner import TrainingStopped
from tests.conftest import TRAINING_TIMEOUT
from tests.training.conftest import DPO_ITEMS, FAST, SFT_ITEMS, MakeRun, Run

pytestmark = TRAINING_TIMEOUT


def _trainers() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "executors.trl" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def test_cancel_stops_the_trainer(make_run: MakeRun) -> None:
    def cancel_on_first_step(run: Run, fields: dict[str, Any]) -> None:
        if fields.get("step", 0) >= 1:
            run.ctx.cancelled.set()

    run = make_run(
        "lora_sft", {**FAST, "max_steps": 100_000}, SFT_ITEMS, on_report=cancel_on_first_step
    )
    with pytest.raises(TrainingStopped):
        run.executor.run(run.ctx)
    # No trainer (or torchrun rank) is left; the suite's own Redis server may be a child.
    assert _trainers() == []
    # Checkpoint uploads still queued are dropped, not waited for.
    assert (run.checkpoints.discarded, run.checkpoints.flushed) == (1, 0)
    assert not (run.ctx.artifacts_dir / "final_lora").exists()


def test_torchrun_with_two_cpu_processes(make_run: MakeRun) -> None:
    run = make_run("lora_sft", {**FAST, "max_steps": 2, "nproc_per_node": 2}, SFT_ITEMS)
    result = run.executor.run(run.ctx)
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert (run.ctx.artifacts_dir / "final_lora" / "adapter_model.safetensors").is_file()


def test_a_bad_row_in_a_data_file_is_a_permanent_error(make_run: MakeRun, tmp_path: Path) -> None:
    rows = [DPO_ITEMS[0], {"prompt": "p", "chosen": "c"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = make_run("dpo", {**FAST, "max_steps": 1}, data={"type": "jsonl", "path": str(path)})
    with pytest.raises(PermanentError, match=r"spec\.data row 1: missing 'rejected'"):
        run.executor.run(run.ctx)
