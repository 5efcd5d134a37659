"""`flowmesh demo`: a whole local fleet in one command, with no Redis installed.

Starts an embedded Redis (unless REDIS_URL is set), an orchestrator and local
worker processes, submits example tasks, shows their progress live, prints
where the results are, and stops everything again: at the end, on Ctrl-C, and on
SIGTERM or SIGHUP. The processes' logs are kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from rich.console import Console

from flowmesh.client import Client
from flowmesh.config import env_str, environ
from flowmesh.embedded import EmbeddedRedis, free_port
from flowmesh.progress import watch


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        # A session of its own: a terminal's hang-up or Ctrl-C reaches the demo alone, which
        # then stops its fleet in order (workers drain) instead of each dying on the spot.
        return subprocess.Popen(
            [sys.executable, *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class DemoError(Exception):
    """The fleet did not come up; the message says what, and where the logs are."""


class _Signals:
    """While the demo runs, SIGTERM and SIGHUP stop it as Ctrl-C does (KeyboardInterrupt), so
    one cleanup stops every process it started. The first signal starts that cleanup; later
    ones are ignored so they cannot cut it short (it is bounded: see `stop_processes`). A signal the
    demo was started ignoring (nohup, a background job) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def shield(self) -> None:
        self.stopping = True

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM; after `grace` s a second SIGTERM (a worker still draining then hands its
    tasks back at once); SIGKILL 5 s later."""
    for wait in (grace, 5.0):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + wait
        for p in live:
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _descendants() -> list[psutil.Process]:
    with suppress(psutil.Error):
        return psutil.Process().children(recursive=True)
    return []


def _reap(tree: list[psutil.Process]) -> None:
    """Kill what the orderly stop left of the demo's process tree (say, the executor
    process of a worker that had to be killed). psutil checks each is the process it was."""
    for p in tree:
        with suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()


def _wait(
    predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]], logs: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise DemoError(f"a fleet process exited while waiting for {what}; see {logs}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}; see {logs}")
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
        # vLLM's CPU kernels take head sizes of 32, 64, ...: a model both engines run.
        model = str(build_tiny_llama(scratch / "tiny-llama", head_dim=64 if VLLM else None))
    # Four single-prompt requests for one model with the same sampling options: task merge
    # sends them to one worker in one delivery, and the two identical ones (greedy
    # decoding) run once. First in the batch, so they are placed together.
    prompts = ["The quick brown fox", "Once upon a time", "FlowMesh runs", "The quick brown fox"]
    inference = [
        {
            "apiVersion": "flowmesh/v1",
            "kind": "Task",
            "metadata": {"name": f"inference-{i + 1}"},
            "spec": {
                "taskType": "inference",
                "model": _model_spec(model),
                "data": {"type": "list", "items": [prompt]},
                "inference": {"max_tokens": 16, "temperature": 0},
            },
        }
        for i, prompt in enumerate(prompts)
    ]
    return inference + specs


# Whether this environment has vLLM: then the demo's workers offer it, and the inference
# requests run on one vLLM engine that batches them.
VLLM = importlib.util.find_spec("vllm") is not None


def _model_spec(model: str) -> dict[str, Any]:
    if not VLLM:
        return {"source": {"identifier": model}}  # engine auto: transformers here
    # Eager: compiling the model's graphs would take minutes on a CPU.
    return {"source": {"identifier": model}, "engine": "vllm", "vllm": {"enforce_eager": True}}


def _merge_note(task: dict[str, Any], tasks: list[dict[str, Any]]) -> str:
    """What task merge did with an inference task, by the names the demo gave."""
    names = {t["task_id"]: t.get("name") or t["task_id"] for t in tasks}
    merge = task.get("merge") or {}
    if not merge.get("merged"):
        return "merge: ran in a delivery of its own"
    note = "merge: delivered with " + ", ".join(names.get(t, t) for t in merge["with"])
    if merge.get("executed_by"):
        note += f"; identical to {names.get(merge['executed_by'], '?')}, so run once for both"
    return note


def run_demo(args: argparse.Namespace, console: Console) -> int:
    # Kept after the demo: what each process logged is often the point of looking.
    logs = Path(tempfile.mkdtemp(prefix="flowmesh-demo-logs-"))
    tree: list[psutil.Process] = []
    with _Signals() as signals:
        try:
            with ExitStack() as stack:
                try:
                    return _run(args, console, stack, logs)
                finally:
                    # From here on a signal cannot interrupt the cleanup (the stack's
                    # callbacks): it stops the workers and orchestrator, then Redis.
                    signals.shield()
                    tree = _descendants()
                    console.print("stopping the fleet…")
        finally:
            _reap(tree)
            console.print(f"fleet stopped; logs kept in {logs}", soft_wrap=True, markup=False)


def _run(args: argparse.Namespace, console: Console, stack: ExitStack, logs: Path) -> int:
    env_in = environ()
    results = Path(env_str(env_in, "RESULTS_DIR", "./results_workers")).resolve()
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowmesh-demo-")))
    redis_url = env_str(env_in, "REDIS_URL")
    embedded = not redis_url
    if embedded:
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
        # A small KV cache for the tiny model when the workers run vLLM on the CPU.
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    }
    env.pop("FLOWMESH_API_TOKEN", None)
    procs: list[subprocess.Popen[bytes]] = []
    stack.callback(stop_processes, procs)
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
        f"orchestrator at {url} (API docs: {url}/docs), {args.workers} worker(s); logs in {logs}",
        soft_wrap=True,
        markup=False,
    )
    specs = _example_specs(args, console, scratch)
    tasks = client.submit(specs)
    final = watch(client, [t["task_id"] for t in tasks], console, timeout=600)
    console.print(
        f"\nresults under {results}/<task_id>/ (responses.json, manifest.json):",
        soft_wrap=True,
        markup=False,
    )
    for t in final:
        console.print(
            f"  {t['status']:<6} {t.get('name') or '':<10} "
            f"{results / t['task_id'] / 'responses.json'}",
            soft_wrap=True,
            markup=False,
        )
        if t.get("task_type") == "inference" and t["status"] == "DONE":
            first = t["result"]["responses"][0]
            console.print(
                f"         {first['prompt']!r} -> {first['text']!r}", soft_wrap=True, markup=False
            )
            console.print(f"         {_merge_note(t, final)}", soft_wrap=True, markup=False)
    ok = all(t["status"] == "DONE" for t in final)
    if args.keep:
        # No FLOWMESH_API_TOKEN to export: the demo's orchestrator has none (loopback only).
        lines = [
            f"\nfleet still running at {url}; Ctrl-C (or SIGTERM) stops it.",
            "To use it from another shell:",
            f"  export FLOWMESH_URL={url}",
        ]
        if embedded:  # (a REDIS_URL of the user's own is theirs to export, password and all)
            lines.append(f"  export REDIS_URL={redis_url}   # for `uv run worker` to join it")
        lines += ["  uv run flowmesh workers", "  uv run flowmesh tasks"]
        console.print(
            "\n".join(lines),
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        try:
            while all(p.poll() is None for p in procs):
                time.sleep(1)
            console.print(f"a fleet process exited; see {logs}", soft_wrap=True, markup=False)
            ok = False
        except KeyboardInterrupt:
            pass
    return 0 if ok else 1
