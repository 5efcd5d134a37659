"""Fixtures: a real Redis server started by the suite, real orchestrator and worker processes.

The Redis server is private to the test session (a free port, no persistence),
so flushing it between tests touches nobody else's data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from flowmesh.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent

# For test files that train (`pytestmark = TRAINING_TIMEOUT`): up to ~1 min a test alone,
# about twice that beside another test file (CI runs two at once, pytest -n 2); the
# suite-wide 120 s would cut them off.
TRAINING_TIMEOUT = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; a second SIGTERM after 3 s (a worker then hands back at once); SIGKILL last."""
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGTERM, timeout)):
            if not self.alive():
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        return self.proc.returncode


@dataclass
class Orchestrator(Proc):
    url: str = ""
    token: str | None = None
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def submit(self, *specs: dict[str, Any]) -> list[str]:
        body: Any = specs[0] if len(specs) == 1 else list(specs)
        r = self.http.post("/api/v1/tasks", json=body)
        assert r.status_code == 201, r.text
        return [t["task_id"] for t in r.json()["tasks"]]

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/tasks/{task_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(
        self,
        task_id: str,
        statuses: tuple[str, ...] = ("DONE", "FAILED", "CANCELLED"),
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        return dict(
            wait_until(
                lambda: (t := self.task(task_id))["status"] in statuses and t,
                timeout=timeout,
                what=f"task {task_id} to reach {statuses}",
            )
        )


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WORKER_", "FLOWMESH_", "REDIS_", "HEARTBEAT_", "RESULTS_"))
    }
    env.update({"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1"})
    env.update(extra)
    return env


def _spawn(
    name: str, args: list[str], env: dict[str, str], log_dir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    fh = log_path.open("ab")
    # Each in its own session, like a real service: a signal to its process group (a
    # terminal's Ctrl-C) then reaches it and its children, never pytest.
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    fh.close()
    return proc, log_path


@pytest.fixture
def start_orchestrator(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Orchestrator]]:
    started: list[Orchestrator] = []

    def start(token: str | None = None, **env: str) -> Orchestrator:
        port = free_port()
        extra = {"REDIS_URL": redis_url, "SCHEDULER_REFRESH_SEC": "0.2", **env}
        if token:
            extra["FLOWMESH_API_TOKEN"] = token
        proc, log_path = _spawn(
            f"orchestrator-{len(started)}",
            ["-m", "orchestrator.main", "--port", str(port)],
            _env(extra),
            tmp_path / "logs",
        )
        orch = Orchestrator(
            name="orchestrator",
            proc=proc,
            log_path=log_path,
            url=f"http://127.0.0.1:{port}",
            token=token,
        )
        started.append(orch)

        def healthy() -> bool:
            if not orch.alive():
                raise AssertionError(f"orchestrator exited:\n{orch.log()}")
            try:
                return httpx.get(f"{orch.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        # 60 s, not 30: in CI the vLLM suite starts its engines beside this one on two
        # cores, and one orchestrator once took over 30 s to import and bind there.
        wait_until(healthy, timeout=60, what="orchestrator /healthz")
        return orch

    yield start
    for orch in started:
        orch.http.close()
        orch.stop()


@pytest.fixture
def orchestrator(start_orchestrator: Callable[..., Orchestrator]) -> Orchestrator:
    return start_orchestrator()


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path, rdb: redis.Redis) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(worker_id: str | None = None, *, wait: bool = True, **env: str) -> Proc:
        worker_id = worker_id or f"w{len(started) + 1}"
        extra = {
            "REDIS_URL": redis_url,
            "WORKER_ID": worker_id,
            "HEARTBEAT_INTERVAL_SEC": "0.5",
            "RESULTS_DIR": str(tmp_path / "results"),
            "WORKER_EXECUTORS": "echo",
            **env,
        }
        proc, log_path = _spawn(
            f"worker-{worker_id}", ["-m", "worker.main"], _env(extra), tmp_path / "logs"
        )
        handle = Proc(name=worker_id, proc=proc, log_path=log_path)
        started.append(handle)
        prefix = env.get("REDIS_KEY_PREFIX", "")
        if wait:

            def ready() -> bool:
                if not handle.alive():
                    raise AssertionError(f"worker {worker_id} exited:\n{handle.log()}")
                if not rdb.sismember(f"{prefix}workers:ids", worker_id):
                    return False
                # Registered at once; ready when no executor is still starting.
                states = json.loads(
                    rdb.hget(f"{prefix}worker:{worker_id}", "executor_states") or "{}"
                )
                return bool(states) and all(s["state"] != "starting" for s in states.values())

            wait_until(ready, timeout=30, what=f"worker {worker_id} to register")
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def install_plugin(tmp_path: Path) -> Callable[[str, str, dict[str, str]], str]:
    """Install a third-party executor package as pip would leave it: a module and its
    `flowmesh.executors` entry points, on a directory to put on PYTHONPATH (returned)."""

    def install(module: str, source: str, executors: dict[str, str]) -> str:
        root = tmp_path / f"plugin-{module}"
        root.mkdir()
        (root / f"{module}.py").write_text(source)
        dist = root / f"{module}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        lines = "".join(f"{name} = {module}:{cls}\n" for name, cls in executors.items())
        (dist / "entry_points.txt").write_text("[flowmesh.executors]\n" + lines)
        return str(root)

    return install
