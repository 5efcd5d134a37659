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
from collections import Counter
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from flowmesh import workers
from flowmesh.events import EventType
from flowmesh.failures import FailureKind, delivery_loss_charged, failure, rule
from flowmesh.keys import EVENTS_GROUP, Keys, heartbeat_ttl
from flowmesh.spec import Requirements, TaskSpec
from flowmesh.status import TaskStatus
from flowmesh.store import Ending, NewTask, StageRelease, TaskStore
from orchestrator import scaling
from orchestrator.merge import MergeKeys
from orchestrator.scheduler import Scheduler, WorkerView
from orchestrator.task_stats import TaskStats
from orchestrator.waiters import Waiters

log = logging.getLogger(__name__)

PLAN_BATCH = 1000
# A busy stream's events are read in batches: after a read that found some (but not a full
# batch), and while nobody long-polls a result, the next read waits this long first. Each
# read costs the orchestrator a round trip whether it brings one event or a thousand; at
# a thousand tasks a second, reading as each event came meant about two reads per task.
# A worker's prefetched tasks cover the delay (placement refills on `task.finished`).
EVENTS_LINGER_SEC = 0.002
EVENTS_BATCH = 1000
# Elastic scaling decides at most this often (orchestrator.scaling).
SCALE_EVERY_SEC = 0.25

# Events after which the fleet snapshot is re-read at once: a worker came, changed what it
# can run (an executor became ready or failed), or went; or a stale report freed a slot.
REFRESH_ON = frozenset(
    {
        EventType.WORKER_REGISTERED,
        EventType.WORKER_READY,
        EventType.WORKER_STOPPED,
        EventType.WORKER_LOST,
        EventType.WORKER_DISABLED,
        EventType.WORKER_ENABLED,
        EventType.TASK_STALE,
    }
)


