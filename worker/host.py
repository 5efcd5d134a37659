"""Supervises executor child processes: start, hand out tasks, notice crashes, restart.

One child per executor, spawned (not forked) so CUDA and threads start clean.
A crash of the child fails only the tasks it held, as `crash`; the next task
starts a new child. The worker process itself never runs executor code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from flowmesh.errors import failure
from worker.child import Reply, Request, child_main

log = logging.getLogger(__name__)


# A task whose child was killed because of another task (or a hand-back): not its
# fault, so it is re-placed at once and the attempt is not charged.
INTERRUPTED = failure(
    "interrupted",
    "executor process was stopped because of another task; handed back",
    type="ExecutorInterrupted",
    charge=False,
)


class ExecutorFailure(Exception):
    """A task's attempt failed; `info` is the recorded error (kind, message, retryable).
    `wrote`: the child already wrote this failure to responses.json."""

    def __init__(self, info: dict[str, Any], wrote: bool = False):
        self.info = info
        self.wrote = wrote
        super().__init__(f"{info.get('kind')}: {info.get('message')}")


class ExecutorProcess:
    """One child process running one executor; several tasks may be in it at once."""

    def __init__(self, name: str, log_level: str):
        self.name = name
        self.log_level = log_level
        self.health: dict[str, Any] = {}
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
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

    async def ensure_started(self) -> None:
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
            args=(child, self.name, self.log_level),
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

    async def run(self, request: Request) -> Reply:
        """Run one task in the child; raises ExecutorFailure with the recorded error."""
        await self.ensure_started()
        assert self._loop is not None
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[request.req_id] = future
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(request)
        try:
            return await future
        finally:
            self._pending.pop(request.req_id, None)

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch and self._conn is not None:
            # A closed pipe means the child died: its exit handler fails these requests.
            with contextlib.suppress(OSError):
                self._conn.send(("run", batch))

    def cancel(self, req_id: str) -> None:
        """Ask the executor to stop (sets the task's `cancelled` event); it may not listen."""
        if self._conn is not None and req_id in self._pending:
            self._flush()  # the request itself must reach the child before its cancel
            with contextlib.suppress(OSError):
                self._conn.send(("cancel", req_id))

    @property
    def in_flight(self) -> list[str]:
        return list(self._pending)

    def kill(self, reasons: dict[str, dict[str, Any]]) -> None:
        """SIGKILL the child: for hangs, timeouts, cancels that were not heeded, hand-back."""
        if self._proc is not None and self._proc.is_alive():
            self._kill_reasons = {**(self._kill_reasons or {}), **reasons}
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

    def _on_exit(self, proc: BaseProcess) -> None:
        if proc is not self._proc:
            return
        code = proc.exitcode
        reasons, self._kill_reasons = self._kill_reasons, None
        if reasons is None:
            log.warning("executor %s: child %s exited with code %s", self.name, proc.pid, code)
            default = failure(
                "crash",
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
        self.health = {}
        if self._exit_handled is not None:
            self._exit_handled.set()


class ExecutorHost:
    """All executor children of one worker, by executor name."""

    def __init__(self, names: list[str], log_level: str):
        self.procs = {name: ExecutorProcess(name, log_level) for name in names}

    async def start(self) -> None:
        results = await asyncio.gather(
            *(p.ensure_started() for p in self.procs.values()), return_exceptions=True
        )
        for proc, res in zip(self.procs.values(), results, strict=True):
            if isinstance(res, BaseException):
                log.error("executor %s failed to start: %s", proc.name, res)

    def kill_busy(self, info: dict[str, Any]) -> None:
        """Kill every child that holds tasks; each of those tasks fails with `info`."""
        for proc in self.procs.values():
            if proc.in_flight:
                proc.kill(dict.fromkeys(proc.in_flight, info))

    def loaded_models(self) -> list[str]:
        models: list[str] = []
        for proc in self.procs.values():
            models.extend(proc.health.get("loaded_models", []))
        return models

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs.values()))
