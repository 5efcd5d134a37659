"""FlowMesh under the peers' protocol (bench/peers/*_runner.py): same task, same counter.

    uv run python -m bench.flowmesh_runner --redis-url URL --mode throughput --tasks 10000 \
        --workers 1 --out out.json

Throughput: an orchestrator and K worker processes; N no-op tasks submitted over HTTP in
batches of 500 (the API's bulk form); time from the first submit until the shared Redis
counter reaches N. Latency: one idle worker; N tasks one at a time, each submitted with
POST and its result read back with one long-poll GET (`?wait=30`). Backlog: an
orchestrator and no worker; N tasks submitted one POST each, in order; then K worker
processes are started and drain them (`bench.peers.harness.Backlog`: Redis memory per
pending task, first task start to last completion, CPU of the orchestrator, the workers and
their executor children). All go through FlowMesh's own client (`flowmesh.client`), as
each peer goes through its own.

Throughput and latency run with WORKER_SLOTS=64 and LOG_LEVEL=WARNING unless `--defaults`;
backlog always runs at FlowMesh's defaults (neither set: 4 slots for this executor, INFO
logs). `--slots N` sets WORKER_SLOTS in every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.peers.harness import Backlog, delete_matching, latency_result, throughput_result
from flowmesh import __version__
from flowmesh.client import Client
from flowmesh.embedded import free_port
from flowmesh.keys import Keys

PLUGIN = Path(__file__).resolve().parent / "plugin"


class Fleet:
    """An orchestrator and `workers` worker processes, all ready. `slots`/`log_level`:
    WORKER_SLOTS and LOG_LEVEL, None for FlowMesh's default."""

    def __init__(
        self, redis_url: str, workers: int, slots: int | None, log_level: str | None = "WARNING"
    ):
        self.logs = Path(tempfile.mkdtemp(prefix="flowmesh-bench-"))
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "FLOWMESH_BENCH_REDIS_URL": redis_url,
            "PYTHONPATH": str(PLUGIN),
            "WORKER_EXECUTORS": "bench_noop",
            "RESULTS_DIR": str(self.logs / "results"),
            "REDIS_KEY_PREFIX": f"fmbench{uuid.uuid4().hex[:6]}:",
        }
        for name in ("FLOWMESH_API_TOKEN", "WORKER_SLOTS", "LOG_LEVEL"):
            self.env.pop(name, None)
        if slots is not None:
            self.env["WORKER_SLOTS"] = str(slots)
        if log_level is not None:
            self.env["LOG_LEVEL"] = log_level
        self.prefix = self.env["REDIS_KEY_PREFIX"]
        self.port = free_port()
        self.orchestrator = self._spawn(
            "orchestrator", ["-m", "orchestrator.main", "--port", str(self.port)]
        )
        self.procs = [self.orchestrator]
        self.client = Client(f"http://127.0.0.1:{self.port}", timeout=60)
        self.r = redis.Redis.from_url(redis_url)
        self.start_workers(workers)
        deadline = time.monotonic() + 60
        while True:
            if self.client.healthy() and all(self._ready(i) for i in range(workers)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"fleet did not start; logs in {self.logs}")
            time.sleep(0.1)

    def start_workers(self, k: int) -> Workers:
        """K worker processes, started now (not waited for)."""
        procs = [
            self._spawn(f"w{i}", ["-m", "worker.main"], WORKER_ID=f"bench-{i}") for i in range(k)
        ]
        self.procs += procs
        return Workers(procs, self.logs)

    def _ready(self, i: int) -> bool:
        # Registered at once; ready once its executor child has started.
        raw = self.r.hget(Keys(self.prefix).worker(f"bench-{i}"), "executor_states")
        states = json.loads(raw) if raw else {}
        return bool(states) and all(s["state"] == "ready" for s in states.values())

    def _spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as fh:
            return subprocess.Popen(
                [sys.executable, *args],
                env={**self.env, **env},
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        delete_matching(self.r, f"{self.prefix}*")
        self.r.close()


class Workers:
    """The worker processes of a backlog run, as `Backlog` wants them."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], logs: Path):
        self.procs, self.logs = procs, logs

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"worker exited with code {p.returncode}; logs in {self.logs}")


def spec(run_id: str, i: int, latency: bool = False, backlog: bool = False) -> dict[str, Any]:
    args: dict[str, Any] = {"run": run_id, "i": i, "t": time.time(), "latency": latency}
    if backlog:
        args["backlog"] = True
    return {"spec": {"taskType": "bench_noop", "bench_noop": args}}


def fleet_settings(fleet: Fleet) -> str:
    slots = fleet.env.get("WORKER_SLOTS", "unset (default: 4 for this executor)")
    logs = fleet.env.get("LOG_LEVEL", "unset (default INFO: a line per task)")
    return f"WORKER_SLOTS={slots}; LOG_LEVEL={logs}"


def throughput(fleet: Fleet, n: int, workers: int) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    counter = f"bench:{run_id}:done"
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        batch = [spec(run_id, i) for i in range(start, min(n, start + 500))]
        fleet.client.submit(batch)
    t_submitted = time.perf_counter()
    deadline = time.monotonic() + 300
    while int(fleet.r.get(counter) or 0) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    t_done = time.perf_counter()
    done = int(fleet.r.get(counter) or 0)
    fleet.r.delete(counter)
    settings = (
        f"HTTP batches of 500; {fleet_settings(fleet)}; warm executor child "
        "(max_concurrency 1, the default); responses.json + manifest.json per task on disk"
    )
    return throughput_result(
        "flowmesh", __version__, n, workers, done, t0, t_submitted, t_done, settings
    )


def latency(fleet: Fleet, n: int) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    starts: list[float] = []
    results: list[float] = []
    for i in range(-20, n):  # the first 20 warm up
        body = spec(run_id, i, latency=True)
        submitted = body["spec"]["bench_noop"]["t"] = time.time()
        task_id = fleet.client.submit(body)[0]["task_id"]
        # Long poll: the reply comes when the task has ended (no client-side polling).
        status = fleet.client.task(task_id, wait=30)["status"]
        if status != "DONE":
            raise RuntimeError(f"task {task_id} ended {status}")
        seen = time.time()
        if i >= 0:
            results.append((seen - submitted) * 1000)
            raw = fleet.r.lindex(f"bench:{run_id}:start", -1)
            starts.append((float(raw.decode().split(":")[1]) - submitted) * 1000)
    for key in (f"bench:{run_id}:start", f"bench:{run_id}:done"):
        fleet.r.delete(key)
    return latency_result(
        "flowmesh",
        __version__,
        n,
        sorted(starts),
        results,
        "flowmesh.client: POST one task, then GET /api/v1/tasks/{id}?wait=30 (long poll); "
        + fleet_settings(fleet),
    )


def backlog(fleet: Fleet, n: int, workers: int) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    bl = Backlog(fleet.r, run_id, n, others={fleet.orchestrator.pid: "orchestrator"})
    try:
        bl.before()
        for i in range(n):
            fleet.client.submit(spec(run_id, i, backlog=True))
        bl.enqueued()
        bl.drain(lambda: fleet.start_workers(workers))
    finally:
        for key in (f"bench:{run_id}:first", f"bench:{run_id}:done"):
            fleet.r.delete(key)
    settings = (
        f"flowmesh.client: POST /api/v1/tasks once per task, before any worker; "
        f"{fleet_settings(fleet)}; warm executor child (max_concurrency 1, the default); "
        "responses.json + manifest.json per task on disk"
    )
    return bl.result("flowmesh", __version__, workers, settings)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--mode", choices=["throughput", "latency", "backlog"], required=True)
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--slots", type=int, help="WORKER_SLOTS (default: 64, or unset with --defaults/backlog)"
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="WORKER_SLOTS and LOG_LEVEL at FlowMesh's defaults (backlog mode always is)",
    )
    args = p.parse_args()
    defaults = args.defaults or args.mode == "backlog"
    slots = args.slots if args.slots is not None else (None if defaults else 64)
    workers = {"latency": 1, "backlog": 0}.get(args.mode, args.workers)
    fleet = Fleet(args.redis_url, workers, slots, log_level=None if defaults else "WARNING")
    try:
        if args.mode == "throughput":
            out = throughput(fleet, args.tasks, args.workers)
        elif args.mode == "backlog":
            out = backlog(fleet, args.tasks, args.workers)
        else:
            out = latency(fleet, args.tasks)
    finally:
        fleet.close()
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
