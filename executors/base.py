"""The executor interface: what a third party implements to add a kind of work.

An executor lives in a worker's supervised child process, one instance per
child, so whatever it loads in `setup` or caches in `run` (models, tokenizers)
stays warm between tasks. `run` may be called from several threads at once, up
to `max_concurrency`; an executor that cannot share its state guards it itself.

A minimal plugin:

    class Shout(Executor):
        name = "shout"
        def run(self, task):
            return {"text": str(task.spec.echo.message).upper()}

registered in its package's pyproject under `[project.entry-points."flowmesh.executors"]`.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from flowmesh.spec import TaskBody, TaskSpec


class ExecutorError(Exception):
    """A task failed inside its executor. `kind` is recorded with the failure."""

    kind: ClassVar[str] = "executor_error"
    retryable: ClassVar[bool] = True


class RetryableError(ExecutorError):
    """Worth another attempt (a transient resource or network problem)."""


class PermanentError(ExecutorError):
    """Can never succeed as specified (a model path that does not exist, bad data)."""

    kind = "permanent"
    retryable = False


class MissingExtra(ExecutorError):
    """The executor's optional dependencies are not installed; names the extra to install."""

    kind = "missing_extra"
    retryable = False

    def __init__(self, executor: str, modules: list[str], extra: str | None):
        hint = f"uv sync --extra {extra}" if extra else "install " + ", ".join(modules)
        super().__init__(
            f"executor {executor!r} needs {', '.join(modules)} (not installed): run `{hint}`"
        )


@dataclass
class TaskContext:
    """What an executor gets for one attempt of one task."""

    task_id: str
    attempt: int
    spec: TaskSpec
    output_dir: Path
    cancelled: threading.Event = field(default_factory=threading.Event)
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.getLogger("executors")
    )

    @property
    def body(self) -> TaskBody:
        return self.spec.spec


class Executor(ABC):
    name: ClassVar[str]
    # Import names the executor needs beyond FlowMesh's own dependencies, and the
    # extra that installs them; checked before the executor is offered to the fleet.
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    # How many tasks one child process runs at once.
    max_concurrency: ClassVar[int] = 1

    @classmethod
    def missing(cls) -> MissingExtra | None:
        """Why this executor cannot run here, or None when it can."""
        absent = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        return MissingExtra(cls.name, absent, cls.extra) if absent else None

    @classmethod
    def validate_spec(cls, body: TaskBody) -> list[tuple[str, str]]:
        """Problems with a spec this executor would get, as (field path, message).

        Runs in the orchestrator at submit time, without the executor's heavy
        dependencies, so a spec that can never run is rejected before it is stored.
        """
        return []

    def setup(self) -> None:
        """Called once in the child process before the first task."""

    @abstractmethod
    def run(self, task: TaskContext) -> dict[str, Any]:
        """Do the work; return a JSON-serialisable result. Raise ExecutorError to fail."""

    def health(self) -> dict[str, Any]:
        """Reported with heartbeats; `loaded_models` is used by the scheduler."""
        return {}

    def close(self) -> None:
        """Release what `setup` and `run` acquired."""
