"""The orchestrator's running state: fleet snapshot, pending queues, and the loops that
move tasks from the queue to workers.

Everything here is rebuilt from Redis on start, so a restarted orchestrator
continues where the last one stopped. Worker events arrive on a durable stream
read through a consumer group; they are hints that make placement prompt, while
the periodic refresh from Redis keeps the snapshot right if a hint is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from flowmesh.keys import EVENTS_GROUP, Keys
from flowmesh.spec import Requirements, TaskSpec
from flowmesh.store import NewTask, TaskStore
from orchestrator.scheduler import Scheduler, WorkerView

log = logging.getLogger(__name__)

PLAN_BATCH = 1000


class Fleet:
    def __init__(self, conn: aioredis.Redis, keys: Keys, refresh_sec: float = 1.0):
        self.conn = conn
        self.keys = keys
        self.store = TaskStore(conn, keys)
        self.scheduler = Scheduler()
        self.refresh_sec = refresh_sec
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._wake = asyncio.Event()
        self._refresh_now = True
        self._last_refresh = 0.0
        self._reasons: dict[Requirements, str] = {}
        self._loops: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.conn.xgroup_create(self.keys.events, EVENTS_GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self.refresh()
        await self._load_pending()
        self._loops = [
            asyncio.create_task(self._placement_loop(), name="placement"),
            asyncio.create_task(self._events_loop(), name="events"),
        ]

    async def stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    def wake(self, *, refresh: bool = False) -> None:
        self._refresh_now = self._refresh_now or refresh
        self._wake.set()

    # -- submit ------------------------------------------------------------------
    async def submit(self, specs: list[TaskSpec]) -> list[NewTask]:
        tasks = await self.store.submit(specs)
        for t in tasks:
            self.scheduler.add_pending(t.task_id, t.requirements, t.score)
        self.wake()
        return tasks

    # -- fleet snapshot ----------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read every registered worker, its liveness and the tasks it holds."""
        k = self.keys
        ids = sorted(await self.conn.smembers(k.worker_ids))
        async with self.conn.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(k.worker(wid))
                pipe.exists(k.heartbeat(wid))
                pipe.smembers(k.worker_tasks(wid))
            replies = await pipe.execute()
        views: list[WorkerView] = []
        held: dict[str, str] = {}
        for i, wid in enumerate(ids):
            raw, alive, tasks = replies[3 * i : 3 * i + 3]
            if not raw or "inbox" not in raw:
                continue
            views.append(WorkerView.from_hash(raw, bool(alive)))
            held.update({task_id: wid for task_id in tasks})
        await self._sync_active(held)
        running = {wid: sum(1 for w in held.values() if w == wid) for wid in ids}
        self.scheduler.set_workers(views, running)
        self._last_refresh = time.monotonic()
        self._refresh_now = False

    async def _sync_active(self, held: dict[str, str]) -> None:
        active = self.scheduler.active
        for task_id in [t for t in active if t not in held]:
            del active[task_id]
        unknown = [t for t in held if t not in active or active[t][0] != held[t]]
        if unknown:
            for task_id, req in zip(unknown, await self.store.requirements(unknown), strict=True):
                if req is not None:
                    active[task_id] = (held[task_id], req)

    async def _load_pending(self) -> None:
        """Bring every task in Redis's pending queue into the in-memory queues."""
        entries = await self.store.pending_ids()
        missing = [(t, s) for t, s in entries if t not in self.scheduler.pending]
        for start in range(0, len(missing), 1000):
            chunk = missing[start : start + 1000]
            reqs = await self.store.requirements([t for t, _ in chunk])
            for (task_id, score), req in zip(chunk, reqs, strict=True):
                if req is not None:
                    self.scheduler.add_pending(task_id, req, score)
        if missing:
            log.info("loaded %d pending task(s) from Redis", len(missing))

    # -- placement ---------------------------------------------------------------
    async def _placement_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.refresh_sec)
            self._wake.clear()
            try:
                if self._refresh_now or time.monotonic() - self._last_refresh >= self.refresh_sec:
                    await self.refresh()
                    if await self.conn.zcard(self.keys.pending_queue) > len(self.scheduler.pending):
                        await self._load_pending()
                await self.place()
            except (RedisError, OSError) as exc:
                log.warning("placement paused: Redis unreachable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                self._refresh_now = True

    async def place(self) -> int:
        """Place as many pending tasks as the fleet has room for; returns how many."""
        placed = 0
        while True:
            plan, blocked = self.scheduler.plan(PLAN_BATCH)
            if plan:
                outcomes = await self.store.dispatch(
                    [(p.task_id, p.worker_id, p.inbox) for p in plan]
                )
                for p, outcome in zip(plan, outcomes, strict=True):
                    if outcome.ok:
                        placed += 1
                        continue
                    log.debug(
                        "placement of %s on %s refused: %s", p.task_id, p.worker_id, outcome.reason
                    )
                    requeue = not outcome.reason.startswith("task is")
                    self.scheduler.undo(p, requeue=requeue)
                    if requeue:  # our snapshot of that worker was wrong: re-read it
                        self._refresh_now = True
            await self._record_reasons(blocked)
            if len(plan) < PLAN_BATCH or self._refresh_now:
                if self._refresh_now:
                    self._wake.set()
                return placed

    async def _record_reasons(self, blocked: list[Requirements]) -> None:
        """Write why blocked tasks wait into their hashes, once per change of reason."""
        for req in blocked:
            reason = self.scheduler.explain(req)
            if self._reasons.get(req) != reason:
                self._reasons[req] = reason
                tasks = self.scheduler.blocked_tasks(req)
                log.info("%d pending %s task(s): %s", len(tasks), req.executor, reason)
                await self.store.set_reason(tasks, reason)
        if len(self._reasons) > 10_000:
            self._reasons.clear()

    # -- worker events -----------------------------------------------------------
    async def _events_loop(self) -> None:
        k = self.keys
        # Entries an earlier orchestrator read but never acked are taken over first.
        claim_from: str | None = "0-0"
        while True:
            try:
                if claim_from is not None:
                    next_id, entries, *_ = await self.conn.xautoclaim(
                        k.events,
                        EVENTS_GROUP,
                        self.consumer,
                        min_idle_time=0,
                        start_id=claim_from,
                        count=500,
                    )
                    claim_from = next_id if next_id != "0-0" else None
                else:
                    reply = await self.conn.xreadgroup(
                        EVENTS_GROUP, self.consumer, {k.events: ">"}, count=1000, block=1000
                    )
                    entries = reply[0][1] if reply else []
                await self._handle_events(entries)
            except (RedisError, OSError) as exc:
                log.warning("reading events failed: %s; retrying", exc)
                await asyncio.sleep(1.0)

    async def _handle_events(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        if not entries:
            return
        for _, fields in entries:
            kind = fields.get("type", "")
            if kind == "task.finished":
                self.scheduler.release(fields["task_id"])
                self.wake()
            elif kind in ("worker.registered", "worker.stopped", "task.stale"):
                self.wake(refresh=True)
        await self.conn.xack(self.keys.events, EVENTS_GROUP, *[i for i, _ in entries])
