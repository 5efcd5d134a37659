"""`flowmesh demo --keep`: says how to point the CLI at it, and a SIGTERM stops all it started."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import wait_until


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.timeout(90)
def test_demo_keep_prints_exports_and_sigterm_stops_every_process(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "FLOWMESH_", "WORKER_", "HEARTBEAT_", "RESULTS_"))
    }
    env.update({"RESULTS_DIR": str(tmp_path / "results"), "PYTHONUNBUFFERED": "1"})
    args = ["demo", "--keep", "--no-inference", "--tasks", "1", "--workers", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowmesh.cli", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def output() -> str:
        while not lines.empty():
            seen.append(lines.get_nowait())
        return "".join(seen)

    tree: list[psutil.Process] = []
    log_dir: Path | None = None
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the demo exited early:\n{output()}")
            return "uv run flowmesh tasks" in output()  # the last line of what it prints

        wait_until(up, timeout=60, interval=0.1, what="the demo to keep its fleet running")
        text = output()
        assert "fleet still running" in text, text
        exported = re.search(r"^\s*export FLOWMESH_URL=(http://127\.0\.0\.1:\d+)\s*$", text, re.M)
        assert exported, text
        url = exported.group(1)
        logs = re.search(r"logs in (\S+)", text)
        assert logs, text
        log_dir = Path(logs.group(1))
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200

        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(_cmdline(p) for p in tree)
        assert "redis-server" in names and "orchestrator.main" in names, names
        assert "worker.main" in names, names

        proc.send_signal(signal.SIGTERM)  # to the demo only, as `kill PID` does
        assert proc.wait(timeout=30) is not None
        wait_until(
            lambda: all(_gone(p) for p in tree),
            timeout=5,
            what="every process the demo started to stop",
        )
        reader.join(timeout=5)
        text = output()
        assert "stopping the fleet" in text, text
        assert log_dir.is_dir(), text
        assert (log_dir / "orchestrator.log").stat().st_size > 0
        assert f"logs kept in {log_dir}" in text, text
    finally:
        # Whatever the outcome, leave nothing running: the demo, then all it had started.
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                tree += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
        proc.wait()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)
