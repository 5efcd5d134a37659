"""The executor child process: one executor instance, warm between tasks.

Runs in a process spawned by `worker.host`. Its main thread only reads requests
from the pipe. A synchronous executor's tasks run on up to `max_concurrency` task
threads (`TaskThreads`); an asynchronous one's are awaited side by side on one event
loop thread, so an engine batches them itself, and a cancel cancels just that
coroutine. A finisher thread writes each task's files and returns the results.
Both directions carry batches: every request the worker had ready in one message,
every result finished meanwhile in one reply (held a few milliseconds for more
while the executor has a backlog), so a busy worker pays one pipe round trip, and
one settle, for many tasks.

The child also finalises each task's files (`worker.outputs.finalise`, in its finisher
thread, right after `run`, before the result goes back), so the worker's event loop
does no file I/O per task; an executor's log lines for a task also go to that
attempt's `logs/executor.log`. When the worker dies the pipe closes, the read
fails, and the child exits, so no orphan keeps a GPU busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar

from executors.base import ExecutorConfig, ExecutorError, TaskContext
from executors.registry import load
from flowmesh.failures import FailureKind, failure
from flowmesh.spec import TaskSpec
from worker.artifacts.checkpoints import TaskCheckpoints
from worker.artifacts.config import ArtifactsConfig
from worker.artifacts.fetch import ArtifactCache
from worker.artifacts.publish import check_destination, final_dirs, publish, wants_http
from worker.outputs import attempt_dir, finalise, summary

# A busy child's replies go back in batches of up to LINGER_BATCH, a finished result
# waiting at most LINGER_SEC for the others (see `collect`).
LINGER_SEC = 0.005
LINGER_BATCH = 32
# How often the child looks for a change in its executor's health to report.
HEALTH_SEC = 1.0


@dataclass(frozen=True)
class Request:
    """One attempt sent to the child. `spec` is the task spec as stored (JSON text)."""

    req_id: str
    task_id: str
    attempt: int
    spec: str
    task_dir: str  # RESULTS_DIR/<task_id>
    worker_id: str
    task_type: str
    devices: tuple[int, ...] = ()  # CUDA ordinals in the child assigned to this task
    # Set when identical tasks may run once (task merge): a request with the identity of
    # one the child holds waits for that one's outcome instead of running again.
    identity: str = ""
    created_at: float | None = None  # when the task was submitted, for its queue wait


@dataclass(frozen=True)
class Reply:
    """The child's answer for one request: the result as JSON text when `ok`, else the
    recorded error; `wrote` says whether responses.json says the same."""

    req_id: str
    ok: bool
    result_json: str | None
    error: dict[str, Any] | None
    wrote: bool  # the top-level responses.json is this attempt's and says the same


@dataclass(frozen=True)
class Finished:
    """A task whose `run` returned, waiting for its outputs to be written."""

    request: Request
    cancelled: threading.Event
    responses: dict[str, Any]
    result_json: str | None
    error: dict[str, Any] | None


@dataclass
class Execution:
    """One run of the executor for every identical request attached to it (task merge).
    The owner's context runs; `cancelled` (what the executor sees) is set only once no
    request is left attached."""

    owner: Request
    attached: list[Request]
    cancelled: threading.Event = field(default_factory=threading.Event)


def shared_result(result: Any, owner: Request) -> Any:
    """An identical request's copy of the owner's result: it says which task ran it."""
    return {**result, "executed_by": owner.task_id} if isinstance(result, dict) else result


def with_queue_wait(result: Any, req: Request, started_at: float) -> Any:
    """A result that reports timings gets the task's queue wait too (submit to start)."""
    if isinstance(result, dict) and isinstance(result.get("timings"), dict) and req.created_at:
        # A twin that joined a run already going waited for nothing: 0, not negative.
        wait = max(0.0, started_at - req.created_at)
        timings = {**result["timings"], "queue_wait_sec": round(wait, 4)}
        return {**result, "timings": timings}
    return result


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """An exception as the worker records it: kind, message, whether a retry can help."""
    kind: str
    if isinstance(exc, ExecutorError):
        kind, retryable = exc.kind, exc.retryable
    elif type(exc).__name__ == "OutOfMemoryError" and "cuda" in type(exc).__module__ + str(exc):
        kind, retryable = FailureKind.CUDA_OOM, True
    else:
        kind, retryable = FailureKind.EXCEPTION, True
    return failure(
        kind,
        str(exc) or type(exc).__name__,
        type=type(exc).__name__,
        retryable=retryable,
        traceback="".join(traceback.format_exception(exc))[-8000:],
    )


