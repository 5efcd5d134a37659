"""`flowmesh demo`: a whole local fleet in one command, with no Redis installed.

Starts an embedded Redis (unless REDIS_URL is set), an orchestrator and local
worker processes, submits example tasks, shows their progress live, prints
where the results are, and stops everything again.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console

from flowmesh.client import Client
from flowmesh.config import env_str, environ
from flowmesh.embedded import EmbeddedRedis, free_port
from flowmesh.progress import watch


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, *args], env=env, stdout=fh, stderr=subprocess.STDOUT
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(
    predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]], logs: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a fleet process exited while waiting for {what}; see {logs}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; see {logs}")
        time.sleep(0.1)


def _example_specs(
    args: argparse.Namespace, console: Console, scratch: Path
) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = [
        {
            "apiVersion": "flowmesh/v1",
            "kind": "Task",
            "metadata": {"name": f"echo-{i}"},
            "spec": {
                "taskType": "echo",
                "echo": {"message": f"hello from task {i}", "delaySec": 0.3 + 0.2 * (i % 5)},
            },
        }
        for i in range(args.tasks)
    ]
    if args.no_inference:
        return specs
    model = args.model
    if model is None:
        if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "tokenizers")):
            console.print(
                "[yellow]inference example skipped: install the extra with "
                "`uv sync --extra inference`[/]"
            )
            return specs
        from flowmesh.tiny_models import build_tiny_llama

        console.print(
            "building a tiny random-weight Llama for the inference example "
            "(its text is gibberish; pass --model for a real one)…"
        )
        model = str(build_tiny_llama(scratch / "tiny-llama"))
    specs.append(
        {
            "apiVersion": "flowmesh/v1",
            "kind": "Task",
            "metadata": {"name": "inference"},
            "spec": {
                "taskType": "inference",
                "model": {"source": {"identifier": model}},
                "data": {
                    "type": "list",
                    "items": ["The quick brown fox", "Once upon a time", "FlowMesh runs"],
                },
                "inference": {"max_tokens": 16, "temperature": 0, "batch_size": 2},
            },
        }
    )
    return specs


def run_demo(args: argparse.Namespace, console: Console) -> int:
    env_in = environ()
    results = Path(env_str(env_in, "RESULTS_DIR", "./results_workers")).resolve()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowmesh-demo-")))
        logs = scratch / "logs"
        logs.mkdir()
        redis_url = env_str(env_in, "REDIS_URL")
        if not redis_url:
            server = stack.enter_context(EmbeddedRedis())
            redis_url = server.url
            console.print(f"embedded Redis ({server.binary}) at {redis_url}")
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "RESULTS_DIR": str(results),
            "PYTHONUNBUFFERED": "1",
            "HEARTBEAT_INTERVAL_SEC": "2",
        }
        env.pop("FLOWMESH_API_TOKEN", None)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(_stop, procs)
        procs.append(
            _spawn(["-m", "orchestrator.main", "--port", str(port)], env, logs / "orchestrator.log")
        )
        for i in range(args.workers):
            procs.append(
                _spawn(
                    ["-m", "worker.main"],
                    {**env, "WORKER_ID": f"demo-{i + 1}"},
                    logs / f"worker-{i + 1}.log",
                )
            )
        client = Client(url)
        stack.callback(client.close)
        _wait(client.healthy, 60, "the orchestrator", procs, logs)
        _wait(lambda: len(client.workers()) >= args.workers, 60, "the workers", procs, logs)
        console.print(
            f"orchestrator at {url} (API docs: {url}/docs), "
            f"{args.workers} worker(s); logs in {logs}"
        )
        specs = _example_specs(args, console, scratch)
        tasks = client.submit(specs)
        final = watch(client, [t["task_id"] for t in tasks], console, timeout=600)
        console.print(f"\nresults under {results}/<task_id>/ (responses.json, manifest.json):")
        for t in final:
            console.print(
                f"  {t['status']:<6} {t.get('name') or '':<10} "
                f"{results / t['task_id'] / 'responses.json'}"
            )
            if t.get("task_type") == "inference" and t["status"] == "DONE":
                first = t["result"]["responses"][0]
                console.print(f"         e.g. {first['prompt']!r} -> {first['text']!r}")
        ok = all(t["status"] == "DONE" for t in final)
        if args.keep:
            console.print(f"\nfleet still running at {url}; Ctrl-C to stop")
            try:
                while all(p.poll() is None for p in procs):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        console.print("stopping the fleet…")
    return 0 if ok else 1
