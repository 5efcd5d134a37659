"""One fleet for every vLLM test: a private Redis, an orchestrator and a worker that offers
`vllm`, serving a tiny random-weight Llama. An engine takes 20-100 s to start on a couple of
cores, so the fleet, and the engine it keeps warm, live for the whole session.

Runs in the vLLM environment only (`.venv-vllm`, see .ci/run); the test modules that need
it skip elsewhere. Building the fleet imports nothing heavy until a test asks for it.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from flowmesh.embedded import EmbeddedRedis, free_port
from tests.conftest import Orchestrator, Proc, _env, _spawn, wait_until

# Tests ask for these engine options, so that they all share one engine (an engine is
# started per model and options). Eager mode: compiling the model would take minutes here.
ENGINE = {"enforce_eager": True, "max_model_len": 16384}
MODEL_MAX_LEN = 16384


@dataclass
class Fleet:
    orchestrator: Orchestrator
    worker: Proc
    worker_id: str
    model: Path
    results: Path
    rdb: redis.Redis

    def spec(self, items: list[Any], *, model: str | None = None, **options: Any) -> dict:
        """A vLLM inference task on the fleet's model; `spec_` options go to `spec`."""
        body = {
            k.removeprefix("spec_"): options.pop(k) for k in list(options) if k.startswith("spec_")
        }
        return {
            "metadata": {"name": "vllm-test"},
            "spec": {
                "taskType": "inference",
                "model": {
                    "source": {"identifier": model or str(self.model)},
                    "engine": "vllm",
                    "vllm": dict(ENGINE),
                    **body.pop("model", {}),
                },
                "data": {"type": "list", "items": items},
                "inference": {"max_tokens": 8, "temperature": 0, **options},
                **body,
            },
        }

    def run(self, spec: dict, timeout: float = 120) -> dict[str, Any]:
        (task_id,) = self.orchestrator.submit(spec)
        return self.wait(task_id, timeout=timeout)

    def task(self, task_id: str) -> dict[str, Any] | None:
        """The task, or None while the API answers 503 (Redis did not answer in time: on a
        small machine kept busy by the engine, Redis has been seen to stall for seconds)."""
        r = self.orchestrator.http.get(f"/api/v1/tasks/{task_id}")
        if r.status_code == 503:
            return None
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(self, task_id: str, timeout: float = 120) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if task and task["status"] in ("DONE", "FAILED", "CANCELLED") else None

        return dict(wait_until(finished, timeout=timeout, interval=0.1, what=f"task {task_id}"))

    def engines(self) -> dict[str, Any]:
        """What the worker's vLLM executor last reported of its engines, per model."""
        raw = self.rdb.hget(f"worker:{self.worker_id}", "engines")
        return dict(json.loads(raw or "{}").get("vllm", {}))


@pytest.fixture(scope="session")
def tiny_llama_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowmesh.tiny_models import build_tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny-llama-64"
    return build_tiny_llama(path, chat_template=True, head_dim=64, max_positions=MODEL_MAX_LEN)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_llama_64: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("vllm-fleet")
    logs = root / "logs"
    with EmbeddedRedis() as server:
        port = free_port()
        proc, log_path = _spawn(
            "orchestrator",
            ["-m", "orchestrator.main", "--port", str(port)],
            _env({"REDIS_URL": server.url, "SCHEDULER_REFRESH_SEC": "0.2"}),
            logs,
        )
        orch = Orchestrator("orchestrator", proc, log_path, url=f"http://127.0.0.1:{port}")
        worker_env = {
            "REDIS_URL": server.url,
            "WORKER_ID": "vllm-1",
            "HEARTBEAT_INTERVAL_SEC": "3",
            "RESULTS_DIR": str(root / "results"),
            "WORKER_EXECUTORS": "vllm",
            # The CPU backend's KV cache; it would otherwise take a share of the RAM.
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "MAX_WARM_MODELS": "2",
            # Adapters by URL come from the tests' own HTTP server on loopback.
            "ARTIFACT_ALLOWED_HOSTS": "127.0.0.1",
            "ARTIFACT_CACHE_DIR": str(root / "artifact-cache"),
            "HOME": str(root / "home"),
        }
        # The engine keeps both cores of a small CI machine busy while it generates; at a
        # lower priority its worker still beats, and Redis and the orchestrator answer.
        niced = [
            "-c",
            "import os, runpy; os.nice(10); runpy.run_module('worker.main', run_name='__main__')",
        ]
        wproc, wlog = _spawn("worker-vllm-1", niced, _env(worker_env), logs)
        worker = Proc("vllm-1", wproc, wlog)
        rdb = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=60)
        fleet = Fleet(orch, worker, "vllm-1", tiny_llama_64, root / "results", rdb)
        try:

            def ready() -> bool:
                for p in (orch, worker):
                    if not p.alive():
                        raise AssertionError(f"{p.name} exited:\n{p.log()}")
                states = json.loads(rdb.hget("worker:vllm-1", "executor_states") or "{}")
                if states.get("vllm", {}).get("state") == "failed":
                    raise AssertionError(f"the vllm executor failed: {states}\n{worker.log()}")
                if states.get("vllm", {}).get("state") != "ready":
                    return False
                # The executor may be ready before the orchestrator listens: wait for both.
                try:
                    return orch.http.get("/healthz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, timeout=120, interval=0.2, what="the vllm executor to be ready")
            yield fleet
        finally:
            orch.http.close()
            worker.stop(timeout=60)
            orch.stop()
            rdb.close()


@pytest.fixture(scope="session")
def first_task(fleet: Fleet) -> dict[str, Any]:
    """The session's first task: it starts the engine that every other test finds warm."""
    return fleet.run(fleet.spec(["the quick brown fox", "hello world"]), timeout=280)


@pytest.fixture
def serve_directory() -> Iterator[Any]:
    """Serve a directory over HTTP on loopback; returns its URL and the paths asked for."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(directory: Path) -> tuple[str, list[str]]:
        requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
