"""`echo`: returns its input, optionally after `spec.echo.delaySec`, or fails with
`spec.echo.fail` (its message) for good. For demos, queue smoke tests and fault tests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from executors.base import Executor, PermanentError, TaskContext
from flowmesh.spec import Float, TaskBody


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    delaySec: Float = Field(0.0, ge=0, le=86_400)
    message: Any = None
    fail: str | None = Field(
        None, min_length=1, max_length=1000, description="Fail permanently with this message"
    )


class EchoExecutor(Executor):
    name = "echo"
    result_fields = frozenset({"message", "items", "delaySec", "cancelled"})
    options = EchoOptions
    takes_model = False
    max_concurrency = 256

    @classmethod
    def deterministic(cls, body: TaskBody, options: Any) -> bool:
        return True  # its result is its input

    def run(self, task: TaskContext) -> dict[str, Any]:
        options: EchoOptions = task.options
        body = task.body
        # Wait on the cancel event rather than sleeping, so a cancel ends the wait.
        if options.delaySec and task.cancelled.wait(options.delaySec):
            return {"cancelled": True}
        if options.fail:
            raise PermanentError(options.fail)
        return {
            "message": options.message,
            "items": body.data.items if body.data else [],
            "delaySec": options.delaySec,
        }
