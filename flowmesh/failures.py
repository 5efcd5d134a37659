"""Failure kinds and what each one means for a task: the one table of those rules.

A failed attempt is recorded as a dict made by `failure()` (the task's `error`, and what
`settle.lua` reads). Its `kind` names a row of `RULES`; the row says whether the attempt
counts toward maxAttempts, whether another attempt can help, whether the task is re-placed
at once, and whether the attempt's output files may become the task's.
docs/architecture.md ("Retries, failures, dead letters") shows this table
(`markdown_table()`; a unit test keeps the two equal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FailureKind(StrEnum):
    EXCEPTION = "exception"
    EXECUTOR_ERROR = "executor_error"
    PERMANENT = "permanent"
    MISSING_EXTRA = "missing_extra"
    BAD_RESULT = "bad_result"
    CRASH = "crash"
    CUDA_OOM = "cuda_oom"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    WORKER_ERROR = "worker_error"
    HANDED_BACK = "handed_back"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    EXECUTOR_FAILED = "executor_failed"


@dataclass(frozen=True)
class Rule:
    """What a failure of one kind means for its task.

    charged: counts toward maxAttempts. retried: another attempt can help.
    immediate: re-placed without backoff. keeps_outputs: the attempt's responses.json and
    manifest may become the task's top-level files (False when the attempt was stopped
    for a reason outside the task). meaning: one line, for the docs.
    """

    charged: bool
    retried: bool
    immediate: bool
    keeps_outputs: bool
    meaning: str


RULES: dict[FailureKind, Rule] = {
    FailureKind.EXCEPTION: Rule(
        charged=True,
        retried=True,
        immediate=False,
        keeps_outputs=True,
        meaning="the executor raised an unexpected exception",
    ),
    FailureKind.EXECUTOR_ERROR: Rule(
        charged=True,
        retried=True,
        immediate=False,
        keeps_outputs=True,
        meaning="the executor raised ExecutorError (another attempt may pass)",
    ),
    FailureKind.PERMANENT: Rule(
        charged=True,
        retried=False,
        immediate=False,
        keeps_outputs=True,
        meaning="the executor says the task can never succeed",
    ),
    FailureKind.MISSING_EXTRA: Rule(
        charged=True,
        retried=False,
        immediate=False,
        keeps_outputs=True,
        meaning="the executor needs an extra that is not installed",
    ),
    FailureKind.BAD_RESULT: Rule(
        charged=True,
        retried=False,
        immediate=False,
        keeps_outputs=True,
        meaning="the executor returned a result that is not JSON",
    ),
    FailureKind.CRASH: Rule(
        charged=True,
        retried=True,
        immediate=False,
        keeps_outputs=True,
        meaning="the executor's process died (exit, signal, OOM kill)",
    ),
    FailureKind.CUDA_OOM: Rule(
        charged=True,
        retried=True,
        immediate=False,
        keeps_outputs=True,
        meaning="CUDA ran out of memory",
    ),
    FailureKind.TIMEOUT: Rule(
        charged=True,
        retried=True,
        immediate=False,
        keeps_outputs=True,
        meaning="ran past timeoutSec (the worker's timer, from when the executor begins the task)",
    ),
    FailureKind.WORKER_LOST: Rule(
        charged=True,
        retried=True,
        immediate=True,
        keeps_outputs=False,
        meaning="the worker stopped heartbeating (the orchestrator's lease check); "
        "not charged if the task had not started",
    ),
    FailureKind.WORKER_ERROR: Rule(
        charged=True,
        retried=True,
        immediate=False,
        keeps_outputs=True,
        meaning="the worker failed around the task (disk full writing outputs)",
    ),
    FailureKind.HANDED_BACK: Rule(
        charged=False,
        retried=True,
        immediate=True,
        keeps_outputs=False,
        meaning="the worker is stopping (SIGTERM drain) and gave the task back",
    ),
    FailureKind.INTERRUPTED: Rule(
        charged=False,
        retried=True,
        immediate=True,
        keeps_outputs=False,
        meaning="the executor's process was stopped because of another task",
    ),
    FailureKind.CANCELLED: Rule(
        charged=False,
        retried=False,
        immediate=False,
        keeps_outputs=False,
        meaning="cancelled by request; the task ends CANCELLED",
    ),
    FailureKind.SUPERSEDED: Rule(
        charged=False,
        retried=False,
        immediate=False,
        keeps_outputs=False,
        meaning="a newer attempt of the task exists; this one's report is fenced out",
    ),
    FailureKind.EXECUTOR_FAILED: Rule(
        charged=False,
        retried=True,
        immediate=True,
        keeps_outputs=False,
        meaning="the task reached an executor whose setup failed on that worker; placed "
        "elsewhere (placement waits for a ready executor)",
    ),
}


def rule(kind: str) -> Rule:
    """The rule for `kind`; a kind this table does not know (an executor plugin's own)
    follows the EXCEPTION rule."""
    try:
        return RULES[FailureKind(kind)]
    except ValueError:
        return RULES[FailureKind.EXCEPTION]


def delivery_loss_charged(merged: bool, attempt: int) -> bool:
    """Whether losing a whole delivery (its worker lost, its executor process crashed)
    counts against a task of it. In a merged delivery the loss is the delivery's, not one
    child's: not on a child's first attempt; from its second on it does, so a task that
    kills workers still ends dead-lettered (docs/architecture.md, task merge)."""
    return not (merged and attempt == 1)


def failure(
    kind: FailureKind | str,
    message: str,
    *,
    type: str | None = None,
    retryable: bool | None = None,
    charge: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """How a failed attempt is recorded (the task's `error`, and what `settle` reads):
    `kind` classifies it, `retryable` says whether another attempt can help, `charge`
    whether it counts toward maxAttempts; both default to the kind's rule."""
    r = rule(kind)
    kind = str(kind)
    return {
        "kind": kind,
        "type": type or kind,
        "message": message,
        "retryable": r.retried if retryable is None else retryable,
        "charge": r.charged if charge is None else charge,
        **extra,
    }


def markdown_table() -> str:
    """RULES as the Markdown table docs/architecture.md shows."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    lines = [
        "| kind | charged | retried | immediate | keeps outputs | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in RULES.items():
        lines.append(
            f"| `{kind.value}` | {yes(r.charged)} | {yes(r.retried)} | {yes(r.immediate)} "
            f"| {yes(r.keeps_outputs)} | {r.meaning} |"
        )
    return "\n".join(lines) + "\n"


_FRAME = re.compile(r'File "([^"]+)"')


def trim_traceback(text: str) -> str:
    """A stored traceback as the API shows it: each frame's file without the worker's
    directories (`site-packages/` and what precedes it, or all but the last two parts of
    an absolute path). The worker's log keeps the whole one for the operator."""

    def short(match: re.Match[str]) -> str:
        path = match.group(1)
        if "site-packages/" in path:
            path = path.split("site-packages/", 1)[1]
        elif path.startswith("/"):
            path = "/".join(path.split("/")[-2:])
        return f'File "{path}"'

    return _FRAME.sub(short, text)


def public_error(error: Any) -> Any:
    """A failure record as the API serves it (see trim_traceback)."""
    if isinstance(error, dict) and isinstance(error.get("traceback"), str):
        return {**error, "traceback": trim_traceback(error["traceback"])}
    return error
