"""The executor child process: one executor instance, warm between tasks.

Runs in a process spawned by `worker.host`. Its main thread only reads requests
from the pipe; tasks run on up to `max_concurrency` task threads (`TaskThreads`),
and a finisher thread returns their results. Both directions carry batches: every
request the worker had ready in one message, every result finished meanwhile in
one reply (held a few milliseconds for more while the executor has a backlog), so
a busy worker pays one pipe round trip, and one settle, for many tasks.

The child also writes each task's `responses.json` and `manifest.json` (in its
finisher thread, right after `run`, before the result goes back), so the worker's
event loop does no file I/O per task. When the worker dies the pipe closes, the read
fails, and the child exits, so no orphan keeps a GPU busy.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar

from executors.base import ExecutorError, TaskContext
from executors.registry import load
from flowmesh.errors import failure
from flowmesh.spec import TaskSpec
from worker.outputs import summary, write_outputs

# A busy child's replies go back in batches of up to LINGER_BATCH, a finished result
# waiting at most LINGER_SEC for the others (see `collect`).
LINGER_SEC = 0.005
LINGER_BATCH = 32


@dataclass(frozen=True)
class Request:
    """One attempt sent to the child. `spec` is the task spec as stored (JSON text)."""

    req_id: str
    task_id: str
    attempt: int
    spec: str
    output_dir: str
    worker_id: str
    task_type: str


@dataclass(frozen=True)
class Reply:
    """The child's answer for one request: the result as JSON text when `ok`, else the
    recorded error; `wrote` says whether responses.json says the same."""

    req_id: str
    ok: bool
    result_json: str | None
    error: dict[str, Any] | None
    wrote: bool


@dataclass(frozen=True)
class Finished:
    """A task whose `run` returned, waiting for its outputs to be written."""

    request: Request
    cancelled: threading.Event
    responses: dict[str, Any]
    result_json: str | None
    error: dict[str, Any] | None


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """An exception as the worker records it: kind, message, whether a retry can help."""
    if isinstance(exc, ExecutorError):
        kind, retryable = exc.kind, exc.retryable
    elif type(exc).__name__ == "OutOfMemoryError" and "cuda" in type(exc).__module__ + str(exc):
        kind, retryable = "cuda_oom", True
    else:
        kind, retryable = "exception", True
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


def child_main(conn: Connection, executor_name: str, log_level: str) -> None:
    # A Ctrl-C or SIGTERM sent to the whole process group (a terminal, `timeout`, a
    # container runtime) is for the worker, which drains and then stops us itself; dying
    # here at once would fail the running tasks instead of letting them finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)-7s executor[{executor_name}] %(name)s: %(message)s",
    )
    log = logging.getLogger("worker.child")

    try:
        cls = load(executor_name)
        executor = cls()
        executor.setup()
    except Exception as exc:  # reported to the parent, which fails the tasks waiting for it
        conn.send(("setup_failed", describe_failure(exc)))
        return

    def safe_health() -> dict[str, Any]:
        try:
            return executor.health()
        except Exception:
            log.exception("executor %s: health() failed", executor_name)
            return {}

    conn.send(("ready", safe_health()))

    cancels: dict[str, threading.Event] = {}
    finished: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()

    def run_one(req: Request) -> None:
        """Run one task and always hand it to the finisher, whatever fails."""
        cancelled = cancels[req.req_id]
        started_at, t0 = time.time(), time.monotonic()
        result: Any = None
        result_json: str | None = None
        error: dict[str, Any] | None = None
        try:
            ctx = TaskContext(
                task_id=req.task_id,
                attempt=req.attempt,
                spec=TaskSpec.model_validate_json(req.spec),
                output_dir=Path(req.output_dir),
                cancelled=cancelled,
                log=logging.LoggerAdapter(log, {"task_id": req.task_id}),
            )
            result = executor.run(ctx)
            try:
                result_json = json.dumps(result)  # what cannot be stored fails here
            except (TypeError, ValueError) as exc:
                result, error = (
                    None,
                    failure(
                        "bad_result",
                        f"executor returned a result that is not JSON: {exc}",
                        retryable=False,
                    ),
                )
        except BaseException as exc:  # every failure goes back to the parent, typed
            error = describe_failure(exc)
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
        finished.put(Finished(req, cancelled, responses, result_json, error))

    def finish(done: Finished) -> Reply:
        wrote = False
        result_json, error = done.result_json, done.error
        # A stopped attempt (timeout, cancel, superseded) is recorded by the worker, which
        # knows why it stopped it; it must not overwrite the live attempt's outputs.
        if not done.cancelled.is_set():
            try:
                write_outputs(done.request.output_dir, done.responses)
                wrote = True
            except Exception as exc:  # disk full, say: a fault of the worker, retried
                error = failure("worker_error", f"writing outputs failed: {exc}")
                result_json = None
        cancels.pop(done.request.req_id, None)
        return Reply(done.request.req_id, error is None, result_json, error, wrote)

    def finisher() -> None:
        """Write the outputs of finished tasks one after another (file creation in one
        directory from many threads at once costs the kernel twice as much) and send
        their replies in batches, with health once per batch (see `collect`)."""
        while True:
            first = finished.get()
            if first is None:
                return
            replies, stop = collect(
                finished, first, finish, backlog=lambda: len(cancels) > cls.max_concurrency
            )
            conn.send(("results", replies, safe_health()))
            if stop:
                return

    sender = threading.Thread(target=finisher, name="finisher", daemon=True)
    sender.start()
    pool = TaskThreads(cls.max_concurrency, run_one, f"{executor_name}-task")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            # The worker is gone; nobody is left to take the results.
            os._exit(0)
        if message[0] == "run":
            for req in message[1]:
                cancels[req.req_id] = threading.Event()
                pool.submit(req)
        elif message[0] == "cancel":
            event = cancels.get(message[1])
            if event is not None:
                event.set()
        elif message[0] == "stop":
            break
    pool.join()
    finished.put(None)
    sender.join()
    executor.close()
