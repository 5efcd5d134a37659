"""Soak under worker kills: nothing lost, nothing recorded twice, and how fast recovery is.

    uv run --group bench python -m bench.soak --tasks 10000

Starts a private Redis, an orchestrator and 3 workers; submits echo tasks with a short
random delay; every few seconds SIGKILLs one worker and starts a replacement (a new
WORKER_ID, as a restarted pod would get). Reports tasks lost, tasks whose result was
recorded twice, and recovery latency: from the kill to the re-placement (dispatch of the
next attempt) of each task the killed worker held. The same run then measures Celery with
acks_late on the same Redis (bench/soak_celery.py), when the `bench` group is installed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.stats import percentile
from flowmesh.client import Client
from flowmesh.demo import stop_processes
from flowmesh.embedded import EmbeddedRedis, free_port
from flowmesh.keys import Keys
from flowmesh.status import TaskStatus


class Fleet:
    def __init__(self, redis_url: str, logs: Path, heartbeat: float, slots: int):
        self.redis_url = redis_url
        self.logs = logs
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
            "HEARTBEAT_INTERVAL_SEC": str(heartbeat),
            "WORKER_SLOTS": str(slots),
            "WORKER_EXECUTORS": "echo",
            "RESULTS_DIR": str(logs / "results"),
        }
        self.env.pop("FLOWMESH_API_TOKEN", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, *args],
                env={**self.env, **env},
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def start_worker(self, worker_id: str) -> None:
        self.workers[worker_id] = self.spawn(worker_id, ["-m", "worker.main"], WORKER_ID=worker_id)

    def stop(self) -> None:
        stop_processes(self.procs, grace=20.0)


# The soak's fleet uses no key prefix.
KEYS = Keys()


def run_flowmesh_soak(
    redis_url: str,
    *,
    tasks: int,
    workers: int,
    kill_every: float,
    heartbeat: float,
    slots: int,
    max_wall: float,
    seed: int = 7,
) -> dict[str, Any]:
    rng = random.Random(seed)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    logs = Path(tempfile.mkdtemp(prefix="flowmesh-soak-"))
    fleet = Fleet(redis_url, logs, heartbeat, slots)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    kills: dict[str, float] = {}
    client = Client(url, timeout=60)
    try:
        fleet.spawn("orchestrator", ["-m", "orchestrator.main", "--port", str(port)])
        for i in range(workers):
            fleet.start_worker(f"soak-{i}")
        deadline = time.monotonic() + 60
        while True:
            if client.healthy() and r.scard(KEYS.worker_ids) == workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"fleet did not start; logs in {logs}")
            time.sleep(0.2)

        t0 = time.monotonic()
        ids: list[str] = []
        for start in range(0, tasks, 500):
            batch = [
                {
                    "spec": {
                        "taskType": "echo",
                        "echo": {"delaySec": round(rng.uniform(0.01, 0.1), 3)},
                    }
                }
                for _ in range(start, min(tasks, start + 500))
            ]
            ids += [t["task_id"] for t in client.submit(batch)]
        generation = workers
        next_kill = time.monotonic() + kill_every
        while (
            r.zcard(KEYS.tasks_by_status(TaskStatus.DONE))
            + r.zcard(KEYS.tasks_by_status(TaskStatus.FAILED))
            < tasks
        ):
            if time.monotonic() - t0 > max_wall:
                break
            if time.monotonic() >= next_kill:
                victim = rng.choice(sorted(w for w, p in fleet.workers.items() if p.poll() is None))
                fleet.workers[victim].send_signal(signal.SIGKILL)
                kills[victim] = time.time()
                fleet.workers.pop(victim)
                fleet.start_worker(f"soak-{generation}")
                generation += 1
                next_kill += kill_every * rng.uniform(0.5, 1.5)  # "every few seconds"
            time.sleep(0.05)
        wall = time.monotonic() - t0

        finished = Counter(
            f["task_id"]
            for _, f in r.xrange(KEYS.events)
            if f.get("type") == "task.finished" and f.get("status") == "DONE"
        )
        recoveries: list[float] = []
        held_by_killed = 0
        done = dead = 0
        failed: list[dict[str, Any]] = []
        for start in range(0, len(ids), 1000):
            pipe = r.pipeline(transaction=False)
            for task_id in ids[start : start + 1000]:
                pipe.hmget(KEYS.task(task_id), ["status", "history"])
            for status, history in pipe.execute():
                done += status == "DONE"
                dead += status == "FAILED"
                entries = json.loads(history or "[]")
                if status != "DONE":
                    failed.append({"status": status, "history": entries})
                for before, after in itertools.pairwise(entries):
                    if before["outcome"] == "worker_lost" and before["worker_id"] in kills:
                        held_by_killed += 1
                        recoveries.append(after["dispatched_at"] - kills[before["worker_id"]])
        return {
            "system": "flowmesh",
            "tasks": tasks,
            "completed": done,
            "lost": tasks - done - dead,
            "dead_lettered": dead,
            "doubled": sum(1 for n in finished.values() if n > 1),
            "kills": len(kills),
            "replaced": held_by_killed,
            "recovery_p50_sec": percentile(recoveries, 0.5),
            "recovery_p99_sec": percentile(recoveries, 0.99),
            "wall_sec": wall,
            "not_done": failed[:5],
            "settings": f"HEARTBEAT_INTERVAL_SEC={heartbeat:g} (lease {2 * heartbeat + 1:g}s), "
            f"{workers} workers x {slots} slots",
        }
    finally:
        client.close()
        fleet.stop()
        r.close()


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cols = [
        "system",
        "tasks",
        "completed",
        "lost",
        "dead_lettered",
        "doubled",
        "kills",
        "recovery_p50_sec",
        "recovery_p99_sec",
        "wall_sec",
    ]
    widths = [max(len(c), *(len(fmt(row.get(c))) for row in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(fmt(row.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        extra = (
            f"; never recovered within the run: {row['unrecovered_after_sec']:.0f}s waited"
            if row.get("unrecovered_after_sec")
            else ""
        )
        print(f"  {row['system']}: {row.get('settings', '')}{extra}")
        for task in row.get("not_done") or []:
            print(f"    not done: {json.dumps(task)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=3.0, help="seconds between worker kills")
    p.add_argument("--heartbeat", type=float, default=1.0, help="HEARTBEAT_INTERVAL_SEC")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-wall", type=float, default=600.0)
    p.add_argument(
        "--celery-tasks", type=int, default=2000, help="tasks for the Celery comparison (0 to skip)"
    )
    p.add_argument("--celery-max-wall", type=float, default=120.0)
    args = p.parse_args()

    rows = []
    with EmbeddedRedis() as server:
        print(f"private Redis at {server.url} ({server.binary})", flush=True)
        rows.append(
            run_flowmesh_soak(
                server.url,
                tasks=args.tasks,
                workers=args.workers,
                kill_every=args.kill_every,
                heartbeat=args.heartbeat,
                slots=args.slots,
                max_wall=args.max_wall,
            )
        )
        print_table(rows)
        if args.celery_tasks:
            try:
                from bench.soak_celery import run_celery_soak
            except ImportError as exc:
                print(f"celery comparison skipped ({exc}): uv sync --group bench")
            else:
                rows.append(
                    run_celery_soak(
                        server.url,
                        tasks=args.celery_tasks,
                        workers=args.workers,
                        kill_every_sec=args.kill_every,
                        max_wall_sec=args.celery_max_wall,
                    )
                )
    print()
    print_table(rows)
    return 0 if rows[0]["lost"] == 0 and rows[0]["doubled"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
