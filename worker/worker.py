"""The worker's life: register, start its executors, read its inbox, drain, deregister.

Its parts, each in a module of its own: presence (`worker.presence`: registration and
a heartbeat thread that beats whatever the rest is doing), executor children
(`worker.host`), GPUs (`worker.devices`), attempts (`worker.attempt`: run, stop,
record), and a task's files (`worker.outputs`). This module wires them and owns the
inbox and the notices that stop tasks (cancel, supersession).

Delivery: the orchestrator XADDs each attempt to this worker's inbox stream; we read
it through a consumer group and ack it only in the same Lua step that records the
result (`TaskStore.settle_many`), so a crash at any point leaves the entry pending
rather than lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from executors.base import Executor
from flowmesh import __version__, workers
from flowmesh.errors import ConfigError
from flowmesh.failures import FailureKind, failure
from flowmesh.keys import INBOX_GROUP, Keys
from flowmesh.status import TaskStatus, WorkerStatus
from flowmesh.store import Delivery, Ending, Outcome, TaskStore
from flowmesh.workers import WorkerPresence, WorkerRecord
from worker.attempt import HANDED_BACK, Attempt, Attempts
from worker.devices import DeviceAllocator, select_gpus
from worker.hardware import Gpu, Hardware, Nvml, detect, sample_load
from worker.host import ExecutorHost
from worker.presence import Presence
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self, settings: WorkerSettings, conn: aioredis.Redis, executors: dict[str, type[Executor]]
    ):
        self.settings = settings
        self.conn = conn
        self.keys = Keys(settings.key_prefix)
        self.store = TaskStore(conn, self.keys)
        self.id = settings.worker_id
        self.inbox = self.keys.inbox(settings.task_topic, self.id)
        self.executors = sorted(executors)
        self.slots = settings.slots or default_slots(executors.values())
        self.prefetch = (
            default_prefetch(self.slots) if settings.prefetch is None else settings.prefetch
        )
        self.nvml = Nvml()
        detected: Hardware = detect(self.nvml, cpus=settings.cpus, memory=settings.memory)
        gpus = usable_gpus(settings, detected.gpus)
        # The record offers only the GPUs WORKER_GPUS (or CUDA_VISIBLE_DEVICES) leaves us.
        self.hardware = Hardware(
            detected.hostname, detected.platform, detected.cpu_count, detected.memory_total, gpus
        )
        self.started_at = time.time()
        # Disabled by the orchestrator since (None: enabled), and for how long before:
        # no cost accrues while disabled.
        self._disabled_since: float | None = None
        self._disabled_total = 0.0
        self._stopping = asyncio.Event()
        self._drain_now = asyncio.Event()
        self._devices_view: dict[str, list[int]] = {}
        # CPU, memory and GPU readings, refreshed each interval off the heartbeat thread (an
        # NVML call can hang on a failing GPU; a beat must not wait for it).
        self._load: dict[str, object] = {}
        self.devices = DeviceAllocator(gpus)
        self.presence = Presence(
            settings.redis,
            self.keys,
            WorkerRecord(
                worker_id=self.id,
                inbox=self.inbox,
                hostname=self.hardware.hostname,
                pid=os.getpid(),
                version=__version__,
                hardware=self.hardware.to_dict(),
                tags=list(settings.tags),
                executors=self.executors,
                slots=self.slots,
                prefetch=self.prefetch,
                cost_per_hour=settings.cost_per_hour,
                heartbeat_interval=settings.heartbeat_interval,
                started_at=self.started_at,
                protocol=workers.PROTOCOL,
                # results_dir: where `${stage.outputs_dir}` points in shared-storage mode
                artifacts={
                    **settings.artifacts.describe(),
                    "results_dir": str(settings.results_dir),
                },
            ),
            interval=settings.heartbeat_interval,
            ttl=settings.heartbeat_ttl,
            snapshot=self._presence,
            stopping=self._stopping.is_set,
        )
        self.host = ExecutorHost(
            executors,
            worker_id=self.id,
            log_level=settings.log_level,
            gpus=gpus,
            gpus_known=self.nvml.available,
            max_warm_models=settings.max_warm_models,
            on_change=lambda: self.presence.nudge(executors_changed=True),
            on_progress=lambda req_id, fields: self.attempts.progress(req_id, fields),
            artifacts=settings.artifacts,
        )
        self.attempts = Attempts(
            settings, self.store, self.host, self.devices, self._devices_changed
        )
        self.attempts.inbox = self.inbox

    @property
    def running(self) -> dict[str, Attempt]:
        return self.attempts.running

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        # Presence first: from here on the worker beats, whatever its executors are doing.
        self._load = await asyncio.to_thread(sample_load, self.nvml)
        await asyncio.to_thread(self.presence.register)
        self.presence.start()
        self._log_registered()
        self.host.start()
        loops = [
            asyncio.create_task(self._watch_loop(), name="watch"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        try:
            await self._inbox_loop()
            await self._drain()
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.host.stop()
            await asyncio.to_thread(self.presence.stop)
            try:
                await self.deregister()
            except (RedisError, OSError) as exc:
                # Our heartbeat key expires by itself and the lease check re-places our tasks.
                log.warning("worker %s: could not deregister (%s)", self.id, exc)

    def request_stop(self) -> None:
        """First call: drain (finish within the drain timeout, then hand back). Second: hand
        back at once."""
        if not self._stopping.is_set():
            log.info("worker %s: stopping; no new tasks will be taken", self.id)
            self._stopping.set()
            self.attempts.slot_freed.set()
            # Tell the orchestrator now, not at the next beat: dispatch.lua refuses a
            # draining worker, so nothing new lands in an inbox nobody will read. The
            # presence thread writes it, so no beat in flight can write `busy` over it.
            self.presence.nudge()
        else:
            log.info("worker %s: second stop signal; handing back running tasks now", self.id)
            self._drain_now.set()

    def _presence(self) -> WorkerPresence:
        """What the next heartbeat writes. Called on the heartbeat thread: it only reads
        attributes the event loop replaces whole, and copies the running map in one C call."""
        running = list(self.attempts.running)
        status = (
            WorkerStatus.DRAINING
            if self._stopping.is_set()
            else WorkerStatus.BUSY
            if running
            else WorkerStatus.IDLE
        )
        now = time.time()
        return WorkerPresence(
            status=status,
            running=len(running),
            current_tasks=sorted(running),
            loaded_models=self.host.loaded_models(),
            loading_models=self.host.loaded_models("loading_models"),
            engines=self.host.engines(),
            model_loads=self.host.model_loads(),
            executor_states=self.host.states(),
            devices=self._devices_view,
            load=self._load,
            cost_accrued=self.settings.cost_per_hour * self._billed_seconds(now) / 3600.0,
        )

    def _billed_seconds(self, now: float) -> float:
        """Time since the start, less the time the orchestrator had this worker disabled."""
        since = self._disabled_since
        disabled = self._disabled_total + (now - since if since is not None else 0.0)
        return max(now - self.started_at - disabled, 0.0)

    def _devices_changed(self) -> None:
        self._devices_view = {k: list(v) for k, v in self.devices.held().items()}

    def _log_registered(self) -> None:
        gpus = ", ".join(g.name for g in self.hardware.gpus) or "no GPU"
        log.info(
            "worker %s registered: %g CPUs, %.1f GiB RAM, %s; executors %s; tags %s; %d slots",
            self.id,
            self.hardware.cpu_count,
            self.hardware.memory_total / 2**30,
            gpus,
            ",".join(self.executors) or "none",
            ",".join(self.settings.tags) or "none",
            self.slots,
        )
        upload = self.settings.artifacts.upload
        if upload is None:
            log.info("artifact uploads: off (no ORCHESTRATOR_BASE_URL)")
        else:
            rate = upload.bandwidth_bytes_per_sec
            log.info(
                "artifact uploads to %s, %s",
                upload.base_url,
                f"throttled to {rate} bytes/s (WORKER_NETWORK_BANDWIDTH_BYTES_PER_SEC)"
                if rate
                else "not throttled",
            )

    async def deregister(self) -> None:
        k = self.keys
        # Tasks placed on us that we never started (dispatched while we drained): hand
        # them back uncharged before the inbox that holds them goes away.
        leftover = sorted(await self.conn.smembers(k.worker_tasks(self.id)))
        if leftover:
            async with self.conn.pipeline(transaction=False) as pipe:
                for task_id in leftover:
                    pipe.hget(k.task(task_id), "attempts")
                attempts = await pipe.execute()
            endings = [
                Ending(
                    task_id,
                    int(attempt),
                    TaskStatus.FAILED,
                    error=HANDED_BACK,
                    charge=False,
                    immediate=True,
                    avoid=False,
                )
                for task_id, attempt in zip(leftover, attempts, strict=True)
                if attempt is not None
            ]
            if endings:
                await self.store.settle_many(self.id, endings)
            log.info("worker %s: handed back %d task(s) it never started", self.id, len(leftover))
        async with self.conn.pipeline(transaction=True) as pipe:
            workers.deregister(pipe, k, self.id)
            await pipe.execute()
        await self.conn.delete(self.inbox)  # every entry in it is settled or handed back
        log.info("worker %s deregistered", self.id)

    # -- notices that stop tasks -------------------------------------------------------
    async def _watch_loop(self) -> None:
        """Each interval, re-check every running task: a cancel whose notice was missed,
        or a newer attempt (we were presumed lost meanwhile) stops it."""
        k = self.keys
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                self._load = await asyncio.to_thread(sample_load, self.nvml)
            except Exception as exc:  # psutil or NVML: the beat goes on without a reading
                log.warning("reading the machine's load failed: %s", exc)
            await self._check_admin()
            running = list(self.running.values())
            if not running:
                continue
            try:
                async with self.conn.pipeline(transaction=False) as pipe:
                    for r in running:
                        pipe.hmget(k.task(r.delivery.task_id), ["status", "attempts", "worker_id"])
                    replies = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("checking running tasks failed: %s", exc)
                continue
            for r, (task_status, attempts, worker_id) in zip(running, replies, strict=True):
                if task_status == TaskStatus.CANCELLED.value:
                    self.attempts.stop_soon(
                        r, failure(FailureKind.CANCELLED, "cancelled by request")
                    )
                elif attempts != str(r.delivery.attempt) or worker_id != self.id:
                    self.attempts.stop_soon(
                        r, failure(FailureKind.SUPERSEDED, "a newer attempt of this task exists")
                    )

    async def _check_admin(self) -> None:
        """What the orchestrator set on our record: disabled (no cost accrues meanwhile),
        or a drain requested (a missed `drain` notice costs one interval at most)."""
        try:
            disabled, drain = await self.conn.hmget(
                self.keys.worker(self.id), ["disabled", "drain_requested"]
            )
        except (RedisError, OSError) as exc:
            log.warning("reading our record failed: %s", exc)
            return
        now = time.time()
        if disabled == "1" and self._disabled_since is None:
            self._disabled_since = now
            log.info("worker %s: disabled by the orchestrator; taking no tasks", self.id)
        elif disabled != "1" and self._disabled_since is not None:
            self._disabled_total += now - self._disabled_since
            self._disabled_since = None
            log.info("worker %s: enabled again", self.id)
        if drain == "1" and not self._stopping.is_set():
            log.info("worker %s: drain requested by the orchestrator", self.id)
            self.request_stop()

    async def _control_loop(self) -> None:
        channel = self.keys.control(self.id)
        loop = asyncio.get_running_loop()
        # An idle channel is silent, and so is one whose server hangs (a frozen primary that
        # Sentinel has replaced): a ping every few seconds tells them apart.
        ping_every = 5.0
        deaf_after = ping_every + (self.settings.redis.timeout or 10.0)
        while True:
            pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                heard = next_ping = loop.time()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    now = loop.time()
                    if message is not None:
                        heard = now
                    if now - heard > deaf_after:
                        raise RedisTimeoutError(f"no answer on {channel} for {now - heard:.0f}s")
                    if now >= next_ping:
                        await pubsub.ping()
                        next_ping = now + ping_every
                    if message is None or message.get("type") != "message":
                        continue
                    parts = str(message.get("data", "")).split()
                    if parts == ["drain"] and not self._stopping.is_set():
                        log.info("worker %s: drain requested by the orchestrator", self.id)
                        self.request_stop()
                    elif len(parts) == 3 and parts[0] == "cancel":
                        r = self.running.get(parts[1])
                        if r is not None and str(r.delivery.attempt) == parts[2]:
                            self.attempts.stop_soon(
                                r, failure(FailureKind.CANCELLED, "cancelled by request")
                            )
            except (RedisError, OSError) as exc:
                log.warning("control channel lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    # -- inbox -------------------------------------------------------------------------
    async def _inbox_loop(self) -> None:
        # First whatever this WORKER_ID was handed and has not acked (an earlier run of it,
        # or reads lost to a Redis error), then new entries only.
        attempts = self.attempts
        start_id = "0"
        # Whether the last read filled every free slot: more is likely waiting, and the next
        # read takes and starts new entries in one call (take.lua) instead of two. Otherwise
        # it blocks on XREADGROUP for the next entry, as an idle worker does.
        busy = False
        while not self._stopping.is_set():
            free = self.slots - len(self.running)
            if free <= 0:
                attempts.slot_freed.clear()
                await attempts.slot_freed.wait()
                continue
            if attempts.reread and start_id == ">":
                attempts.reread = False
                start_id = "0"
            taken: list[tuple[str, dict[str, str], list[Outcome | None]]] | None = None
            try:
                if busy and start_id == ">":
                    taken = await self.store.take(self.id, self.inbox, free, list(self.running))
                    entries = [(sid, fields) for sid, fields, _ in taken]
                else:
                    reply = await self.conn.xreadgroup(
                        INBOX_GROUP, self.id, {self.inbox: start_id}, count=free, block=1000
                    )
                    entries = reply[0][1] if reply else []
            except (RedisError, OSError) as exc:
                log.warning("reading inbox %s failed: %s; retrying", self.inbox, exc)
                await asyncio.sleep(1.0)
                start_id, busy = "0", False
                continue
            busy = len(entries) >= free
            if start_id != ">" and not entries:
                start_id = ">"
                continue
            batch: list[Delivery] = []
            outcomes: list[Outcome] = []
            for i, (stream_id, fields) in enumerate(entries):
                if not fields:
                    continue  # acked meanwhile
                # One attempt, or each child of a merged delivery (task merge).
                for j, delivery in enumerate(Delivery.from_entry(stream_id, fields)):
                    started = taken[i][2][j] if taken is not None else None
                    current = self.running.get(delivery.task_id)
                    if taken is not None and started is None:
                        # take.lua left it alone: an attempt of its task was here when it
                        # ran (it may have ended since). Read again by id, via start.lua.
                        attempts.opened(delivery)
                        attempts.reread = True
                        continue
                    if current is not None:
                        if current.delivery.stream_id != stream_id:
                            # An attempt of the same task is still ending here (stopped as
                            # superseded, say): come back to this entry when it has. Open
                            # meanwhile, so the entry is not acked with its siblings.
                            attempts.opened(delivery)
                            attempts.reread = True
                        continue  # else: our own running attempt, met again on a re-read
                    attempts.opened(delivery)
                    self.running[delivery.task_id] = Attempt(delivery)
                    batch.append(delivery)
                    if started is not None:
                        outcomes.append(started)
            if start_id != ">" and entries:
                start_id = entries[-1][0]
            if batch and taken is not None:
                await self._begin(batch, outcomes)
            elif batch:
                await self._start(batch)

    async def _start(self, batch: list[Delivery]) -> None:
        """Mark a batch of deliveries RUNNING (one script call), then run each one."""
        attempts = self.attempts
        try:
            outcomes = await self.store.start(self.id, [(d.task_id, d.attempt) for d in batch])
        except (RedisError, OSError) as exc:
            # Not started: the entries stay pending and are read again once Redis answers.
            log.warning("cannot start %d task(s) (%s); will read them again", len(batch), exc)
            for d in batch:
                self.running.pop(d.task_id, None)
            attempts.reread = True
            attempts.slot_freed.set()
            await asyncio.sleep(0.2)
            return
        await self._begin(batch, outcomes)

    async def _begin(self, batch: list[Delivery], outcomes: list[Outcome]) -> None:
        """Run each delivery that Redis started; drop (and ack) the ones it refused."""
        attempts = self.attempts
        dropped: list[Delivery] = []
        for delivery, started in zip(batch, outcomes, strict=True):
            if not started.ok:
                log.warning(
                    "task %s attempt %d dropped: %s",
                    delivery.task_id,
                    delivery.attempt,
                    started.reason,
                )
                self.running.pop(delivery.task_id, None)
                dropped.append(delivery)
                continue
            attempts.spawn(attempts.handle(self.running[delivery.task_id]))
        if dropped:
            attempts.slot_freed.set()
            # A merged entry is acked once none of its children is left open here.
            done = [sid for sid in (attempts.closed(d) for d in dropped) if sid]
            if done:
                with contextlib.suppress(RedisError, OSError):  # else re-read, dropped again
                    await self.conn.xack(self.inbox, INBOX_GROUP, *done)

    async def _drain(self) -> None:
        """Let running tasks finish within the drain timeout; hand back the rest."""
        tasks = self.attempts.tasks
        if not tasks:
            return
        log.info(
            "worker %s: draining %d running task(s) (up to %gs)",
            self.id,
            len(self.running),
            self.settings.drain_timeout,
        )
        now = asyncio.create_task(self._drain_now.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        while tasks and not self._drain_now.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(
                {now, *tasks}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        now.cancel()
        if self.running:
            log.info("worker %s: handing back %d task(s)", self.id, len(self.running))
            for r in self.running.values():
                self.attempts.stop_now(r, HANDED_BACK)
            self.host.kill_busy(HANDED_BACK)
        if tasks:
            await asyncio.wait(set(tasks))


# Tasks a worker runs at once unless WORKER_SLOTS says: enough for a GPU-exclusive task
# per GPU on most machines, and no more, so the queue keeps what the worker cannot start.
DEFAULT_SLOTS = 4


def default_prefetch(slots: int) -> int:
    """Tasks queued in the inbox beyond the slots, by default: one more round of them (at
    most 64), so a freed slot is refilled from the inbox at once rather than after the
    orchestrator has heard of it. Only tasks that reserve no CPU, RAM or GPU are queued
    so (orchestrator.scheduler.WorkerView.fits_now)."""
    return min(slots, 64)


def default_slots(executors: Iterable[type[Executor]]) -> int:
    """DEFAULT_SLOTS, or more for a batching executor (one that awaits its tasks side by
    side so that an engine batches them, such as vLLM): as many as it runs at once."""
    batching = [cls.max_concurrency for cls in executors if cls.is_async()]
    return max([DEFAULT_SLOTS, *batching])


def usable_gpus(settings: WorkerSettings, detected: list[Gpu]) -> list[Gpu]:
    """WORKER_GPUS when set; else the CUDA_VISIBLE_DEVICES the worker was started with, when
    it names GPUs NVML knows (indices or UUIDs); else every GPU NVML sees."""
    if settings.gpus:
        return select_gpus(settings.gpus, detected)
    inherited = settings.inherited_gpus
    if inherited is None or not detected:
        return detected
    if not inherited.strip():
        return []  # started with no GPU visible: offer none
    try:
        return select_gpus(inherited, detected)
    except ConfigError:
        log.warning(
            "CUDA_VISIBLE_DEVICES=%s does not name GPUs NVML sees; offering all of them "
            "(set WORKER_GPUS to choose)",
            inherited,
        )
        return detected