T = TypeVar("T")
R = TypeVar("R")


def collect(
    source: queue.SimpleQueue[T | None],
    first: T,
    handle: Callable[[T], R],
    backlog: Callable[[], bool],
    *,
    batch: int = LINGER_BATCH,
    linger_sec: float = LINGER_SEC,
) -> tuple[list[R], bool]:
    """Handle `first` and the items `source` already holds, up to `batch` in all. While
    `backlog()` says more results are on their way, also wait up to `linger_sec` for
    more. Returns what was handled, and whether the end marker (None) was taken.

    The wait makes a busy executor's replies travel as one batch through settle, the
    orchestrator's events, placement and the worker's next inbox read, so each of those
    steps pays its round trip once per batch instead of once per task; an idle
    executor's result goes back at once. The cap keeps part of a deep backlog in the
    child while a batch is away, so the executor does not run dry waiting for the
    refill that batch's freed slots bring."""
    out, deadline = [handle(first)], 0.0
    while len(out) < batch:
        try:
            item = source.get_nowait()
        except queue.Empty:
            if not backlog():
                break
            now = time.monotonic()
            deadline = deadline or now + linger_sec
            try:
                item = source.get(timeout=max(deadline - now, 0.0))
            except queue.Empty:
                break
        if item is None:
            return out, True
        out.append(handle(item))
    return out, False


