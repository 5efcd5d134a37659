"""The worker's life: register, beat, read its inbox, run each task in an executor child.

Delivery: the orchestrator XADDs each attempt to this worker's inbox stream; we
read it through a consumer group and ack it only in the same Lua step that
records the result (`TaskStore.finish`), so a crash at any point leaves the entry
pending rather than lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from flowmesh import __version__
from flowmesh.keys import INBOX_GROUP, Keys
from flowmesh.status import TaskStatus, WorkerStatus
from flowmesh.store import Delivery, TaskStore
from worker.hardware import Hardware, Nvml, detect, sample_load
from worker.host import ExecutorFailure, ExecutorHost
from worker.outputs import write_outputs
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Running:
    delivery: Delivery
    started: float = field(default_factory=time.monotonic)


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
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------
    async def run(self) -> None:
        await self.register()
        await self.host.start()
        await self._beat()  # publish warm executors and loaded models right away
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        try:
            await self._inbox_loop()
            await self._drain()
        finally:
            beat.cancel()
            await self.host.stop()
            await self.deregister()

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("worker %s: stopping; no new tasks will be taken", self.id)
            self._stopping.set()
            self._slot_freed.set()

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
        pending = await self.conn.xpending(self.inbox, INBOX_GROUP)
        if not pending["pending"]:
            await self.conn.delete(self.inbox)
        log.info("worker %s deregistered", self.id)

    # -- heartbeats --------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)

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
        async with self.conn.pipeline(transaction=False) as pipe:
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
            await pipe.execute()

    # -- inbox -------------------------------------------------------------------
    async def _inbox_loop(self) -> None:
        # First whatever an earlier run of this WORKER_ID was handed and never acked,
        # then new entries only.
        start_id = "0"
        while not self._stopping.is_set():
            free = self.settings.slots - len(self.running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                reply = await self.conn.xreadgroup(
                    INBOX_GROUP, self.id, {self.inbox: start_id}, count=free, block=1000
                )
            except (RedisError, OSError) as exc:
                log.warning("reading inbox %s failed: %s; retrying", self.inbox, exc)
                await asyncio.sleep(1.0)
                continue
            entries = reply[0][1] if reply else []
            if start_id == "0" and not entries:
                start_id = ">"
                continue
            for stream_id, fields in entries:
                if not fields:  # acked meanwhile: XREADGROUP returns the id with no fields
                    continue
                delivery = Delivery(
                    stream_id=stream_id,
                    task_id=fields["task_id"],
                    attempt=int(fields["attempt"]),
                    spec=json.loads(fields["spec"]),
                )
                self.running[delivery.task_id] = Running(delivery)
                task = asyncio.create_task(self._handle(delivery), name=delivery.task_id)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if start_id == "0" and entries:
                start_id = entries[-1][0]

    async def _drain(self) -> None:
        if self._tasks:
            log.info("worker %s: waiting for %d running task(s)", self.id, len(self._tasks))
            await asyncio.wait(set(self._tasks))

    # -- one task ----------------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        task_id, attempt = delivery.task_id, delivery.attempt
        try:
            started = await self.store.start(task_id, attempt, self.id)
            if not started.ok:
                log.warning("task %s attempt %d dropped: %s", task_id, attempt, started.reason)
                await self.conn.xack(self.inbox, INBOX_GROUP, delivery.stream_id)
                return
            await self._execute(delivery)
        except Exception:
            log.exception("task %s attempt %d: worker error", task_id, attempt)
        finally:
            self.running.pop(task_id, None)
            self._slot_freed.set()

    async def _execute(self, delivery: Delivery) -> None:
        task_id, attempt = delivery.task_id, delivery.attempt
        task_type = delivery.spec["spec"]["taskType"]
        out_dir = self.settings.results_dir / task_id
        t0 = time.monotonic()
        started_at = time.time()
        result: Any = None
        error: dict[str, Any] | None = None
        proc = self.host.procs.get(task_type)
        log.info("→ task %s attempt %d %s started", task_id, attempt, task_type)
        try:
            if proc is None:
                raise ExecutorFailure(
                    {
                        "kind": "permanent",
                        "type": "UnknownExecutor",
                        "retryable": False,
                        "message": f"worker {self.id} has no executor {task_type!r}",
                    }
                )
            result = await proc.run(task_id, attempt, delivery.spec, str(out_dir))
            json.dumps(result)  # what cannot be stored must fail here, not in Redis
        except ExecutorFailure as exc:
            error = exc.info
        except (TypeError, ValueError) as exc:
            error = {
                "kind": "bad_result",
                "type": type(exc).__name__,
                "retryable": False,
                "message": f"executor returned a result that is not JSON: {exc}",
            }
        status = TaskStatus.FAILED if error else TaskStatus.DONE
        elapsed = time.monotonic() - t0
        responses = {
            "task_id": task_id,
            "attempt": attempt,
            "worker_id": self.id,
            "task_type": task_type,
            "status": status.value,
            "started_at": started_at,
            "finished_at": time.time(),
            "elapsed_sec": elapsed,
            "result": result,
            "error": error,
        }
        await asyncio.to_thread(write_outputs, out_dir, responses)
        recorded = await self.store.finish(
            delivery, self.id, self.inbox, status, result=result, error=error
        )
        if not recorded.ok:
            log.warning("task %s attempt %d result ignored: %s", task_id, attempt, recorded.reason)
        elif error:
            log.warning(
                "✗ task %s attempt %d %s failed in %.3fs: %s: %s",
                task_id,
                attempt,
                task_type,
                elapsed,
                error.get("kind"),
                error.get("message"),
            )
        else:
            log.info("✓ task %s attempt %d %s done in %.3fs", task_id, attempt, task_type, elapsed)
