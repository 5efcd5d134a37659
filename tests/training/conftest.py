"""Fixtures for the training executors: one tiny Llama per session, and a factory of
task contexts whose progress, checkpoints and logs the tests read back.

The trainers run for real, in their own processes; a run costs ~15 s on two cores,
mostly imports, so tests share runs where they can.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from executors.base import Checkpoints, Executor, TaskContext
from executors.registry import load
from flowmesh.spec import TaskSpec

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world please write a short answer",
    "one two three four five six seven eight",
    "red blue green cat dog bird fish tree",
]
SFT_ITEMS: list[Any] = [{"text": t} for t in TEXTS]
DPO_ITEMS = [
    {"prompt": "hello", "chosen": " world thanks", "rejected": " cat dog bird"},
    {"prompt": "the quick", "chosen": " brown fox", "rejected": " red tree"},
]
PROMPTS: list[Any] = ["hello", {"prompt": "the quick"}, "one two", {"prompt": "tell me"}]
# Small and fast: every test run bounds its steps with max_steps.
FAST = {"batch_size": 2, "max_seq_length": 32, "logging_steps": 1}


class Recorded(Checkpoints):
    """Keeps what `saved` got; `latest` returns a checkpoint given up front (a resume)."""

    def __init__(self, latest: Path | None = None) -> None:
        self._latest = latest
        self.saved_paths: list[Path] = []
        self.complete: list[bool] = []
        self.flushed = 0
        self.discarded = 0

    def latest(self) -> Path | None:
        return self._latest

    def saved(self, path: Path) -> None:
        self.saved_paths.append(path)
        self.complete.append((path / "trainer_state.json").is_file())

    def flush(self) -> None:
        self.flushed += 1

    def discard(self) -> None:
        self.discarded += 1


@dataclass
class Run:
    executor: Executor
    ctx: TaskContext
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checkpoints(self) -> Recorded:
        assert isinstance(self.ctx.checkpoints, Recorded)
        return self.ctx.checkpoints

    def trainer_log(self) -> str:
        return (self.ctx.work_dir / "logs" / "trainer.log").read_text(errors="replace")


MakeRun = Callable[..., Run]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowmesh.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", chat_template=True)


def spec_for(
    task_type: str,
    model: str | None,
    training: dict[str, Any],
    items: list[Any] | None = None,
    data: dict[str, Any] | None = None,
    checkpoint: str | None = None,
) -> TaskSpec:
    body: dict[str, Any] = {"taskType": task_type, "training": training}
    if model is not None:
        body["model"] = {"source": {"identifier": model}}
    body["data"] = data if data is not None else {"type": "list", "items": items or []}
    if checkpoint is not None:
        body["checkpoint"] = {"load": {"identifier": checkpoint}}
    return TaskSpec.model_validate({"apiVersion": "flowmesh/v1", "spec": body})


@pytest.fixture
def make_run(tiny_llama: Path, tmp_path: Path) -> MakeRun:
    counter = iter(range(1000))

    def make(
        task_type: str,
        training: dict[str, Any],
        items: list[Any] | None = None,
        *,
        data: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        latest: Path | None = None,
        on_report: Callable[[Run, dict[str, Any]], None] | None = None,
        work_dir: Path | None = None,
    ) -> Run:
        cls = load(task_type)
        spec = spec_for(task_type, str(tiny_llama), training, items, data, checkpoint)
        run = Run(
            executor=cls(),
            ctx=TaskContext(
                task_id=f"t{next(counter)}",
                attempt=1,
                spec=spec,
                work_dir=work_dir or tmp_path / f"{task_type}-{next(counter)}",
                options=cls.parse_options(spec.spec),
                cancelled=threading.Event(),
                checkpoints=Recorded(latest),
            ),
        )

        def report(fields: dict[str, Any]) -> None:
            run.reports.append(fields)
            if on_report is not None:
                on_report(run, fields)

        run.ctx.report = report
        return run

    return make


@pytest.fixture(scope="session")
def lora_run(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Run, dict[str, Any]]:
    """One lora_sft run with checkpoints every 2 steps, shared by the tests that read it."""
    cls = load("lora_sft")
    training = {**FAST, "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}
    spec = spec_for("lora_sft", str(tiny_llama), training, SFT_ITEMS)
    run = Run(
        executor=cls(),
        ctx=TaskContext(
            task_id="lora",
            attempt=1,
            spec=spec,
            work_dir=tmp_path_factory.mktemp("lora_sft"),
            options=cls.parse_options(spec.spec),
            checkpoints=Recorded(),
        ),
    )
    run.ctx.report = run.reports.append
    return run, run.executor.run(run.ctx)
