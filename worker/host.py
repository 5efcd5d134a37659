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
import uuid
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from worker.child import child_main

log = logging.getLogger(__name__)


class ExecutorFailure(Exception):
    """A task's attempt failed; `info` is the recorded error (kind, message, retryable)."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
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
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    async def ensure_started(self) -> None:
        if self._ready is not None and not self._ready.done():
            await self._ready
            return
        if self._ready is not None and self._ready.exception() is None and self.alive:
            return
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
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

    async def run(self, task_id: str, attempt: int, spec: dict[str, Any], output_dir: str) -> Any:
        await self.ensure_started()
        assert self._loop is not None and self._conn is not None
        req_id = uuid.uuid4().hex
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[req_id] = future
        payload = {"task_id": task_id, "attempt": attempt, "spec": spec, "output_dir": output_dir}
        try:
            self._conn.send(("run", req_id, payload))
            return await future
        finally:
            self._pending.pop(req_id, None)

    def kill(self) -> None:
        """Stop the child at once (SIGKILL): for hangs, timeouts and cancels."""
        if self._proc is not None and self._proc.is_alive():
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
        elif kind == "result":
            _, req_id, ok, payload, health = message
            self.health = health
            future = self._pending.get(req_id)
            if future is not None and not future.done():
                if ok:
                    future.set_result(payload)
                else:
                    future.set_exception(ExecutorFailure(payload))

    def _on_exit(self, proc: BaseProcess) -> None:
        if proc is not self._proc:
            return
        code = proc.exitcode
        log.warning("executor %s: child process %s exited with code %s", self.name, proc.pid, code)
        info = {
            "kind": "crash",
            "type": "ExecutorCrashed",
            "message": f"executor {self.name!r} process exited with code {code}",
            "retryable": True,
        }
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ExecutorFailure(info))
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(ExecutorFailure(info))
        self._proc = None
        self._conn = None
        self._ready = None
        self.health = {}


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

    def loaded_models(self) -> list[str]:
        models: list[str] = []
        for proc in self.procs.values():
            models.extend(proc.health.get("loaded_models", []))
        return models

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs.values()))
