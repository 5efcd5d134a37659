"""Pipelines against the loop a user would write instead: what a stage boundary costs.

    uv run python -m bench.pipelines [--chain 100] [--width 1000]
    uv run python -m bench --only pipelines

On a real fleet (a private Redis, an orchestrator, one worker with its defaults, ready and
warmed up before any clock starts), no-op `echo` tasks four ways:

- chain: a pipeline of `--chain` stages, each waiting for the one before, against the same
  tasks submitted one at a time by a client that waits for each (`GET /api/v1/tasks/{id}
  ?wait=30`) before submitting the next;
- fan: a `--width`-item forEach stage and a join stage that reads all their results, against
  the same tasks submitted in one request, waited for, then one more task.

Wall time is the client's, from submit to seeing the end. The gap between two tasks is the
next one's `started_at` minus the previous one's `finished_at` (from the task hashes in
Redis, all stamped on this machine's clock), split into release (previous finished -> next
created: the pipeline runner, or the client's round trip), placement (created -> dispatched)
and start (dispatched -> started, the worker). Each run also shows the orchestrator's CPU
seconds and the commands Redis served, per task, from submit to the end seen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.inference import Fleet
from bench.stats import percentile
from flowmesh.client import Client
from flowmesh.keys import Keys

TIMES = ("created_at", "dispatched_at", "started_at", "finished_at")
ENDED = ("DONE", "FAILED", "CANCELLED")
KEYS = Keys()  # bench.inference.Fleet uses no key prefix


@dataclass
class Cost:
    """What the control plane spent between submit and the client seeing the end."""

    orchestrator_cpu_sec: float = 0.0
    redis_commands: int = 0


class Meter:
    """`with meter as cost:` fills `cost` with the orchestrator's CPU seconds and the
    commands Redis served (everyone's, the client's long polls included) in the block."""

    def __init__(self, fleet: Fleet, r: redis.Redis):
        self.fleet, self.r = fleet, r

    def _now(self) -> tuple[float, int]:
        calls = sum(int(v["calls"]) for v in self.r.info("commandstats").values())
        return self.fleet.control_cpu()["proc0"], calls  # proc0: the orchestrator

    def __enter__(self) -> Cost:
        self.cost = Cost()
        self.before = self._now()
        return self.cost

    def __exit__(self, *exc: object) -> None:
        cpu, calls = self._now()
        self.cost.orchestrator_cpu_sec = cpu - self.before[0]
        self.cost.redis_commands = calls - self.before[1] - 1  # this INFO itself


@dataclass
class Run:
    """One kind of run, pooled over its repeats."""

    name: str
    tasks: int
    walls: list[float]  # seconds, one per repeat
    # one per boundary: (release, placement, start) in ms; their sum is the gap
    gaps: list[tuple[float, float, float]]
    run_ms: list[float]  # started -> finished, per task
    costs: list[Cost]  # one per repeat

    def __add__(self, other: Run) -> Run:
        return Run(
            self.name,
            self.tasks,
            self.walls + other.walls,
            self.gaps + other.gaps,
            self.run_ms + other.run_ms,
            self.costs + other.costs,
        )

    @property
    def wall_sec(self) -> float:
        return statistics.median(self.walls)

    def gap(self, q: float) -> float:
        return percentile([sum(g) for g in self.gaps], q) or 0.0

    def part(self, i: int) -> float:
        return statistics.median(g[i] for g in self.gaps)

    def orchestrator_cpu(self) -> float:
        return statistics.median(c.orchestrator_cpu_sec for c in self.costs)

    def commands_per_task(self) -> float:
        return statistics.median(c.redis_commands for c in self.costs) / self.tasks


def task_times(r: redis.Redis, ids: list[str]) -> list[dict[str, float]]:
    out = []
    for start in range(0, len(ids), 1000):
        pipe = r.pipeline(transaction=False)
        for task_id in ids[start : start + 1000]:
            pipe.hmget(KEYS.task(task_id), ["status", *TIMES])
        for task_id, (status, *values) in zip(ids[start:], pipe.execute(), strict=False):
            if status != "DONE":
                raise RuntimeError(f"task {task_id} is {status}")
            out.append(dict(zip(TIMES, map(float, values), strict=True)))
    return out


def boundary(before: dict[str, float], after: dict[str, float]) -> tuple[float, float, float]:
    return (
        1000 * (after["created_at"] - before["finished_at"]),
        1000 * (after["dispatched_at"] - after["created_at"]),
        1000 * (after["started_at"] - after["dispatched_at"]),
    )


def run_ms(times: list[dict[str, float]]) -> list[float]:
    return [1000 * (t["finished_at"] - t["started_at"]) for t in times]


# -- clients -----------------------------------------------------------------------
def submit_pipeline(client: Client, doc: dict[str, Any]) -> str:
    view = client.submit_document(json.dumps(doc), "application/json")
    return str(view["pipeline_id"])


def wait_pipeline(client: Client, pipeline_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.pipeline(pipeline_id, wait=30)
        if view["status"] in ENDED:
            if view["status"] != "DONE":
                raise RuntimeError(f"pipeline {pipeline_id} ended {view['status']}")
            return dict(view)
    raise TimeoutError(f"pipeline {pipeline_id} still running after {timeout}s")


def wait_task(client: Client, task_id: str) -> None:
    while (status := client.task(task_id, wait=30)["status"]) not in ENDED:
        pass
    if status != "DONE":
        raise RuntimeError(f"task {task_id} ended {status}")


def stage_ids(r: redis.Redis, pipeline_id: str, stage: str) -> list[str]:
    return list(json.loads(r.hget(KEYS.pipeline(pipeline_id), f"stage:{stage}"))["task_ids"])


def echo(message: Any = None) -> dict[str, Any]:
    return {"spec": {"taskType": "echo", "echo": {"message": message}}}


# -- the four runs -----------------------------------------------------------------
def chain_pipeline(client: Client, r: redis.Redis, meter: Meter, n: int) -> Run:
    doc = {
        "kind": "Pipeline",
        "metadata": {"name": "bench-chain"},
        "spec": {"taskType": "echo", "stages": [{"name": f"s{k}"} for k in range(n)]},
    }
    with meter as cost:
        started = time.perf_counter()
        pipeline_id = submit_pipeline(client, doc)
        wait_pipeline(client, pipeline_id)
        wall = time.perf_counter() - started
    ids = [stage_ids(r, pipeline_id, f"s{k}")[0] for k in range(n)]
    times = task_times(r, ids)
    gaps = [boundary(a, b) for a, b in itertools.pairwise(times)]
    return Run(f"pipeline, {n}-stage chain", n, [wall], gaps, run_ms(times), [cost])


def chain_loop(client: Client, r: redis.Redis, meter: Meter, n: int) -> Run:
    ids = []
    with meter as cost:
        started = time.perf_counter()
        for k in range(n):
            [task] = client.submit(echo(k))
            wait_task(client, task["task_id"])
            ids.append(task["task_id"])
        wall = time.perf_counter() - started
    times = task_times(r, ids)
    gaps = [boundary(a, b) for a, b in itertools.pairwise(times)]
    return Run(f"client loop, {n} tasks one by one", n, [wall], gaps, run_ms(times), [cost])


def fan_pipeline(client: Client, r: redis.Redis, meter: Meter, width: int) -> Run:
    doc = {
        "kind": "Pipeline",
        "metadata": {"name": "bench-fan"},
        "spec": {
            "taskType": "echo",
            "graph": {
                "nodes": [
                    {
                        "name": "fan",
                        "forEach": list(range(width)),
                        "spec": {"echo": {"message": "${item}"}},
                    },
                    {"name": "join", "spec": {"data": {"items": "${fan.results[*].message}"}}},
                ]
            },
        },
    }
    with meter as cost:
        started = time.perf_counter()
        pipeline_id = submit_pipeline(client, doc)
        wait_pipeline(client, pipeline_id)
        wall = time.perf_counter() - started
    [join] = stage_ids(r, pipeline_id, "join")
    items = json.loads(r.hget(KEYS.task(join), "result"))["items"]
    if items != list(range(width)):
        raise RuntimeError(f"join read {str(items)[:80]}..., not the {width} items in order")
    fan = stage_ids(r, pipeline_id, "fan")
    return fan_run(f"pipeline, {width} fan-out + join", r, fan, join, wall, cost)


def fan_batch(client: Client, r: redis.Redis, meter: Meter, width: int) -> Run:
    with meter as cost:
        started = time.perf_counter()
        ids = [t["task_id"] for t in client.submit([echo(i) for i in range(width)])]
        for task_id in ids:
            wait_task(client, task_id)
        [join] = client.submit(echo("join"))
        wait_task(client, join["task_id"])
        wall = time.perf_counter() - started
    return fan_run(f"client, batch of {width} + 1", r, ids, join["task_id"], wall, cost)


def fan_run(
    name: str, r: redis.Redis, fan_ids: list[str], join_id: str, wall: float, cost: Cost
) -> Run:
    fan = task_times(r, fan_ids)
    [join] = task_times(r, [join_id])
    last = max(fan, key=lambda t: t["finished_at"])
    return Run(name, len(fan) + 1, [wall], [boundary(last, join)], run_ms([*fan, join]), [cost])


# -- the fleet and the table -------------------------------------------------------
def start_fleet(stack: ExitStack, scratch: Path) -> tuple[Fleet, int]:
    # The orchestrator's defaults (bench.inference.Fleet would refresh every 0.2 s).
    fleet = Fleet(stack, scratch, SCHEDULER_REFRESH_SEC="1.0")
    # The worker's defaults, un-niced (Fleet.worker nices it for CPU engines; echo is not one),
    # except HEARTBEAT_INTERVAL_SEC, which Fleet sets to 1 for every process: back to 30.
    fleet._spawn(
        "w0",
        ["-m", "worker.main"],
        {"WORKER_ID": "w0", "WORKER_EXECUTORS": "echo", "HEARTBEAT_INTERVAL_SEC": "30"},
    )
    fleet.wait_ready(1, "echo", timeout=120)
    [worker] = fleet.client.workers()
    return fleet, int(worker["slots"])


def run(chain: int = 100, width: int = 1000, repeats: int = 3) -> tuple[list[Run], int]:
    scratch = Path(tempfile.mkdtemp(prefix="flowmesh-bench-pipelines-"))
    try:
        with ExitStack() as stack:
            fleet, slots = start_fleet(stack, scratch)
            client = fleet.client
            r = redis.Redis.from_url(fleet.redis.url, decode_responses=True)
            stack.callback(r.close)
            meter = Meter(fleet, r)
            # Warm-up: connections, imports, the executor child's first tasks.
            chain_pipeline(client, r, meter, 5)
            chain_loop(client, r, meter, 20)
            runs: list[Run] = []
            for i in range(repeats):  # in turns, so that each kind sees the same drift
                now = [
                    chain_pipeline(client, r, meter, chain),
                    chain_loop(client, r, meter, chain),
                    fan_pipeline(client, r, meter, width),
                    fan_batch(client, r, meter, width),
                ]
                runs = [a + b for a, b in zip(runs, now, strict=True)] if i else now
        shutil.rmtree(scratch, ignore_errors=True)
        return runs, slots
    except BaseException:
        print(f"logs kept in {scratch}", file=sys.stderr)
        raise


def print_table(runs: list[Run], slots: int, repeats: int) -> None:
    print(
        "\n## Pipelines: stage boundaries against a client's own loop (no-op echo tasks, "
        f"1 worker with its defaults: WORKER_SLOTS={slots}; orchestrator defaults; "
        f"{repeats} runs of each in turns: wall median (min-max), gaps pooled, "
        "CPU and commands median)\n"
    )
    print(
        "| run | tasks | wall (s) | gap p50 (ms) | gap p99 (ms) | release p50 | placement p50 "
        "| start p50 | task run p50 (ms) | orchestrator CPU (s) | Redis commands per task |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in runs:
        print(
            f"| {x.name} | {x.tasks:,} | {x.wall_sec:.2f} ({min(x.walls):.2f}-{max(x.walls):.2f}) "
            f"| {x.gap(0.5):.1f} | {x.gap(0.99):.1f} "
            f"| {x.part(0):.1f} | {x.part(1):.1f} | {x.part(2):.1f} "
            f"| {statistics.median(x.run_ms):.1f} | {x.orchestrator_cpu():.2f} "
            f"| {x.commands_per_task():.0f} |"
        )
    chain_p, chain_l, fan_p, fan_b = runs
    print(
        f"\nchain: pipeline / client loop: wall {chain_p.wall_sec / chain_l.wall_sec:.2f}x, "
        f"gap p50 {chain_p.gap(0.5) / chain_l.gap(0.5):.2f}x (below 1: the pipeline is faster)"
    )
    print(
        f"fan:   pipeline / client batch: wall {fan_p.wall_sec / fan_b.wall_sec:.2f}x, "
        f"fan-in gap {fan_p.gap(0.5) / fan_b.gap(0.5):.2f}x"
    )
    print(
        "gap: next task's started_at - previous task's finished_at (fan: the last fan-out task "
        "to finish -> the join); its parts (medians, ms): release = previous finished -> next "
        "created, placement = created -> dispatched, start = dispatched -> started"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chain", type=int, default=100, help="stages in the chain")
    parser.add_argument("--width", type=int, default=1000, help="items in the fan-out")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, in turns")
    args = parser.parse_args(argv)
    runs, slots = run(args.chain, args.width, args.repeats)
    print_table(runs, slots, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
