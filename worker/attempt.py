"""One attempt of one task on this worker: devices, the executor, stopping it, recording it.

`Attempts` runs each delivery the inbox started: it assigns the task's GPUs, hands the
task to its executor's child, arms the timeout, stops the task on cancel, timeout,
supersession or hand-back (cooperatively first, then by killing the child after the
grace period), makes sure the attempt's files are final, and records the end through
the settle batcher, which fences out a superseded attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from flowmesh.batch import GroupCommit
from flowmesh.failures import FailureKind, delivery_loss_charged, failure, rule
from flowmesh.spec import GpuRequest
from flowmesh.status import TaskStatus
from flowmesh.store import Delivery, Ending, Outcome, TaskStore
from worker.child import Request
from worker.devices import DeviceAllocator
from worker.hardware import Gpu
from worker.host import ExecutorFailure, ExecutorHost
from worker.outputs import demote, finalise, summary
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# How often a running task's progress is written to Redis at most (the latest wins).
PROGRESS_SEC = 1.0

HANDED_BACK = failure(FailureKind.HANDED_BACK, "worker stopping: handed back", charge=False)


@dataclass
class Attempt:
    delivery: Delivery
    # Why we are stopping it (timeout, cancel, superseded, hand-back), once we are.
    stop_info: dict[str, Any] | None = None
    # The call into the executor host, once made: cancelled by a stop that comes while
    # the task still waits for its executor (starting) or for its own process.
    call: asyncio.Task[Any] | None = None
    # The executor's latest progress not yet written to Redis, and whether a writer runs.
    progress: dict[str, Any] | None = None
    progress_writer: bool = False

    @property
    def req_id(self) -> str:
        return f"{self.delivery.task_id}:{self.delivery.attempt}"

    @property
    def task_type(self) -> str:
        return self.delivery.task_type


def gpu_request(spec_json: str) -> GpuRequest:
    """The task's `resources.hardware.gpu`, read from the stored spec."""
    body = json.loads(spec_json).get("spec", {})
    raw = body.get("resources", {}).get("hardware", {}).get("gpu") or {}
    return GpuRequest.model_validate(raw)


