"""`flowmesh scale`: a local scaler. Starts worker processes on this host when the
orchestrator reports a backlog, and drains and stops them when the fleet has been idle.

It reads what an autoscaler would (`flowmesh_backlog_tasks` from `GET /metrics`) and acts
through the same doors as an operator: a worker process started with `python -m
worker.main`, stopped with `POST /api/v1/workers/{id}/drain` (it finishes or hands back
its tasks, deregisters and exits: nothing is lost). Workers it did not start are never
touched. Without Kubernetes, this is the one-host version of KEDA scaling worker pods.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from flowmesh.client import ApiError, Client


@dataclass
class Managed:
    worker_id: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float
    draining: bool = False


@dataclass
class LocalScaler:
    client: Client
    console: Console
    min_workers: int
    max_workers: int
    slots: int
    idle_sec: float
    log_dir: Path
    prefix: str = field(default_factory=lambda: f"{socket.gethostname()}-scale")
    env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, Managed] = field(default_factory=dict)
    _count: int = 0
    _idle_since: float | None = None

    # -- reading the fleet ---------------------------------------------------------
    def backlog(self) -> int:
        text = self.client.metrics()
        return int(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "flowmesh_backlog_tasks"
                for sample in family.samples
            )
        )

    def running_tasks(self) -> int:
        """Tasks running on the workers this scaler started."""
        rows = {w["worker_id"]: w for w in self.client.workers()}
        return sum(int(rows.get(wid, {}).get("running") or 0) for wid in self.workers)

    # -- acting --------------------------------------------------------------------
    def start_one(self) -> None:
        self._count += 1
        worker_id = f"{self.prefix}-{self._count}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{worker_id}.log").open("ab")
        env = {**os.environ, **self.env, "WORKER_ID": worker_id}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.main"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.workers[worker_id] = Managed(worker_id, proc, log, time.monotonic())
        self.console.print(f"scale: started worker {worker_id} (pid {proc.pid})")

    def drain_one(self) -> None:
        live = [m for m in self.workers.values() if not m.draining]
        if not live:
            return
        newest = max(live, key=lambda m: m.started)
        try:
            self.client.worker_action(newest.worker_id, "drain")
        except ApiError as exc:  # not registered yet, or gone: stop the process itself
            self.console.print(f"scale: drain {newest.worker_id}: {exc}; sending SIGTERM")
            newest.proc.send_signal(signal.SIGTERM)
        newest.draining = True
        self.console.print(f"scale: draining worker {newest.worker_id}")

    def reap(self) -> None:
        for worker_id, m in list(self.workers.items()):
            code = m.proc.poll()
            if code is None:
                continue
            m.log.close()
            del self.workers[worker_id]
            how = "stopped" if m.draining else "exited unexpectedly"
            self.console.print(f"scale: worker {worker_id} {how} (exit code {code})")

    # -- the loop ------------------------------------------------------------------
    def step(self, now: float) -> None:
        self.reap()
        active = [m for m in self.workers.values() if not m.draining]
        backlog = self.backlog()
        if len(active) < self.min_workers:
            for _ in range(self.min_workers - len(active)):
                self.start_one()
            return
        if backlog > 0:
            self._idle_since = None
            wanted = min(self.max_workers, len(active) + math.ceil(backlog / self.slots))
            for _ in range(wanted - len(active)):
                self.start_one()
            return
        if len(active) <= self.min_workers or self.running_tasks() > 0:
            self._idle_since = None
            return
        self._idle_since = self._idle_since or now
        if now - self._idle_since >= self.idle_sec:
            self.drain_one()
            self._idle_since = now  # one at a time, an idle period apart

    def stop(self, timeout: float) -> None:
        """Drain every worker this scaler started and wait for them to exit."""
        for m in self.workers.values():
            if not m.draining:
                try:
                    self.client.worker_action(m.worker_id, "drain")
                except (ApiError, OSError):
                    m.proc.send_signal(signal.SIGTERM)
                m.draining = True
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.2)
        for m in self.workers.values():
            m.proc.kill()
        self.reap()


def run(scaler: LocalScaler, interval: float, stop_timeout: float) -> int:
    stopping: list[Any] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    scaler.console.print(
        f"scale: {scaler.min_workers}-{scaler.max_workers} worker(s) on this host, "
        f"{scaler.slots} slot(s) each; idle {scaler.idle_sec:g} s before a drain"
    )
    while not stopping:
        try:
            scaler.step(time.monotonic())
        except (OSError, ApiError) as exc:
            scaler.console.print(f"scale: orchestrator unreachable ({exc}); retrying")
        time.sleep(interval)
    scaler.console.print("scale: stopping; draining the workers it started")
    scaler.stop(stop_timeout)
    return 0
