"""The event loop FlowMesh processes run on: uvloop where it is installed (Linux, macOS),
else asyncio's own. uvloop's C loop and socket transports cut the CPU each wake-up and
each Redis round trip costs, which the worker pays several times per task."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # Windows has no uvloop
        return asyncio.run(main)
    return uvloop.run(main)
