"""Executors: one module per kind of work. Importing this package never imports torch."""

from executors.base import (
    Executor,
    ExecutorError,
    MissingExtra,
    PermanentError,
    RetryableError,
    TaskContext,
)

__all__ = [
    "Executor",
    "ExecutorError",
    "MissingExtra",
    "PermanentError",
    "RetryableError",
    "TaskContext",
]
