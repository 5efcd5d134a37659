"""Supervises executor child processes: start, hand out tasks, notice crashes, restart.

Children are spawned (not forked) so CUDA and threads start clean. An executor with
`isolation = "shared"` gets one warm child, started in the background when the worker
starts and started again when it dies; its state (starting, ready, failed with why) is
what the worker's record shows and what placement waits for. An executor with
`isolation = "task"` gets a fresh child per task, given only that task's GPUs, so its
memory goes back to the system when the task ends. A crash of a child fails only the
tasks it held, as `crash`. The worker process itself never runs executor code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from executors.base import Executor, ExecutorConfig
from flowmesh.failures import FailureKind, failure
from flowmesh.status import ExecutorState
from flowmesh.workers import ExecutorStatus
from worker.artifacts.config import ArtifactsConfig
from worker.child import Reply, Request, child_main
from worker.devices import cuda_visible_devices
from worker.hardware import Gpu

log = logging.getLogger(__name__)


# A task whose child was killed because of another task (or a hand-back): not its
# fault, so it is re-placed at once and the attempt is not charged.
INTERRUPTED = failure(
    FailureKind.INTERRUPTED,
    "executor process was stopped because of another task; handed back",
    type="ExecutorInterrupted",
    charge=False,
)
# Setup is retried with this backoff (doubling) while it keeps failing, and a child that
# dies within STABLE_SEC of becoming ready is restarted after the same backoff.
SETUP_RETRY_SEC = (5.0, 300.0)
STABLE_SEC = 30.0


class ExecutorFailure(Exception):
    """A task's attempt failed; `info` is the recorded error (kind, message, retryable).
    `wrote`: the child already wrote this failure to the top-level responses.json."""

    def __init__(self, info: dict[str, Any], wrote: bool = False):
        self.info = info
        self.wrote = wrote
        super().__init__(f"{info.get('kind')}: {info.get('message')}")


def _not_ready(name: str, why: str) -> ExecutorFailure:
    """The task reached an executor that could not start: not the task's fault, so it is
    re-placed at once, uncharged, on a worker whose executor is ready."""
    return ExecutorFailure(
        failure(
            FailureKind.EXECUTOR_FAILED,
            f"executor {name!r} is not available on this worker: {why}",
            type="ExecutorNotReady",
            charge=False,
        )
    )


class ExecutorProcess:
    """One child process running one executor; several tasks may be in it at once."""

    def __init__(
        self,
        name: str,
        log_level: str,
        config: ExecutorConfig,
        cuda_visible: str | None = None,
        on_state: Callable[[], None] | None = None,
        on_progress: Callable[[str, dict[str, Any]], None] | None = None,
        artifacts: ArtifactsConfig | None = None,
        concurrency: int = 1,
    ):
        self.name = name
        self.artifacts = artifacts
        # Tasks the child runs at once (its executor's max_concurrency); the rest it was
        # sent wait in its queue, in the order sent.
        self.concurrency = concurrency
        self._on_progress = on_progress
        self.log_level = log_level
        self.config = config
        self.cuda_visible = cuda_visible
        self.health: dict[str, Any] = {}
        # Model loads reported by this executor's children that have exited (a child
        # reports its own count in its health, `model_loads`).
        self._loads_before = 0
        self.status = ExecutorStatus(ExecutorState.STARTING, time.time())
        self._on_state = on_state
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        # The child runs sent tasks first come, first served, up to `concurrency` at once:
        # those it has room for, and those still waiting (with what to call when they get
        # room). Worked out here from the replies, so no message per start is needed.
        self._room: set[str] = set()
        self._waiting: dict[str, Callable[[], None] | None] = {}
        # Requests not yet sent: everything queued in one event-loop turn goes in one message.
        self._outbox: list[Request] = []
        # Set by the reader thread as soon as the pipe closes (the child is gone), so a
        # new task never waits on a dead child; cheaper than waitpid per task.
        self._eof = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when we kill the child on purpose: the error each request gets, by request id;
        # requests not named were bystanders and get INTERRUPTED (not the task's fault).
        self._kill_reasons: dict[str, dict[str, Any]] | None = None
        # Set once the last child's exit has been handled (its tasks failed over).
        self._exit_handled: asyncio.Event | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._eof

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def set_state(self, state: ExecutorState, reason: str | None = None) -> None:
        if state is self.status.state and reason == self.status.reason:
            return
        self.status = ExecutorStatus(state, time.time(), reason)
        if state is ExecutorState.FAILED:
            log.error("executor %s failed to start: %s", self.name, reason)
        else:
            log.info("executor %s %s", self.name, state.value)
        if self._on_state is not None:
            self._on_state()

    async def ensure_started(self) -> None:
        """Start the child unless it runs or is starting; returns once it is ready."""
        if self._ready is not None and not self._ready.done():
            await self._ready
            return
        if self._ready is not None and self._ready.exception() is None and self.alive:
            return
        if self._proc is not None and self._exit_handled is not None:
            # The child died and its reader has not yet failed its tasks: a new child
            # must not take over before they are settled, or they would hang.
            await self._exit_handled.wait()
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._exit_handled = asyncio.Event()
        self._kill_reasons = None
        self._eof = False
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(
            target=child_main,
            args=(
                child,
                self.name,
                self.log_level,
                self.config,
                self.cuda_visible,
                self.artifacts,
            ),
            name=f"flowmesh-executor-{self.name}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        threading.Thread(
            target=self._read, args=(parent, proc), daemon=True, name=f"executor-{self.name}-reader"
        ).start()
        log.info("executor %s: child process %s started", self.name, proc.pid)
        await self._ready

    def check_ready(self) -> None:
        """ExecutorFailure (uncharged, re-placed at once) unless the supervised child is
        ready now. A task never waits here for a start or a restart that may take minutes
        (a model load) or never end: placement waits for `ready` instead, on any worker."""
        if self.status.state is ExecutorState.READY and self.alive:
            return
        why = self.status.reason if self.status.state is ExecutorState.FAILED else None
        raise _not_ready(self.name, why or f"it is {self.status.state.value}")

    async def exited(self) -> None:
        """Until the current child has exited and its tasks have been failed over."""
        if self._exit_handled is not None:
            await self._exit_handled.wait()

    async def run(self, request: Request, on_start: Callable[[], None] | None = None) -> Reply:
        """Run one task in the (started) child; raises ExecutorFailure with the error.

        `on_start` is called once the child has room for the task (at once, or when a
        task sent before it has been answered): when it begins rather than waits."""
        assert self._loop is not None
        req_id = request.req_id
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[req_id] = future
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(request)
        if len(self._room) < self.concurrency:
            self._room.add(req_id)
            if on_start is not None:
                on_start()
        else:
            self._waiting[req_id] = on_start
        try:
            return await future
        finally:
            self._pending.pop(req_id, None)
            self._answered(req_id)

    def _answered(self, req_id: str) -> None:
        """The child is done with this task: the next one waiting gets its room."""
        self._waiting.pop(req_id, None)
        if req_id not in self._room:
            return
        self._room.discard(req_id)
        while self._waiting and len(self._room) < self.concurrency:
            next_id, on_start = next(iter(self._waiting.items()))
            del self._waiting[next_id]
            self._room.add(next_id)
            if on_start is not None:
                on_start()

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch and self._conn is not None:
            # A closed pipe means the child died: its exit handler fails these requests.
            with contextlib.suppress(OSError):
                self._conn.send(("run", batch))

    def cancel(self, req_id: str) -> None:
        """Ask the executor to stop the task (sets its `cancelled` event; an async
        executor's coroutine is cancelled); it may not listen."""
        if self._conn is not None and req_id in self._pending:
            self._flush()  # the request itself must reach the child before its cancel
            with contextlib.suppress(OSError):
                self._conn.send(("cancel", req_id))

    @property
    def in_flight(self) -> list[str]:
        return list(self._pending)

    @property
    def model_loads(self) -> int:
        """Models this executor's children loaded since the worker started."""
        return self._loads_before + _loads(self.health)

    def kill(self, reasons: dict[str, dict[str, Any]]) -> None:
        """SIGKILL the child and every process it started (its own process group: a
        launcher's workers, say): for hangs, timeouts, unheeded cancels, hand-back."""
        if self._proc is not None and self._proc.is_alive():
            self._kill_reasons = {**(self._kill_reasons or {}), **reasons}
            try:
                os.killpg(self._proc.pid or 0, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self._proc.kill()

    async def stop(self, timeout: float = 5.0) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        if proc.is_alive():
            with contextlib.suppress(OSError):
                conn.send(("stop",))
            await asyncio.to_thread(proc.join, timeout)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 1.0)

    # -- called from the reader thread through the event loop -------------------
    def _read(self, conn: Connection, proc: BaseProcess) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            loop.call_soon_threadsafe(self._on_message, message)
        if self._conn is conn:
            self._eof = True
        proc.join(5.0)
        loop.call_soon_threadsafe(self._on_exit, proc)

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            self.health = message[1]
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "setup_failed":
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(ExecutorFailure(message[1]))
        elif kind == "health":
            self.health = message[1]
        elif kind == "progress":
            if self._on_progress is not None and message[1] in self._pending:
                self._on_progress(message[1], message[2])
        elif kind == "results":
            _, replies, health = message
            self.health = health
            for reply in replies:
                future = self._pending.get(reply.req_id)
                if future is None or future.done():
                    continue
                if reply.ok:
                    future.set_result(reply)
                else:
                    future.set_exception(ExecutorFailure(reply.error or {}, wrote=reply.wrote))
                self._answered(reply.req_id)

    def _on_exit(self, proc: BaseProcess) -> None:
        if proc is not self._proc:
            return
        code = proc.exitcode
        reasons, self._kill_reasons = self._kill_reasons, None
        if reasons is None:
            if self._ready is not None and self._ready.done():
                log.warning("executor %s: child %s exited with code %s", self.name, proc.pid, code)
            default = failure(
                FailureKind.CRASH,
                f"executor {self.name!r} process exited with code {code}",
                type="ExecutorCrashed",
            )
        else:
            log.info("executor %s: child %s killed on purpose", self.name, proc.pid)
            default = INTERRUPTED
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ExecutorFailure(default))
        for req_id, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(ExecutorFailure((reasons or {}).get(req_id, default)))
        self._proc = None
        self._conn = None
        self._ready = None
        self._outbox = []
        self._room.clear()  # its tasks have all failed: none waits for room any more
        self._waiting.clear()
        self._loads_before += _loads(self.health)
        self.health = {}
        if self._exit_handled is not None:
            self._exit_handled.set()