class TaskThreads(Generic[T]):
    """Up to `size` threads running `target` on items from one queue, started only as the
    backlog needs them. Per task this is a queue put and get and two uncontended locks;
    ThreadPoolExecutor also built a Future with its condition variable and notified it,
    about 10 us of the child's GIL per task, which nothing here waits on."""

    def __init__(self, size: int, target: Callable[[T], None], name: str):
        self._queue: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._size, self._target, self._name = size, target, name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0  # threads that finished an item and will take the next one

    def submit(self, item: T) -> None:
        self._queue.put(item)
        with self._lock:
            if self._idle:
                self._idle -= 1
                return
            if len(self._threads) >= self._size:
                return
            thread = threading.Thread(
                target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._target(item)
            with self._lock:
                self._idle += 1

    def join(self) -> None:
        """Run everything already submitted, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


# The request whose code is running in this thread or coroutine: log records made
# meanwhile, by the executor or the libraries it calls, go to that attempt's log file.
_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar("task", default=None)


class TaskLogs(logging.Handler):
    """Writes each record made while a task runs to `attempts/<n>/logs/executor.log` of
    that task. The file is opened on the first line, so a quiet task creates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self._files: dict[str, Any] = {}
        # Tasks running now. A background task an executor started from a task inherits
        # its context, and may log after that task ended: those lines stay out of its files.
        self._live: set[str] = set()
        self._lock_files = threading.Lock()

    def open_task(self, req_id: str) -> None:
        with self._lock_files:
            self._live.add(req_id)

    def emit(self, record: logging.LogRecord) -> None:
        req = _current.get()
        if req is None or req.req_id not in self._live:
            return
        try:
            line = self.format(record) + "\n"
            with self._lock_files:
                if req.req_id not in self._live:
                    return
                fh = self._files.get(req.req_id)
                if fh is None:
                    logs = attempt_dir(req.task_dir, req.attempt) / "logs"
                    logs.mkdir(parents=True, exist_ok=True)
                    fh = self._files[req.req_id] = open(  # noqa: SIM115 - kept open per task
                        logs / "executor.log", "a", encoding="utf-8"
                    )
                fh.write(line)
                fh.flush()
        except Exception:
            self.handleError(record)

    def close_task(self, req_id: str) -> None:
        with self._lock_files:
            self._live.discard(req_id)
            fh = self._files.pop(req_id, None)
        if fh is not None:
            fh.close()


class AsyncRunner:
    """Runs an async executor's tasks as coroutines on one event loop thread; a cancel
    cancels just that task's coroutine (waiting for a turn or running). The coroutines
    take a turn from `slot` (up to `max_concurrency` at once) themselves, so a task
    cancelled while it waits still answers."""

    def __init__(self, limit: int, name: str):
        self._loop = asyncio.new_event_loop()
        self._limit = limit
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._semaphore: asyncio.Semaphore | None = None

    @property
    def slot(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # made on the loop's own thread
            self._semaphore = asyncio.Semaphore(self._limit)
        return self._semaphore

    def submit(self, req_id: str, make: Callable[[], Any]) -> None:
        self._loop.call_soon_threadsafe(self._start, req_id, make)

    def _start(self, req_id: str, make: Callable[[], Any]) -> None:
        task = self._loop.create_task(make())
        self._tasks[req_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(req_id, None))

    def cancel(self, req_id: str) -> None:
        self._loop.call_soon_threadsafe(self._cancel, req_id)

    def _cancel(self, req_id: str) -> None:
        task = self._tasks.get(req_id)
        if task is not None:
            task.cancel()

    def join(self) -> None:
        """Wait for every submitted task, then stop the loop."""

        async def drain() -> None:
            while self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)

        asyncio.run_coroutine_threadsafe(drain(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def _result_or_error(result: Any) -> tuple[str | None, dict[str, Any] | None]:
    try:
        return json.dumps(result), None  # what cannot be stored fails here
    except (TypeError, ValueError) as exc:
        return None, failure(
            FailureKind.BAD_RESULT,
            f"executor returned a result that is not JSON: {exc}",
            retryable=False,
        )


def child_main(
    conn: Connection,
    executor_name: str,
    log_level: str,
    config: ExecutorConfig,
    cuda_visible: str | None,
    artifacts: ArtifactsConfig | None = None,
) -> None:
    # A Ctrl-C or SIGTERM sent to the whole process group (a terminal, `timeout`, a
    # container runtime) is for the worker, which drains and then stops us itself; dying
    # here at once would fail the running tasks instead of letting them finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A process group of its own, so a kill takes whatever it started with it (a launcher
    # such as torchrun and its workers) and no GPU is left held by an orphan.
    os.setpgrp()
    # The worker starts this process as a daemon (it must not outlive the worker), and
    # multiprocessing lets no daemon start processes of its own; an engine (vLLM's engine
    # core) or a launcher (torchrun) must. What this process starts goes with it anyway:
    # it kills its process group when the worker goes.
    multiprocessing.current_process().daemon = False
    if cuda_visible is not None:
        # Before the executor (and torch) is imported: CUDA reads it once, at its start.
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    fmt = f"%(asctime)s %(levelname)-7s executor[{executor_name}] %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    task_logs = TaskLogs()
    task_logs.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.getLogger().addHandler(task_logs)
    log = logging.getLogger(f"executors.{executor_name}")

    try:
        cls = load(executor_name)
        executor = cls()
        executor.setup(config)
    except Exception as exc:  # reported to the parent, which fails the tasks waiting for it
        conn.send(("setup_failed", describe_failure(exc)))
        return

    def safe_health() -> dict[str, Any]:
        try:
            return executor.health()
        except Exception:
            log.exception("executor %s: health() failed", executor_name)
            return {}

    sending = threading.Lock()  # the finisher and the health reporter share the pipe

    def send(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    def report_health() -> None:
        """Send health when it changes (a model starts or ends loading, requests come and
        go), at most every HEALTH_SEC, so the worker record shows it between results."""
        last = None
        while True:
            time.sleep(HEALTH_SEC)
            current = safe_health()
            if current != last:
                last = current
                try:
                    send(("health", current))
                except (OSError, ValueError):
                    return

    send(("ready", safe_health()))
    threading.Thread(target=report_health, name="health", daemon=True).start()
    cancels: dict[str, threading.Event] = {}
    queued: dict[str, Request] = {}  # every request not yet answered
    finished: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()

    # Identical requests (task merge): identity -> the execution serving them, and each
    # attached request's execution. Guarded by `shared`.
    executions: dict[str, Execution] = {}
    execution_of: dict[str, Execution] = {}
    shared = threading.Lock()
    handed: set[str] = set()  # requests whose outcome went to the finisher

    cache = ArtifactCache(artifacts.fetch) if artifacts is not None else None

    def context(req: Request) -> TaskContext:
        spec = TaskSpec.model_validate_json(req.spec)
        ex = execution_of.get(req.req_id)
        task_log = logging.LoggerAdapter(log, {"task_id": req.task_id, "attempt": req.attempt})
        ctx = TaskContext(
            task_id=req.task_id,
            attempt=req.attempt,
            spec=spec,
            work_dir=attempt_dir(req.task_dir, req.attempt),
            options=cls.parse_options(spec.spec),
            devices=req.devices,
            cancelled=ex.cancelled if ex is not None else cancels[req.req_id],
            log=task_log,
            report=functools.partial(report_progress, req.req_id),
        )
        if artifacts is not None and cache is not None:
            check_destination(ctx, artifacts)
            ctx.resolve = cache.resolve
            ctx.checkpoints = TaskCheckpoints(
                task_id=req.task_id,
                attempt=req.attempt,
                task_dir=Path(req.task_dir),
                upload=wants_http(ctx),
                config=artifacts,
                cache=cache,
                log=task_log,
            )
        return ctx

    def report_progress(req_id: str, fields: dict[str, Any]) -> None:
        # A closed pipe: the worker is gone, and the result will not be taken either.
        with contextlib.suppress(OSError, ValueError):
            send(("progress", req_id, fields))

    def published(req: Request, ctx: TaskContext, result: Any) -> Any:
        """The result with the run's final directories archived (and uploaded)."""
        if artifacts is None:
            return result
        return publish(ctx, result, artifacts, Path(req.task_dir), cache)

    def hand_over(req: Request, started_at: float, t0: float, result: Any, error: Any) -> None:
        """Give the finisher a task's outcome, whatever it is; once per request."""
        with shared:
            if req.req_id in handed or req.req_id not in cancels:
                return
            handed.add(req.req_id)
        if error is None:
            result = with_queue_wait(result, req, started_at)
        result_json = None
        if error is None:
            result_json, error = _result_or_error(result)
            if error is not None:
                result = None
        responses = summary(
            task_id=req.task_id,
            attempt=req.attempt,
            worker_id=req.worker_id,
            task_type=req.task_type,
            started_at=started_at,
            elapsed=time.monotonic() - t0,
            result=result,
            error=error,
        )
        finished.put(Finished(req, cancels[req.req_id], responses, result_json, error))

    def attach(req: Request) -> bool:
        """Attach a request to the execution of an identical one; False: it runs itself
        (and owns a new execution when it has an identity)."""
        if not req.identity:
            return False
        with shared:
            ex = executions.get(req.identity)
            if ex is not None:
                ex.attached.append(req)
                execution_of[req.req_id] = ex
                return True
            ex = executions[req.identity] = Execution(req, [req])
            execution_of[req.req_id] = ex
            return False

    def deliver(req: Request, started_at: float, t0: float, result: Any, error: Any) -> None:
        """The outcome of `req`'s run, to it and to every request still attached."""
        ex = execution_of.get(req.req_id)
        if ex is None:
            hand_over(req, started_at, t0, result, error)
            return
        with shared:
            if executions.get(req.identity) is ex:
                del executions[req.identity]
            waiting = list(ex.attached)
            for r in [ex.owner, *waiting]:
                execution_of.pop(r.req_id, None)
        for r in waiting:
            outcome = result if r is ex.owner else shared_result(result, ex.owner)
            hand_over(r, started_at, t0, outcome, error)

    def detach(req_id: str) -> bool:
        """A cancel of an attached request. Answers it at once unless it is the owner with
        nobody else attached: that one stops like any task (returns False). The execution
        is stopped once nobody is left attached."""
        with shared:
            ex = execution_of.get(req_id)
            if ex is None:
                return False
            others = [r for r in ex.attached if r.req_id != req_id]
            if not others and ex.owner.req_id == req_id:
                # The owner alone: it stops as an unshared task would, and answers itself.
                ex.cancelled.set()
                execution_of.pop(req_id, None)
                if executions.get(ex.owner.identity) is ex:
                    del executions[ex.owner.identity]
                return False
            req = next((r for r in ex.attached if r.req_id == req_id), None)
            if req is None:  # answered already (a second cancel of a detached owner)
                return True
            ex.attached = others
            if req is not ex.owner:  # the owner's run still finds its execution
                execution_of.pop(req_id, None)
            if not others:
                ex.cancelled.set()
                if executions.get(ex.owner.identity) is ex:
                    del executions[ex.owner.identity]
        error = failure(FailureKind.CANCELLED, "stopped by the worker")
        hand_over(req, time.time(), time.monotonic(), None, error)
        if not others and runner is not None:
            runner.cancel(ex.owner.req_id)
        return True

    # Sync tasks wait in the threads' queue for a free thread; one cancelled meanwhile is
    # answered at once by the main thread (never run), so its stop needs no kill.
    started: set[str] = set()
    answered: set[str] = set()
    turns = threading.Lock()

    def stopped_before_start(req: Request) -> None:
        with turns:
            if req.req_id in started or req.req_id in answered:
                return
            answered.add(req.req_id)
        error = failure(FailureKind.CANCELLED, "stopped by the worker before it started")
        hand_over(req, time.time(), time.monotonic(), None, error)

    def run_one(req: Request) -> None:
        """Run one task on this thread."""
        with turns:
            if req.req_id in answered:
                answered.discard(req.req_id)
                return
            started.add(req.req_id)
        started_at, t0 = time.time(), time.monotonic()
        result: Any = None
        error: dict[str, Any] | None = None
        token = _current.set(req)
        task_logs.open_task(req.req_id)
        try:
            ctx = context(req)
            result = published(req, ctx, executor.run(ctx))
        except BaseException as exc:  # every failure goes back to the parent, typed
            error = describe_failure(exc)
        finally:
            _current.reset(token)
            with turns:
                started.discard(req.req_id)
        deliver(req, started_at, t0, result, error)

    async def arun_one(req: Request) -> None:
        """Await one task on the event loop; a cancel cancels just this coroutine."""
        started_at, t0 = time.time(), time.monotonic()
        result: Any = None
        error: dict[str, Any] | None = None
        _current.set(req)  # this coroutine's own context
        assert runner is not None
        try:
            async with runner.slot:
                task_logs.open_task(req.req_id)
                ctx = context(req)
                result = await executor.arun(ctx)
                if final_dirs(ctx):  # off the event loop: archiving takes a while
                    result = await asyncio.to_thread(published, req, ctx, result)
        except asyncio.CancelledError as exc:
            ex = execution_of.get(req.req_id)
            stop = ex.cancelled if ex is not None else cancels.get(req.req_id)
            if stop is not None and stop.is_set():
                error = failure(FailureKind.CANCELLED, "stopped by the worker")
            else:  # the executor's own cancellation, not a stop: a failure like any other
                error = describe_failure(exc)
        except BaseException as exc:
            error = describe_failure(exc)
        deliver(req, started_at, t0, result, error)

    def finish(done: Finished) -> Reply:
        task_logs.close_task(done.request.req_id)
        queued.pop(done.request.req_id, None)
        result_json, error = done.result_json, done.error
        wrote = False
        try:
            # A stopped attempt (timeout, cancel, superseded) is finalised by the worker,
            # which knows why it stopped it; its files never replace the live attempt's.
            if not done.cancelled.is_set():
                wrote = finalise(done.request.task_dir, done.responses, counts=True)
        except Exception as exc:  # disk full, say: a fault of the worker, retried
            error = failure(FailureKind.WORKER_ERROR, f"writing outputs failed: {exc}")
            result_json = None
        cancels.pop(done.request.req_id, None)
        with shared:  # last: until cancels forgets it, a late hand-over is refused here
            handed.discard(done.request.req_id)
        return Reply(done.request.req_id, error is None, result_json, error, wrote)

    def finisher() -> None:
        """Finalise finished tasks one after another (file creation in one directory
        from many threads at once costs the kernel twice as much) and send their
        replies in batches, with health once per batch (see `collect`)."""
        while True:
            first = finished.get()
            if first is None:
                return
            replies, stop = collect(
                finished, first, finish, backlog=lambda: len(cancels) > cls.max_concurrency
            )
            send(("results", replies, safe_health()))
            if stop:
                return

    sender = threading.Thread(target=finisher, name="finisher", daemon=True)
    sender.start()
    runner: AsyncRunner | None = None
    pool: TaskThreads[Request] | None = None
    if cls.is_async():
        runner = AsyncRunner(cls.max_concurrency, f"{executor_name}-loop")
    else:
        pool = TaskThreads(cls.max_concurrency, run_one, f"{executor_name}-task")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            # The worker is gone; nobody is left to take the results. Take the processes
            # this one started along.
            os.killpg(0, signal.SIGKILL)
        if message[0] == "run":
            for req in message[1]:
                cancels[req.req_id] = threading.Event()
                queued[req.req_id] = req
                if attach(req):
                    continue  # an identical request is running: its outcome is ours too
                if runner is not None:
                    runner.submit(req.req_id, functools.partial(arun_one, req))
                else:
                    assert pool is not None
                    pool.submit(req)
        elif message[0] == "cancel":
            event = cancels.get(message[1])
            if event is not None:
                event.set()
            if event is not None and not detach(message[1]):
                if runner is not None:
                    runner.cancel(message[1])
                elif message[1] in queued:
                    stopped_before_start(queued[message[1]])
        elif message[0] == "stop":
            break
    if runner is not None:
        runner.join()
    if pool is not None:
        pool.join()
    finished.put(None)
    sender.join()
    executor.close()
