"""The executor child process: one executor instance, warm between tasks.

Runs in a process spawned by `worker.host`. Its main thread only reads requests
from the pipe; tasks run on a thread pool of the executor's `max_concurrency`.
When the worker dies the pipe closes, the read fails, and the child exits, so
no orphan keeps a GPU busy.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from executors.base import ExecutorError, TaskContext
from executors.registry import load
from flowmesh.errors import failure
from flowmesh.spec import TaskSpec


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
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    try:
        cls = load(executor_name)
        executor = cls()
        executor.setup()
    except Exception as exc:  # reported to the parent, which fails the tasks waiting for it
        send(("setup_failed", describe_failure(exc)))
        return
    send(("ready", executor.health()))

    cancels: dict[str, threading.Event] = {}

    def run_one(req_id: str, payload: dict[str, Any]) -> None:
        """Run one task and always answer, whatever fails (the parent waits for the reply)."""
        try:
            ctx = TaskContext(
                task_id=payload["task_id"],
                attempt=payload["attempt"],
                spec=TaskSpec.model_validate(payload["spec"]),
                output_dir=Path(payload["output_dir"]),
                cancelled=cancels[req_id],
                log=logging.LoggerAdapter(log, {"task_id": payload["task_id"]}),
            )
            reply: tuple[Any, ...] = ("result", req_id, True, executor.run(ctx), safe_health())
        except BaseException as exc:  # every failure goes back to the parent, typed
            reply = ("result", req_id, False, describe_failure(exc), safe_health())
        finally:
            cancels.pop(req_id, None)
        try:
            send(reply)
        except Exception as exc:  # a result that cannot be pickled, say
            send(("result", req_id, False, describe_failure(exc), safe_health()))

    def safe_health() -> dict[str, Any]:
        try:
            return executor.health()
        except Exception:
            log.exception("executor %s: health() failed", executor_name)
            return {}

    with ThreadPoolExecutor(
        max_workers=cls.max_concurrency, thread_name_prefix=f"{executor_name}-task"
    ) as pool:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                # The worker is gone; nobody is left to take the results.
                os._exit(0)
            if message[0] == "run":
                _, req_id, payload = message
                cancels[req_id] = threading.Event()
                pool.submit(run_one, req_id, payload)
            elif message[0] == "cancel":
                event = cancels.get(message[1])
                if event is not None:
                    event.set()
            elif message[0] == "stop":
                break
    executor.close()
