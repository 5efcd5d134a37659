"""Errors shared by every FlowMesh process."""

from __future__ import annotations

from typing import Any


class FlowMeshError(Exception):
    """Base of every error FlowMesh raises on purpose."""


class ConfigError(FlowMeshError):
    """A setting is missing or wrong; the message names the variable and the fix."""


def failure(
    kind: str,
    message: str,
    *,
    type: str | None = None,
    retryable: bool = True,
    charge: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """How a failed attempt is recorded (the task's `error`, and what `settle` reads):
    `kind` classifies it, `retryable` says whether another attempt can help, `charge`
    whether it counts toward maxAttempts."""
    return {
        "kind": kind,
        "type": type or kind,
        "message": message,
        "retryable": retryable,
        "charge": charge,
        **extra,
    }