class Attempts:
    def __init__(
        self,
        settings: WorkerSettings,
        store: TaskStore,
        host: ExecutorHost,
        devices: DeviceAllocator,
        on_devices: Callable[[], None],
    ):
        self.settings = settings
        self.store = store
        self.host = host
        self.devices = devices
        self._on_devices = on_devices
        self.worker_id = settings.worker_id
        self.inbox = ""  # set by the worker
        self.running: dict[str, Attempt] = {}
        self.slot_freed = asyncio.Event()
        # Set when an inbox entry was left unread on purpose or by error: the inbox loop
        # then re-reads this consumer's pending entries (id 0) once a slot frees.
        self.reread = False
        # Every coroutine this worker runs for attempts (handles, stops), for the drain.
        self.tasks: set[asyncio.Task[None]] = set()
        # Every attempt that ends while a settle is in flight goes in the next one.
        self._settler = GroupCommit(self._settle_batch)
        # Merged inbox entries (task merge) -> their children here not yet settled.
        self._open: dict[str, set[str]] = {}

    # -- stopping ----------------------------------------------------------------------
    def stop_soon(self, r: Attempt, info: dict[str, Any]) -> None:
        if r.stop_info is None:
            r.stop_info = info
            self.spawn(self._stop(r))

    def stop_now(self, r: Attempt, info: dict[str, Any]) -> None:
        """Drain's last step: a task not yet in a child stops at once; the caller kills
        the children that hold the others."""
        r.stop_info = r.stop_info or info
        proc = self.host.process_of(r.req_id, r.task_type)
        if r.call is not None and (proc is None or r.req_id not in proc.in_flight):
            r.call.cancel()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _stop(self, r: Attempt) -> None:
        """Ask the executor to stop the task; kill its child if it does not within the grace."""
        while True:
            if self.running.get(r.delivery.task_id) is not r:
                return
            proc = self.host.process_of(r.req_id, r.task_type)
            if proc is not None and r.req_id in proc.in_flight:
                break
            if r.call is not None:
                # Not in a child yet (its executor is starting): nothing runs to stop.
                r.call.cancel()
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

    # -- progress ----------------------------------------------------------------------
    def progress(self, req_id: str, fields: dict[str, Any]) -> None:
        """An executor reported progress: the latest is written to the task, at most every
        PROGRESS_SEC, fenced by attempt (a superseded attempt's is refused by Redis)."""
        task_id = req_id.rpartition(":")[0]
        r = self.running.get(task_id)
        if r is None or r.req_id != req_id:
            return
        r.progress = {**fields, "attempt": r.delivery.attempt}
        if not r.progress_writer:
            r.progress_writer = True
            self.spawn(self._write_progress(r))

    async def _write_progress(self, r: Attempt) -> None:
        try:
            while r.progress is not None and self.running.get(r.delivery.task_id) is r:
                await self._last_progress(r)
                await asyncio.sleep(PROGRESS_SEC)
        finally:
            r.progress_writer = False

    async def _last_progress(self, r: Attempt) -> None:
        """Write the report not yet written. Also called right before the end is recorded
        (the writer writes at most every PROGRESS_SEC), so a finished task shows where it
        ended."""
        fields, r.progress = r.progress, None
        if fields is None:
            return
        try:
            await self.store.progress(
                self.worker_id, r.delivery.task_id, r.delivery.attempt, fields
            )
        except RedisError as exc:  # progress is advisory: the next one may land
            log.debug("task %s: progress not written: %s", r.delivery.task_id, exc)

    # -- running -----------------------------------------------------------------------
    async def handle(self, r: Attempt) -> None:
        task_id, attempt = r.delivery.task_id, r.delivery.attempt
        try:
            await self._execute(r)
        except Exception as exc:
            # A fault of the worker itself (disk full writing outputs, a bug): record it
            # like a crash so the task is retried rather than left RUNNING here.
            log.exception("task %s attempt %d: worker error", task_id, attempt)
            try:
                await self.record(
                    r,
                    TaskStatus.FAILED,
                    error=failure(FailureKind.WORKER_ERROR, f"{type(exc).__name__}: {exc}"),
                )
            except Exception:
                log.exception("task %s: could not record the worker error", task_id)
                self.reread = True  # its inbox entry is still pending: read it again
        finally:
            self.running.pop(task_id, None)
            self.slot_freed.set()
            if self.devices.release(r.req_id):
                self._on_devices()

    def _assign(self, r: Attempt) -> tuple[Gpu, ...]:
        """The task's GPUs; a worker without GPUs never gets a GPU task placed on it."""
        if not self.devices.gpus:
            return ()
        want = gpu_request(r.delivery.spec)
        cls = self.host.classes.get(r.task_type)
        share = r.task_type if cls is not None and cls.shares_devices else None
        gpus = self.devices.allocate(r.req_id, want.count, want.type, want.memory or 0, share)
        if gpus is None:
            raise ExecutorFailure(
                failure(
                    FailureKind.INTERRUPTED,
                    f"no free GPU on worker {self.worker_id} for {want.count} GPU(s)",
                    type="NoFreeDevice",
                    charge=False,
                )
            )
        if gpus:
            self._on_devices()
        return gpus

    async def _execute(self, r: Attempt) -> None:
        delivery = r.delivery
        task_id, attempt, task_type = delivery.task_id, delivery.attempt, delivery.task_type
        task_dir = self.settings.results_dir / task_id
        t0 = time.monotonic()
        started_at = time.time()
        result_json = ""
        error: dict[str, Any] | None = None
        wrote = False  # the top-level responses.json is this outcome's
        timer: asyncio.TimerHandle | None = None

        def arm_timeout() -> None:
            # timeoutSec counts from when the executor begins the task, not while it waits
            # behind others for room in its child (max_concurrency).
            nonlocal timer
            if delivery.timeout and timer is None:
                timer = asyncio.get_running_loop().call_later(
                    delivery.timeout,
                    self.stop_soon,
                    r,
                    failure(FailureKind.TIMEOUT, f"ran past timeoutSec={delivery.timeout:g}"),
                )

        log.debug("→ task %s attempt %d %s started", task_id, attempt, task_type)
        try:
            if r.stop_info is not None:  # stopped (drain, cancel) before it could start
                raise ExecutorFailure(r.stop_info)
            self.host.check_ready(task_type)  # before GPUs are given to it
            gpus = self._assign(r)
            request = Request(
                req_id=r.req_id,
                task_id=task_id,
                attempt=attempt,
                spec=delivery.spec,
                task_dir=str(task_dir),
                worker_id=self.worker_id,
                task_type=task_type,
                identity=delivery.identity,
                created_at=delivery.created_at,
            )
            r.call = asyncio.ensure_future(self.host.run(request, gpus, arm_timeout))
            reply = await r.call
            result_json, wrote = reply.result_json or "", reply.wrote
        except ExecutorFailure as exc:
            error, wrote = exc.info, exc.wrote
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if r.stop_info is None or (current is not None and current.cancelling()):
                raise  # we are being cancelled ourselves, not just the call
        finally:
            if timer is not None:
                timer.cancel()
        if r.stop_info is not None:
            # Whatever the executor made of being stopped, the reason we stopped it stands.
            error, result_json = r.stop_info, ""
        status = TaskStatus.FAILED if error else TaskStatus.DONE
        elapsed = time.monotonic() - t0
        if error is not None and (r.stop_info is not None or not wrote):
            # The child did not write this outcome: the worker finalises it (a stop, a
            # crash, a timeout), and a stopped attempt's files leave the top level.
            await asyncio.to_thread(
                self._finalise, task_dir, task_id, attempt, task_type, started_at, elapsed, error
            )
        if (
            error is not None
            and error.get("kind") == FailureKind.CRASH
            and not delivery_loss_charged(bool(delivery.group), delivery.attempt)
        ):
            error = {**error, "charge": False}
        uncharged = error is not None and not error.get("charge", True)
        await self._last_progress(r)
        pause = self.settings.failpoints.get("before_settle")
        if pause:
            log.warning("failpoint before_settle: task %s pausing %gs", task_id, pause)
            await asyncio.sleep(pause)
        recorded = await self.record(
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
            # A newer attempt exists: these files must not stand for the task.
            await asyncio.to_thread(demote, task_dir, attempt)
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
            if error.get("traceback"):
                # Whole, for the operator; the API serves it with the paths trimmed.
                log.warning(
                    "task %s attempt %d traceback:\n%s", task_id, attempt, error["traceback"]
                )
        else:
            log.info("✓ task %s attempt %d %s done in %.3fs", task_id, attempt, task_type, elapsed)

    def _finalise(
        self,
        task_dir: Path,
        task_id: str,
        attempt: int,
        task_type: str,
        started_at: float,
        elapsed: float,
        error: dict[str, Any],
    ) -> None:
        counts = rule(str(error.get("kind"))).keeps_outputs
        if not counts:
            demote(task_dir, attempt)  # the child may have finalised it before the stop
        responses = summary(
            task_id=task_id,
            attempt=attempt,
            worker_id=self.worker_id,
            task_type=task_type,
            started_at=started_at,
            elapsed=elapsed,
            result=None,
            error=error,
        )
        finalise(task_dir, responses, counts=counts)

    # -- recording ---------------------------------------------------------------------
    async def record(self, r: Attempt, status: TaskStatus, **kwargs: Any) -> Outcome:
        """Record the attempt's end through the settle batcher (one script call for every
        attempt that ended meanwhile); it retries through a Redis outage."""
        ending = Ending(
            r.delivery.task_id,
            r.delivery.attempt,
            status,
            stream_id=self.closed(r.delivery),
            **kwargs,
        )
        return await self._settler.submit(ending)

    def opened(self, delivery: Delivery) -> None:
        """Count a child of a merged inbox entry as open here until it is settled."""
        if delivery.group:
            self._open.setdefault(delivery.stream_id, set()).add(delivery.task_id)

    def closed(self, delivery: Delivery) -> str:
        """The inbox entry to ack now that `delivery` ends: its own, or a merged entry's
        once the last of its children here ends ('' before that). An entry acked early
        would not be read again after a crash, and its unsettled children would be lost."""
        if not delivery.group:
            return delivery.stream_id
        still = self._open.get(delivery.stream_id)
        if still is not None:
            still.discard(delivery.task_id)
            if still:
                return ""
            del self._open[delivery.stream_id]
        return delivery.stream_id

    async def _settle_batch(self, endings: list[Ending]) -> list[Outcome]:
        """Record a batch of endings, retrying through a Redis outage (results in hand)."""
        delay, deadline = 0.2, time.monotonic() + 600
        while True:
            try:
                return await self.store.settle_many(self.worker_id, endings, inbox=self.inbox)
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
