"""`echo`: returns its input, optionally after `spec.echo.delaySec`. For demos and fault tests."""

from __future__ import annotations

from typing import Any

from executors.base import Executor, TaskContext
from flowmesh.spec import TaskBody


class EchoExecutor(Executor):
    name = "echo"
    max_concurrency = 256

    @classmethod
    def validate_spec(cls, body: TaskBody) -> list[tuple[str, str]]:
        return []

    def run(self, task: TaskContext) -> dict[str, Any]:
        body = task.body
        options = body.echo
        delay = options.delaySec if options else 0.0
        # Wait on the cancel event rather than sleeping, so a cancel ends the wait.
        if delay and task.cancelled.wait(delay):
            return {"cancelled": True}
        return {
            "message": options.message if options else None,
            "items": body.data.items if body.data else [],
            "delaySec": delay,
        }
