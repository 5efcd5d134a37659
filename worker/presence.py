"""The worker's presence: its registration and its heartbeats, from a thread of its own.

The heartbeat thread has its own Redis connection and beats every
HEARTBEAT_INTERVAL_SEC whatever the rest of the worker is doing: executors starting
or loading a model, tasks running, the event loop busy, an executor hung in C code.
So a worker is declared lost only when its process is gone or cut off from Redis.
It also beats at once when an executor becomes ready or fails, so placement learns
of it without waiting an interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from redis.exceptions import RedisError, ResponseError

from flowmesh import workers
from flowmesh.keys import INBOX_GROUP, Keys
from flowmesh.redis_conn import RedisConfig
from flowmesh.workers import WorkerPresence, WorkerRecord

log = logging.getLogger(__name__)


class Presence:
    def __init__(
        self,
        redis_config: RedisConfig,
        keys: Keys,
        record: WorkerRecord,
        *,
        interval: float,
        ttl: int,
        snapshot: Callable[[], WorkerPresence],
        stopping: Callable[[], bool],
    ):
        self.keys = keys
        self.record = record
        self.interval = interval
        self.ttl = ttl
        self._snapshot = snapshot
        self._stopping = stopping
        # Never blocks longer than a beat on a dead connection; redis-py reconnects.
        timeout = max(1.0, interval)
        self._client = redis_config.sync_client(timeout=timeout)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flag_lock = threading.Lock()
        self._executors_changed = False
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        # Seconds between the last two beats that reached Redis, for the log and tests.
        self.last_gap = 0.0
        self._last_beat = 0.0

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def register(self) -> None:
        """Create the inbox and its group, and write a fresh record (blocking)."""
        try:
            self._client.xgroup_create(self.record.inbox, INBOX_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        with self._client.pipeline(transaction=True) as pipe:
            workers.register(pipe, self.keys, self.record, self._snapshot(), self.ttl)
            pipe.execute()
        self._last_beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def nudge(self, executors_changed: bool = False) -> None:
        """Beat now (thread-safe); with `executors_changed` the orchestrator is told."""
        if executors_changed:
            with self._flag_lock:
                self._executors_changed = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        self._client.close()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.beat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # a beat must never stop for good (NVML, psutil, a bug)
                log.exception("heartbeat failed")

    def beat(self) -> None:
        with self._flag_lock:
            changed, self._executors_changed = self._executors_changed, False
        try:
            presence = self._snapshot()
        except Exception:  # a bug or a broken reading must not cost the beat itself
            log.exception("heartbeat: reading the worker's state failed; beating without it")
            presence = None
        try:
            with self._client.pipeline(transaction=False) as pipe:
                workers.beat(
                    pipe, self.keys, self.worker_id, presence, self.ttl, executors_changed=changed
                )
                registered = pipe.execute()[0]
        except BaseException:
            if changed:
                with self._flag_lock:
                    self._executors_changed = True
            raise
        now = time.monotonic()
        self.last_gap, self._last_beat = now - self._last_beat, now
        if self.last_gap > 2 * self.interval:
            log.warning("heartbeat came %.1fs after the previous one", self.last_gap)
        if not registered and not self._stopping():
            # The orchestrator presumed us dead (no beat within the lease), or Redis lost
            # its data: our tasks were re-placed. Join again as a fresh registration; the
            # worker's task watch stops the attempts that were superseded.
            log.warning("worker %s: not registered any more; registering again", self.worker_id)
            self.register()
