"""Idle cost: CPU seconds per minute of an idle worker (default heartbeat and 1 s) and an idle
orchestrator, all measured over the same window on a private Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from flowmesh.embedded import free_port


def _cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def idle_cost(redis_url: str, window: float = 60.0, settle: float = 5.0) -> list[dict[str, Any]]:
    logs = Path(tempfile.mkdtemp(prefix="flowmesh-idle-"))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "RESULTS_DIR": str(logs / "results"),
        "WORKER_EXECUTORS": "echo",
    }
    env.pop("FLOWMESH_API_TOKEN", None)
    specs = [
        (
            "idle worker (HEARTBEAT_INTERVAL_SEC=30, default)",
            ["-m", "worker.main"],
            {"WORKER_ID": "idle-30", "HEARTBEAT_INTERVAL_SEC": "30"},
        ),
        (
            "idle worker (HEARTBEAT_INTERVAL_SEC=1)",
            ["-m", "worker.main"],
            {"WORKER_ID": "idle-1", "HEARTBEAT_INTERVAL_SEC": "1"},
        ),
        (
            "idle orchestrator (3 idle workers registered)",
            ["-m", "orchestrator.main", "--port", str(free_port())],
            {},
        ),
    ]
    procs = []
    try:
        for name, args, extra in specs:
            with (logs / f"{len(procs)}.log").open("ab") as fh:
                procs.append(
                    (
                        name,
                        subprocess.Popen(
                            [sys.executable, *args],
                            env={**env, **extra},
                            stdout=fh,
                            stderr=subprocess.STDOUT,
                        ),
                    )
                )
        time.sleep(settle)  # start-up (imports, child spawn) is not idle cost
        handles = [(name, psutil.Process(p.pid)) for name, p in procs]
        before = [_cpu(h) for _, h in handles]
        time.sleep(window)
        after = [_cpu(h) for _, h in handles]
    finally:
        for _, p in procs:
            p.terminate()
        for _, p in procs:
            p.wait(timeout=20)
    rows = []
    for (name, _), b, a in zip(handles, before, after, strict=True):
        per_min = (a - b) * 60.0 / window
        rows.append(
            {"what": name, "cpu_sec_per_min": per_min, "core_percent": per_min / 60.0 * 100.0}
        )
    return rows
