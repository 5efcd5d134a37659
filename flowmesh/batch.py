"""Group commit: callers submit one item each; items that arrive while a flush is in
flight go together in the next one.

With one caller at a time this costs nothing (the flush starts at once, with one
item); under load a batch holds everything that ended during the previous round
trip, so the number of round trips stays flat as the rate grows. No timer, no
added wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 512):
        self._flush = flush
        self._max = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="group-commit")
        # Shielded: a caller cancelled while waiting must not cancel the others' flush.
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                try:
                    results = await self._flush([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"flush returned {len(results)} for {len(batch)}")
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flusher = None
            # Cancelled mid-flush: whatever is still queued must not wait forever.
            for _, future in self._queue:
                if not future.done():
                    future.set_exception(RuntimeError("group commit stopped"))
            self._queue = []
