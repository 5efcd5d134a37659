"""The worker's life: register, beat, read its inbox, run each task in an executor child.

Delivery: the orchestrator XADDs each attempt to this worker's inbox stream; we
read it through a consumer group and ack it only in the same Lua step that
records the result (`TaskStore.finish`), so a crash at any point leaves the entry
pending rather than lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from flowmesh import __version__
from flowmesh.batch import GroupCommit
from flowmesh.errors import failure
from flowmesh.keys import INBOX_GROUP, Keys
from flowmesh.status import TaskStatus, WorkerStatus
from flowmesh.store import Delivery, Ending, Outcome, TaskStore
from worker.child import Request
from worker.hardware import Hardware, Nvml, detect, sample_load
from worker.host import ExecutorFailure, ExecutorHost
from worker.outputs import summary, write_outputs
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Running:
    delivery: Delivery
    # Why we are stopping it (timeout, cancel, superseded, hand-back), once we are.
    stop_info: dict[str, Any] | None = None

    @property
    def req_id(self) -> str:
        return f"{self.delivery.task_id}:{self.delivery.attempt}"

    @property
    def task_type(self) -> str:
        return self.delivery.task_type


class Worker:
    def __init__(self, settings: WorkerSettings, conn: aioredis.Redis, executors: list[str]):
        self.settings = settings
        self.conn = conn
        self.keys = Keys(settings.key_prefix)
        self.store = TaskStore(conn, self.keys)
        self.id = settings.worker_id
        self.inbox = self.keys.inbox(settings.task_topic, self.id)
        self.executors = executors
        self.host = ExecutorHost(executors, settings.log_level)
        self.nvml = Nvml()
        self.hardware: Hardware = detect(self.nvml, cpus=settings.cpus, memory=settings.memory)
        self.running: dict[str, Running] = {}
        self.started_at = time.time()
        self._stopping = asyncio.Event()
        self._drain_now = asyncio.Event()
        # Set when an inbox entry was left unread on purpose or by error: the inbox loop
        # then re-reads this consumer's pending entries (id 0) once a slot frees.
        self._reread = False
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Every attempt that ends while a settle is in flight goes in the next one.
        self._settler = GroupCommit(self._settle_batch)

    # -- lifecycle ---------------------------------------------------------------
    async def run(self) -> None:
        await self.register()
        await self.host.start()
        try:
            await self._beat()  # publish warm executors and loaded models right away
        except (RedisError, OSError) as exc:
            log.warning("first heartbeat failed (%s); the heartbeat loop retries", exc)
        loops = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
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
            self._slot_freed.set()
            # Tell the orchestrator now, not at the next beat: dispatch.lua refuses a
            # draining worker, so nothing new lands in an inbox nobody will read.
            task = asyncio.create_task(self._mark_draining())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.info("worker %s: second stop signal; handing back running tasks now", self.id)
            self._drain_now.set()

    async def _mark_draining(self) -> None:
        try:
            await self.conn.hset(self.keys.worker(self.id), "status", WorkerStatus.DRAINING.value)
        except (RedisError, OSError) as exc:
            log.warning("could not mark worker %s draining: %s", self.id, exc)

    async def register(self) -> None:
        k = self.keys
        try:
            await self.conn.xgroup_create(self.inbox, INBOX_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        now = time.time()
        async with self.conn.pipeline(transaction=True) as pipe:
            pipe.delete(k.worker(self.id))
            pipe.hset(
                k.worker(self.id),
                mapping={
                    "worker_id": self.id,
                    "status": WorkerStatus.IDLE.value,
                    "hostname": self.hardware.hostname,
                    "pid": os.getpid(),
                    "version": __version__,
                    "hardware": json.dumps(self.hardware.to_dict()),
                    "tags": json.dumps(list(self.settings.tags)),
                    "executors": json.dumps(self.executors),
                    "slots": self.settings.slots,
                    "inbox": self.inbox,
                    "cost_per_hour": self.settings.cost_per_hour,
                    "heartbeat_interval": self.settings.heartbeat_interval,
                    "started_at": f"{now:.6f}",
                    "last_seen": f"{now:.6f}",
                    "loaded_models": "[]",
                    "running": 0,
                    "current_tasks": "[]",
                },
            )
            pipe.sadd(k.worker_ids, self.id)
            pipe.set(k.heartbeat(self.id), f"{now:.6f}", ex=self.settings.heartbeat_ttl)
            pipe.xadd(
                k.events,
                {"type": "worker.registered", "worker_id": self.id},
                maxlen=100_000,
                approximate=True,
            )
            await pipe.execute()
        gpus = ", ".join(g.name for g in self.hardware.gpus) or "no GPU"
        log.info(
            "worker %s registered: %g CPUs, %.1f GiB RAM, %s; executors %s; tags %s; %d slots",
            self.id,
            self.hardware.cpu_count,
            self.hardware.memory_total / 2**30,
            gpus,
            ",".join(self.executors) or "none",
            ",".join(self.settings.tags) or "none",
            self.settings.slots,
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
            pipe.hset(
                k.worker(self.id),
                mapping={
                    "status": WorkerStatus.STOPPED.value,
                    "last_seen": f"{time.time():.6f}",
                    "running": 0,
                    "current_tasks": "[]",
                },
            )
            pipe.expire(k.worker(self.id), 86_400)
            pipe.srem(k.worker_ids, self.id)
            pipe.delete(k.heartbeat(self.id))
            pipe.xadd(
                k.events,
                {"type": "worker.stopped", "worker_id": self.id},
                maxlen=100_000,
                approximate=True,
            )
            await pipe.execute()
        await self.conn.delete(self.inbox)  # every entry in it is settled or handed back
        log.info("worker %s deregistered", self.id)

    # -- heartbeats --------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # a beat must never stop for good (NVML, psutil, a bug)
                log.exception("heartbeat failed")

    async def _beat(self) -> None:
        k = self.keys
        now = time.time()
        load = await asyncio.to_thread(sample_load, self.nvml)
        status = (
            WorkerStatus.DRAINING
            if self._stopping.is_set()
            else WorkerStatus.BUSY
            if self.running
            else WorkerStatus.IDLE
        )
        accrued = self.settings.cost_per_hour * (now - self.started_at) / 3600.0
        running = list(self.running.values())
        async with self.conn.pipeline(transaction=False) as pipe:
            pipe.sismember(k.worker_ids, self.id)
            pipe.hset(
                k.worker(self.id),
                mapping={
                    "status": status.value,
                    "last_seen": f"{now:.6f}",
                    "load": json.dumps(load),
                    "running": len(self.running),
                    "current_tasks": json.dumps(sorted(self.running)),
                    "loaded_models": json.dumps(self.host.loaded_models()),
                    "cost_accrued": f"{accrued:.6f}",
                },
            )
            pipe.set(k.heartbeat(self.id), f"{now:.6f}", ex=self.settings.heartbeat_ttl)
            for r in running:
                pipe.hmget(k.task(r.delivery.task_id), ["status", "attempts", "worker_id"])
            replies = await pipe.execute()
        if not replies[0] and not self._stopping.is_set():
            # The orchestrator presumed us dead (no beat within the lease), or Redis lost
            # its data: our tasks were re-placed. Join again as a fresh registration.
            log.warning("worker %s: not registered any more; registering again", self.id)
            await self.register()
        for r, (task_status, attempts, worker_id) in zip(running, replies[3:], strict=True):
            if task_status == TaskStatus.CANCELLED.value:
                self._stop_soon(r, failure("cancelled", "cancelled by request"))
            elif attempts != str(r.delivery.attempt) or worker_id != self.id:
                self._stop_soon(r, failure("superseded", "a newer attempt of this task exists"))

    # -- control notices (cancel) ------------------------------------------------
    async def _control_loop(self) -> None:
        channel = self.keys.control(self.id)
        while True:
            pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    parts = str(message.get("data", "")).split()
                    if len(parts) == 3 and parts[0] == "cancel":
                        r = self.running.get(parts[1])
                        if r is not None and str(r.delivery.attempt) == parts[2]:
                            self._stop_soon(r, failure("cancelled", "cancelled by request"))
            except (RedisError, OSError) as exc:
                log.warning("control channel lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _stop_soon(self, r: Running, info: dict[str, Any]) -> None:
        if r.stop_info is None:
            r.stop_info = info
            task = asyncio.create_task(self._stop(r))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _stop(self, r: Running) -> None:
        """Ask the executor to stop the task; kill its child if it does not within the grace."""
        proc = self.host.procs.get(r.task_type)
        if proc is None:
            return
        # The child may still be starting: wait until the task reaches it (or ends).
        while r.req_id not in proc.in_flight:
            if self.running.get(r.delivery.task_id) is not r:
                return
            await asyncio.sleep(0.05)
        log.info(
            "task %s attempt %d: stopping (%s)",
            r.delivery.task_id,
            r.delivery.attempt,
            (r.stop_info or {}).get("kind"),
        )
        proc.cancel(r.req_id)
        deadline = time.monotonic() + self.settings.cancel_grace
        while r.req_id in proc.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if r.req_id in proc.in_flight:
            proc.kill({r.req_id: r.stop_info or {}})

    # -- inbox -------------------------------------------------------------------
    async def _inbox_loop(self) -> None:
        # First whatever this WORKER_ID was handed and has not acked (an earlier run of it,
        # or reads lost to a Redis error), then new entries only.
        start_id = "0"
        while not self._stopping.is_set():
            free = self.settings.slots - len(self.running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            if self._reread and start_id == ">":
                self._reread = False
                start_id = "0"
            try:
                reply = await self.conn.xreadgroup(
                    INBOX_GROUP, self.id, {self.inbox: start_id}, count=free, block=1000
                )
            except (RedisError, OSError) as exc:
                log.warning("reading inbox %s failed: %s; retrying", self.inbox, exc)
                await asyncio.sleep(1.0)
                start_id = "0"
                continue
            entries = reply[0][1] if reply else []
            if start_id != ">" and not entries:
                start_id = ">"
                continue
            batch: list[Delivery] = []
            for stream_id, fields in entries:
                if not fields:
                    continue  # acked meanwhile
                if fields["task_id"] in self.running:
                    # An attempt of the same task is still ending here (stopped as
                    # superseded, say): come back to this entry when it has.
                    self._reread = True
                    continue
                delivery = Delivery.from_entry(stream_id, fields)
                self.running[delivery.task_id] = Running(delivery)
                batch.append(delivery)
            if start_id != ">" and entries:
                start_id = entries[-1][0]
            if batch:
                await self._start(batch)

    async def _start(self, batch: list[Delivery]) -> None:
        """Mark a batch of deliveries RUNNING (one script call), then run each one."""
        try:
            outcomes = await self.store.start(self.id, [(d.task_id, d.attempt) for d in batch])
        except (RedisError, OSError) as exc:
            # Not started: the entries stay pending and are read again once Redis answers.
            log.warning("cannot start %d task(s) (%s); will read them again", len(batch), exc)
            for d in batch:
                self.running.pop(d.task_id, None)
            self._reread = True
            self._slot_freed.set()
            await asyncio.sleep(0.2)
            return
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
            task = asyncio.create_task(self._handle(delivery), name=delivery.task_id)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if dropped:
            self._slot_freed.set()
            with contextlib.suppress(RedisError, OSError):  # else re-read and dropped again
                await self.conn.xack(self.inbox, INBOX_GROUP, *(d.stream_id for d in dropped))

    async def _drain(self) -> None:
        """Let running tasks finish within the drain timeout; hand back the rest."""
        if not self._tasks:
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
        while self._tasks and not self._drain_now.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(
                {now, *self._tasks}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        now.cancel()
        if self.running:
            log.info("worker %s: handing back %d task(s)", self.id, len(self.running))
            for r in self.running.values():
                r.stop_info = r.stop_info or HANDED_BACK
            self.host.kill_busy(HANDED_BACK)
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # -- one task ----------------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        task_id, attempt = delivery.task_id, delivery.attempt
        r = self.running[task_id]
        try:
            await self._execute(r)
        except Exception as exc:
            # A fault of the worker itself (disk full writing outputs, a bug): record it
            # like a crash so the task is retried rather than left RUNNING here.
            log.exception("task %s attempt %d: worker error", task_id, attempt)
            try:
                await self._record(
                    r,
                    TaskStatus.FAILED,
                    error=failure("worker_error", f"{type(exc).__name__}: {exc}"),
                )
            except Exception:
                log.exception("task %s: could not record the worker error", task_id)
                self._reread = True
        finally:
            self.running.pop(task_id, None)
            self._slot_freed.set()

    async def _execute(self, r: Running) -> None:
        delivery = r.delivery
        task_id, attempt, task_type = delivery.task_id, delivery.attempt, delivery.task_type
        out_dir = self.settings.results_dir / task_id
        t0 = time.monotonic()
        started_at = time.time()
        result_json = ""
        error: dict[str, Any] | None = None
        wrote = False  # the child wrote responses.json for this outcome
        proc = self.host.procs.get(task_type)
        timer = None
        if delivery.timeout:
            timer = asyncio.get_running_loop().call_later(
                delivery.timeout,
                self._stop_soon,
                r,
                failure("timeout", f"ran past timeoutSec={delivery.timeout:g}"),
            )
        log.debug("→ task %s attempt %d %s started", task_id, attempt, task_type)
        try:
            if proc is None:
                raise ExecutorFailure(
                    failure(
                        "permanent",
                        f"worker {self.id} has no executor {task_type!r}",
                        retryable=False,
                    )
                )
            reply = await proc.run(
                Request(
                    req_id=r.req_id,
                    task_id=task_id,
                    attempt=attempt,
                    spec=delivery.spec,
                    output_dir=str(out_dir),
                    worker_id=self.id,
                    task_type=task_type,
                )
            )
            result_json, wrote = reply.result_json or "", reply.wrote
        except ExecutorFailure as exc:
            error, wrote = exc.info, exc.wrote
        finally:
            if timer is not None:
                timer.cancel()
        if r.stop_info is not None:
            # Whatever the executor made of being stopped, the reason we stopped it stands.
            error, result_json, wrote = r.stop_info, "", False
        status = TaskStatus.FAILED if error else TaskStatus.DONE
        elapsed = time.monotonic() - t0
        # A cancelled or superseded attempt must not overwrite the outputs of the live one.
        if not wrote and (error is None or error.get("kind") not in NO_OUTPUTS):
            responses = summary(
                task_id=task_id,
                attempt=attempt,
                worker_id=self.id,
                task_type=task_type,
                started_at=started_at,
                elapsed=elapsed,
                result=json.loads(result_json) if result_json else None,
                error=error,
            )
            await asyncio.to_thread(write_outputs, out_dir, responses)
        uncharged = error is not None and not error.get("charge", True)
        pause = self.settings.failpoints.get("before_settle")
        if pause:
            log.warning("failpoint before_settle: task %s pausing %gs", task_id, pause)
            await asyncio.sleep(pause)
        recorded = await self._record(
            r,
            status,
            result_json=result_json,
            error=error,
            charge=not uncharged,
            immediate=uncharged,
            avoid=not uncharged,
        )
        if not recorded.ok:
            log.warning("task %s attempt %d result ignored: %s", task_id, attempt, recorded.reason)
        elif error:
            log.warning(
                "✗ task %s attempt %d %s %s in %.3fs → %s: %s",
                task_id,
                attempt,
                task_type,
                error.get("kind"),
                elapsed,
                recorded.reason,
                error.get("message"),
            )
        else:
            log.info("✓ task %s attempt %d %s done in %.3fs", task_id, attempt, task_type, elapsed)

    async def _record(self, r: Running, status: TaskStatus, **kwargs: Any) -> Outcome:
        """Record the attempt's end through the settle batcher (one script call for every
        attempt that ended meanwhile); it retries through a Redis outage."""
        ending = Ending(
            r.delivery.task_id,
            r.delivery.attempt,
            status,
            stream_id=r.delivery.stream_id,
            **kwargs,
        )
        return await self._settler.submit(ending)

    async def _settle_batch(self, endings: list[Ending]) -> list[Outcome]:
        """Record a batch of endings, retrying through a Redis outage (results in hand)."""
        delay, deadline = 0.2, time.monotonic() + 600
        while True:
            try:
                return await self.store.settle_many(self.id, endings, inbox=self.inbox)
            except (RedisError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "recording %d outcome(s) failed (%s); retrying in %.1fs",
                    len(endings),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


# Stopped attempts whose outputs belong to another attempt, or to nobody.
NO_OUTPUTS = frozenset({"superseded", "cancelled", "handed_back", "interrupted"})
HANDED_BACK = failure("handed_back", "worker stopping: handed back", charge=False)