class Fleet:
    def __init__(
        self,
        conn: aioredis.Redis,
        keys: Keys,
        refresh_sec: float = 1.0,
        lease_intervals: float = 2.0,
        idempotency_ttl: int = 86_400,
    ):
        self.conn = conn
        self.keys = keys
        self.store = TaskStore(conn, keys)
        self.scheduler = Scheduler()
        self.refresh_sec = refresh_sec
        self.lease_intervals = lease_intervals
        self.idempotency_ttl = idempotency_ttl
        # No worker is declared lost before this time: after our own Redis trouble the
        # workers' beats may be late through no fault of theirs.
        self._reap_after = 0.0
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._wake = asyncio.Event()
        self._refresh_now = True
        self._last_refresh = 0.0
        self._reasons: dict[Requirements, str] = {}
        self._loops: list[asyncio.Task[None]] = []
        # Long-poll readers of a task (GET ?wait=), woken when its end event (finished or
        # cancelled) arrives here.
        self.waiters = Waiters()
        # Elastic scaling (ENABLE_ELASTIC_SCALING); None: off.
        self.scaler: scaling.ElasticScaler | None = None
        self._blocked: list[Requirements] = []
        self._last_scale = 0.0
        # Called with a pipeline's id when one of its tasks ended (the pipeline runner).
        self.on_pipeline_event: Callable[[str], None] | None = None
        # Queue waits, run times, attempts, failures and merges seen here (GET /metrics).
        self.stats = TaskStats()

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        await self._create_events_group()
        # We may be starting right after a Redis outage in which no worker could beat:
        # declare nobody lost until a whole lease has passed under our watch.
        self._reap_after = time.monotonic() + self._longest_lease(await self._intervals())
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
    async def submit(
        self,
        specs: list[TaskSpec],
        idempotency_key: str | None = None,
        merge: list[MergeKeys] | None = None,
        release: StageRelease | None = None,
    ) -> tuple[list[NewTask], list[str] | None]:
        keys = [(m.merge_key, m.identity) for m in merge] if merge else None
        tasks, existing = await self.store.submit(
            specs, idempotency_key, self.idempotency_ttl, keys, release
        )
        now = time.time()
        for t in tasks:
            self.scheduler.add_pending(t.queue_entry(), now)
        if tasks:
            self.wake()
            # Let the placement loop run first, up to its dispatch call, and the request
            # answer after: placing the task before writing the reply takes about a
            # millisecond off its start, and adds to the reply only placement's planning.
            await asyncio.sleep(0)
        return tasks, existing

    async def cancel(self, task_id: str) -> tuple[bool, str]:
        """Cancel a task; a running one's worker is told to stop it at once."""
        cancelled, previous, worker_id, attempt = await self.store.cancel(task_id)
        if cancelled:
            self.scheduler.discard_pending(task_id)
            if worker_id:
                await self.conn.publish(self.keys.control(worker_id), f"cancel {task_id} {attempt}")
        return cancelled, previous

    # -- fleet snapshot ----------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read every registered worker, its liveness and the tasks it holds; workers
        whose lease ran out are declared lost and their tasks re-placed."""
        views: list[WorkerView] = []
        held: dict[str, str] = {}
        lost: list[tuple[str, str, float, set[str]]] = []
        for record, pttl, tasks in await workers.read_all(self.conn, self.keys):
            silent = self._silence(record.heartbeat_interval, pttl)
            if silent is not None and time.monotonic() >= self._reap_after:
                lost.append((record.worker_id, record.inbox, silent, tasks))
                continue
            views.append(WorkerView.from_record(record, alive=silent is None))
            held.update({task_id: record.worker_id for task_id in tasks})
        for wid, inbox, silent, tasks in lost:
            await self._reap(wid, inbox, silent, tasks)
        await self._sync_active(held)
        running = Counter(held.values())
        self.scheduler.set_workers(views, running)
        self._last_refresh = time.monotonic()
        self._refresh_now = False

    def _silence(self, interval: float, pttl: int) -> float | None:
        """Seconds since the worker's last beat when past its lease, else None.

        Measured with the heartbeat key's remaining TTL, on Redis's clock, so clock skew
        between machines cannot make a live worker look dead.
        """
        lease = self._lease(interval)
        if pttl is None or pttl < 0:
            return lease  # key gone: at least the lease has passed
        silent = heartbeat_ttl(interval) - pttl / 1000.0
        return silent if silent > lease else None

    async def _reap(self, worker_id: str, inbox: str, silent: float, tasks: set[str]) -> None:
        """A worker stopped beating: re-place its tasks (attempt + 1) and forget it."""
        k = self.keys
        log.warning(
            "worker %s lost: no heartbeat for %.1fs; re-placing %d task(s)",
            worker_id,
            silent,
            len(tasks),
        )
        error = failure(
            FailureKind.WORKER_LOST,
            f"worker {worker_id} stopped heartbeating ({silent:.1f}s)",
            type="WorkerLost",
        )
        ids = sorted(tasks)
        async with self.conn.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(k.task(task_id), ["attempts", "status", "merge_group"])
            rows = await pipe.execute()
        # Lost before it started, a task cannot be what killed the worker: re-place it
        # uncharged. Lost while RUNNING it may be (an OOM, a segfault), so the loss counts
        # toward maxAttempts (the rule's `charged`), as a system failure counts toward
        # Ray's max_retries; in a merged delivery, see delivery_loss_charged.
        lost = rule(FailureKind.WORKER_LOST)
        endings = [
            Ending(
                task_id,
                int(attempt),
                TaskStatus.FAILED,
                error=error,
                charge=lost.charged
                and status == TaskStatus.RUNNING.value
                and delivery_loss_charged(bool(group), int(attempt)),
                immediate=lost.immediate,
            )
            for task_id, (attempt, status, group) in zip(ids, rows, strict=True)
            if attempt is not None
        ]
        if endings:
            outcomes = await self.store.settle_many(worker_id, endings)
            for ending, outcome in zip(endings, outcomes, strict=True):
                if outcome.ok:
                    log.info(
                        "task %s attempt %d: worker %s lost → %s",
                        ending.task_id,
                        ending.attempt,
                        worker_id,
                        outcome.reason,
                    )
        async with self.conn.pipeline(transaction=True) as pipe:
            workers.mark_lost(pipe, k, worker_id, inbox)
            await pipe.execute()
        self._refresh_now = True

    async def _sync_active(self, held: dict[str, str]) -> None:
        active = self.scheduler.active
        for task_id in [t for t in active if t not in held]:
            del active[task_id]
            self.scheduler.forget_identity(task_id)
        unknown = [t for t in held if t not in active or active[t][0] != held[t]]
        if unknown:
            for task_id, req in zip(unknown, await self.store.requirements(unknown), strict=True):
                if req is not None:
                    active[task_id] = (held[task_id], req)

    async def _load_pending(self) -> None:
        """Bring every task in Redis's pending queue into the in-memory queues."""
        entries = await self.store.pending_ids()
        missing = [t for t, _ in entries if t not in self.scheduler.pending]
        await self._enqueue(missing)
        if missing:
            log.info("loaded %d pending task(s) from Redis", len(missing))

    async def _enqueue(self, task_ids: list[str]) -> None:
        now = time.time()
        for start in range(0, len(task_ids), 1000):
            for entry in await self.store.queue_entries(task_ids[start : start + 1000]):
                if entry is not None:
                    self.scheduler.add_pending(entry, now)

    # -- placement ---------------------------------------------------------------
    async def _placement_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: a wake resumes this loop in the event loop's
            # next turn (wait_for's own task took two more), which `submit` relies on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_sec):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self._refresh_now or time.monotonic() - self._last_refresh >= self.refresh_sec:
                    await self.refresh()
                    if await self.conn.zcard(self.keys.pending_queue) > len(self.scheduler.pending):
                        await self._load_pending()
                await self.place()
                await self._scale()
            except (RedisError, OSError) as exc:
                log.warning("placement paused: Redis unreachable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                self._refresh_now = True
                self._reap_after = time.monotonic() + self._longest_lease()
            except Exception:  # never let placement stop for good; the next round retries
                log.exception("placement round failed")
                await asyncio.sleep(1.0)
                self._refresh_now = True

    async def place(self) -> int:
        """Place as many pending tasks as the fleet has room for; returns how many."""
        placed = 0
        while True:
            plan, blocked = self.scheduler.plan(PLAN_BATCH, time.time())
            if plan:
                outcomes = await self.store.dispatch(
                    [(p.task_id, p.worker_id, p.inbox, p.parent) for p in plan]
                )
                because: list[tuple[str, str]] = []
                # Tasks placed per delivery: all but one of each rode in another's.
                deliveries: Counter[tuple[str, str, str]] = Counter()
                for p, outcome in zip(plan, outcomes, strict=True):
                    if outcome.ok:
                        placed += 1
                        executor = p.entry.requirements.executor
                        deliveries[(p.worker_id, p.parent or p.task_id, executor)] += 1
                        if p.why:
                            because.append((p.task_id, f"{p.worker_id} {p.why}"))
                        continue
                    log.debug(
                        "placement of %s on %s refused: %s", p.task_id, p.worker_id, outcome.reason
                    )
                    requeue = not outcome.reason.startswith("task is")
                    self.scheduler.undo(p, requeue=requeue)
                    if requeue:  # our snapshot of that worker was wrong: re-read it
                        self._refresh_now = True
                for (_, _, executor), n in deliveries.items():
                    if n > 1:
                        self.stats.placed_merged(executor, n - 1)
                if because:
                    await self.store.set_placed_because(because)
            await self._record_reasons(blocked)
            self._blocked = blocked
            if len(plan) < PLAN_BATCH or self._refresh_now:
                if self._refresh_now:
                    self._wake.set()
                return placed

    async def _scale(self) -> None:
        """Elastic scaling (orchestrator.scaling), at most every SCALE_EVERY_SEC: prompt
        for a backlog, and cheap when every event wakes the placement loop."""
        if self.scaler is None or time.monotonic() - self._last_scale < SCALE_EVERY_SEC:
            return
        self._last_scale = time.monotonic()
        views = list(self.scheduler.workers.values())
        changes = self.scaler.decide(views, self._blocked, self._last_scale)
        if changes:
            await scaling.apply(self.conn, self.keys, changes)
            self.wake(refresh=True)

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
        # Handled entries, acked in the same round trip as the next read.
        handled: list[str] = []
        linger = False
        while True:
            entries: list[tuple[str, dict[str, str]]] = []
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
                    await self._handle_events(entries)
                    if entries:
                        await self.conn.xack(k.events, EVENTS_GROUP, *[i for i, _ in entries])
                else:
                    if linger and not self.waiters:
                        await asyncio.sleep(EVENTS_LINGER_SEC)
                    async with self.conn.pipeline(transaction=False) as pipe:
                        if handled:
                            pipe.xack(k.events, EVENTS_GROUP, *handled)
                        pipe.xreadgroup(
                            EVENTS_GROUP,
                            self.consumer,
                            {k.events: ">"},
                            count=EVENTS_BATCH,
                            block=1000,
                        )
                        reply = (await pipe.execute())[-1]
                    handled = []
                    entries = reply[0][1] if reply else []
                    linger = 0 < len(entries) < EVENTS_BATCH
                    await self._handle_events(entries)
                    handled = [i for i, _ in entries]
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # Redis came back without its data: the stream and group are new again.
                    log.warning("events group missing (Redis restarted empty?); recreating it")
                    handled = []
                    await self._create_events_group()
                    self.wake(refresh=True)
                else:
                    log.warning("reading events failed: %s; retrying", exc)
                    await asyncio.sleep(1.0)
            except (RedisError, OSError) as exc:
                log.warning("reading events failed: %s; retrying", exc)
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                # Stopping: ack what was handled, or the next orchestrator handles it again.
                if handled:
                    with contextlib.suppress(RedisError, OSError):
                        await self.conn.xack(k.events, EVENTS_GROUP, *handled)
                raise
            except Exception:  # a malformed event must not stop the loop
                # Its batch stays pending (unacked), as far as it was handled: the next
                # orchestrator to start claims it again.
                log.exception("handling events failed")
                await asyncio.sleep(1.0)

    async def _create_events_group(self) -> None:
        try:
            await self.conn.xgroup_create(self.keys.events, EVENTS_GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _handle_events(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        if not entries:
            return
        requeued: list[str] = []
        for _, fields in entries:
            kind = fields.get("type", "")
            if kind in (EventType.TASK_FINISHED, EventType.TASK_RETRY, EventType.TASK_CANCELLED):
                self.stats.attempt_ended(fields)
            if kind == EventType.TASK_FINISHED:
                self.scheduler.release(fields["task_id"], fields.get("worker_id"))
                self.waiters.notify(fields["task_id"])
                self.wake()
                self._pipeline_event(fields)
            elif kind == EventType.TASK_RETRY:
                self.scheduler.release(fields["task_id"], fields.get("worker_id"))
                requeued.append(fields["task_id"])
            elif kind == EventType.TASK_CANCELLED:
                self.scheduler.discard_pending(fields["task_id"])
                self.scheduler.forget_identity(fields["task_id"])
                self.waiters.notify(fields["task_id"])
                self._pipeline_event(fields)
            elif kind in REFRESH_ON:
                self.wake(refresh=True)
        if requeued:
            await self._enqueue(requeued)
            self.wake()

    def _pipeline_event(self, fields: dict[str, str]) -> None:
        pipeline_id = fields.get("pipeline_id")
        if pipeline_id and self.on_pipeline_event is not None:
            self.on_pipeline_event(pipeline_id)

    def _longest_lease(self, intervals: list[float] | None = None) -> float:
        """The longest lease among registered workers (0 with none: nobody to protect)."""
        if intervals is None:
            intervals = [w.heartbeat_interval for w in self.scheduler.workers.values()]
        return self._lease(max(intervals)) if intervals else 0.0

    def _lease(self, interval: float) -> float:
        """How long a worker beating every `interval` seconds may be silent before it is lost."""
        return self.lease_intervals * interval + 1.0

    async def _intervals(self) -> list[float]:
        ids = await self.conn.smembers(self.keys.worker_ids)
        async with self.conn.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hget(self.keys.worker(wid), "heartbeat_interval")
            raws = await pipe.execute()
        return [float(r) for r in raws if r]