class ExecutorHost:
    """All executor children of one worker, by executor name.

    `gpus` are the worker's usable GPUs (WORKER_GPUS applied); a shared child sees all of
    them (CUDA ordinal i is gpus[i]), a per-task child only the task's own.
    """

    def __init__(
        self,
        executors: dict[str, type[Executor]],
        *,
        worker_id: str,
        log_level: str,
        gpus: list[Gpu],
        gpus_known: bool,
        max_warm_models: int,
        on_change: Callable[[], None] | None = None,
        on_progress: Callable[[str, dict[str, Any]], None] | None = None,
        artifacts: ArtifactsConfig | None = None,
    ):
        self.classes = executors
        self.on_progress = on_progress
        self.artifacts = artifacts
        self.worker_id = worker_id
        self.log_level = log_level
        self.gpus = gpus
        # Without NVML we do not know the GPUs, so CUDA_VISIBLE_DEVICES is left as it is.
        self.gpus_known = gpus_known
        self.max_warm_models = max_warm_models
        self.procs: dict[str, ExecutorProcess] = {}
        self._isolated: dict[str, ExecutorProcess] = {}  # req_id -> its own child
        # Model loads of per-task children that are gone, by executor.
        self._isolated_loads: Counter[str] = Counter()
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        all_gpus = cuda_visible_devices(gpus) if gpus_known else None
        for name, cls in executors.items():
            if cls.isolation == "shared":
                config = ExecutorConfig(
                    worker_id, tuple(range(len(gpus))), max_warm_models=max_warm_models
                )
                self.procs[name] = ExecutorProcess(
                    name,
                    log_level,
                    config,
                    all_gpus,
                    on_state=on_change,
                    on_progress=on_progress,
                    artifacts=artifacts,
                    concurrency=cls.max_concurrency,
                )

    def start(self) -> None:
        """Start every shared child in the background; states report their progress."""
        for proc in self.procs.values():
            self._supervisors.append(
                asyncio.create_task(self._supervise(proc), name=f"supervise-{proc.name}")
            )

    async def _supervise(self, proc: ExecutorProcess) -> None:
        """Keep one warm child running: start it, restart it when it dies, retry a failed
        setup with backoff (the reason stays visible in the worker's record meanwhile)."""
        delay = SETUP_RETRY_SEC[0]
        while not self._stopping:
            proc.set_state(ExecutorState.STARTING)
            try:
                await proc.ensure_started()
            except ExecutorFailure as exc:
                if self._stopping:
                    return
                proc.set_state(ExecutorState.FAILED, str(exc.info.get("message") or exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, SETUP_RETRY_SEC[1])
                continue
            proc.set_state(ExecutorState.READY)
            ready_at = time.monotonic()
            await proc.exited()
            if time.monotonic() - ready_at < STABLE_SEC and not self._stopping:
                # Died soon after it started (a crash on every first task, say): back off
                # rather than restart in a tight loop.
                proc.set_state(ExecutorState.STARTING, "restarting after a crash")
                await asyncio.sleep(delay)
                delay = min(delay * 2, SETUP_RETRY_SEC[1])
            else:
                delay = SETUP_RETRY_SEC[0]

    def states(self) -> dict[str, ExecutorStatus]:
        out = {name: p.status for name, p in self.procs.items()}
        ready = ExecutorStatus(ExecutorState.READY, 0.0)
        for name, cls in self.classes.items():
            if cls.isolation == "task":
                out[name] = ready  # nothing to start: each task gets a fresh process
        return out

    def isolated(self, name: str) -> bool:
        return self.classes[name].isolation == "task"

    def check_ready(self, name: str) -> None:
        """ExecutorFailure unless a task for `name` can start here now."""
        if name not in self.classes:
            raise ExecutorFailure(
                failure(
                    FailureKind.PERMANENT,
                    f"worker {self.worker_id} has no executor {name!r}",
                    retryable=False,
                )
            )
        if not self.isolated(name):
            self.procs[name].check_ready()

    async def run(
        self,
        request: Request,
        gpus: tuple[Gpu, ...],
        on_start: Callable[[], None] | None = None,
    ) -> Reply:
        """Run one task in its executor's child; raises ExecutorFailure. `on_start` is
        called when the task begins: when its shared child has room for it (tasks beyond
        the executor's max_concurrency wait their turn there), or before a child of its
        own starts (its setup counts as the task's)."""
        name = request.task_type
        self.check_ready(name)
        if not self.isolated(name):
            proc = self.procs[name]
            ordinals = tuple(self.gpus.index(g) for g in gpus)
            return await proc.run(_with_devices(request, ordinals), on_start)
        if on_start is not None:
            on_start()
        config = ExecutorConfig(
            self.worker_id, tuple(range(len(gpus))), max_warm_models=self.max_warm_models
        )
        visible = cuda_visible_devices(gpus) if self.gpus_known else None
        proc = ExecutorProcess(
            name,
            self.log_level,
            config,
            visible,
            on_progress=self.on_progress,
            artifacts=self.artifacts,
        )
        self._isolated[request.req_id] = proc
        try:
            try:
                await proc.ensure_started()
            except ExecutorFailure as exc:
                # The task's own process failed its setup: the task fails as it would.
                raise ExecutorFailure(exc.info) from None
            return await proc.run(_with_devices(request, config.devices))
        finally:
            # Even when the call is cancelled (a stop): the process must be gone before
            # its GPUs are given to anyone else.
            await asyncio.shield(proc.stop())
            self._isolated.pop(request.req_id, None)
            self._isolated_loads[name] += proc.model_loads

    def process_of(self, req_id: str, name: str) -> ExecutorProcess | None:
        """The child that holds (or will hold) this request."""
        return self._isolated.get(req_id) or self.procs.get(name)

    def kill_busy(self, info: dict[str, Any]) -> None:
        """Kill every child that holds tasks; each of those tasks fails with `info`."""
        for proc in [*self.procs.values(), *self._isolated.values()]:
            if proc.in_flight:
                proc.kill(dict.fromkeys(proc.in_flight, info))

    def loaded_models(self, key: str = "loaded_models") -> list[str]:
        """Models the warm executors hold (`loading_models`: are loading), from their
        last health report."""
        models: list[str] = []
        for proc in self.procs.values():
            models.extend(proc.health.get(key, []))
        return models

    def model_loads(self) -> dict[str, int]:
        """Per executor, the models its children loaded since the worker started (each
        executor counts its own loads; one that counts none reports 0), for the worker
        record and the orchestrator's `flowmesh_model_loads_total`."""
        out: Counter[str] = Counter(self._isolated_loads)
        for proc in [*self.procs.values(), *self._isolated.values()]:
            out[proc.name] += proc.model_loads
        return {name: n for name, n in sorted(out.items()) if n}

    def engines(self) -> dict[str, Any]:
        """Per executor, what its engines last reported (state, requests running, batch
        capacity), for the worker record."""
        return {n: p.health["engine"] for n, p in self.procs.items() if p.health.get("engine")}

    async def stop(self) -> None:
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in [*self.procs.values(), *self._isolated.values()]))


def _loads(health: dict[str, Any]) -> int:
    """The model loads a child's health report counts (0 when it counts none)."""
    try:
        return max(int(health.get("model_loads") or 0), 0)
    except (TypeError, ValueError):
        return 0


def _with_devices(request: Request, devices: tuple[int, ...]) -> Request:
    if request.devices == devices:
        return request
    return Request(**{**request.__dict__, "devices": devices})
