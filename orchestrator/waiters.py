"""Long polls: readers waiting for something to end (a task, a pipeline), woken by the
loop that sees it end, and re-reading now and then in case another replica saw it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
# The longest a GET ?wait= may hold a request (tasks and pipelines alike).
MAX_WAIT_SEC = 60.0
# A waiter re-reads at least this often: with several orchestrator replicas, the event that
# ends what it waits for may reach another one.
REREAD_SEC = 0.5


class Waiters:
    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Future[None]]:
        """A future set when `notify(key)` is called. Watch before reading the state, so
        an end in between is not missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, [])
        waiters.append(future)
        try:
            yield future
        finally:
            waiters.remove(future)
            if not waiters:
                self._waiters.pop(key, None)

    def __bool__(self) -> bool:
        """Whether anyone waits (a long poll): the events loop then reads without delay."""
        return bool(self._waiters)

    def notify(self, key: str) -> None:
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result(None)

    async def poll(
        self,
        key: str,
        read: Callable[[], Awaitable[T]],
        ended: Callable[[T], bool],
        wait: float,
    ) -> T:
        """`read()` once it says `ended`, or after `wait` seconds, whichever is first."""
        deadline = time.monotonic() + wait
        while True:
            with self.watch(key) as woken:
                value = await read()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or ended(value):
                    return value
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken, min(remaining, REREAD_SEC))
