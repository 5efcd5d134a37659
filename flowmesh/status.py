"""Task states and the transitions between them: the one table both sides obey.

The Lua scripts in `flowmesh/lua/` enforce these transitions atomically; TRANSITIONS
is their summary for readers (docs/architecture.md draws the same graph).
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Placed on a worker: it holds one of that worker's slots."""
        return self in ACTIVE


TERMINAL = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE = frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING})

# from-state -> the states it may move to
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.DISPATCHED, TaskStatus.CANCELLED}),
    TaskStatus.DISPATCHED: frozenset(
        {
            TaskStatus.RUNNING,
            TaskStatus.DONE,
            TaskStatus.FAILED,
            TaskStatus.PENDING,
            TaskStatus.CANCELLED,
        }
    ),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.PENDING, TaskStatus.CANCELLED}
    ),
    TaskStatus.DONE: frozenset(),
    TaskStatus.FAILED: frozenset({TaskStatus.PENDING}),  # requeued from the dead letters
    TaskStatus.CANCELLED: frozenset(),
}


class WorkerStatus(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"
    LOST = "lost"  # stopped heartbeating; its tasks were re-placed


class ExecutorState(StrEnum):
    """An executor on one worker, as its record shows it; tasks are placed only on READY."""

    STARTING = "starting"  # its process is starting (imports, model load in setup)
    READY = "ready"
    FAILED = "failed"  # setup failed; `reason` says why, and the worker tries again later
