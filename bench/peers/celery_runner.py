"""Benchmark runner for Celery (https://docs.celeryq.dev), the common peer protocol.

Run with the celery venv's python, from the repo root:

    .bench/venvs/celery/bin/python bench/peers/celery_runner.py --redis-url URL \
        --mode {throughput,latency,backlog} --tasks N --workers K --out OUT.json \
        [--pool {solo,prefork,threads}] [--concurrency C]

Imports only celery (kombu) and redis-py. Worker processes are started with Celery's own
CLI (`python -m celery -A celery_runner worker ...`), each in its own process group, and
are killed at the end. The worker side reads its configuration from BENCH_* environment
variables, because the CLI builds the app when it imports this module.

Settings (the headline):
- `--pool=solo` (the default of `--pool` here): the task runs in the worker process
  itself. Measured faster than `--pool=prefork --concurrency=1` (the consumer hands each
  task to a forked child over a pipe and reads the result back) in throughput and latency,
  see the report; `--pool prefork` gives the other number. `--pool threads` runs the task
  on a thread pool in the worker process. `--concurrency` is 1 unless given; 0 leaves it
  at Celery's default (the number of CPUs).
- prefetch: Celery's default, `worker_prefetch_multiplier=4` (x concurrency 1);
- acks: Celery's default, early ack (`task_acks_late=False`);
- throughput mode: no result backend (`task_ignore_result=True`); latency mode: the Redis
  result backend on the same Redis, results read with `AsyncResult.get()` (pub/sub);
- default WARNING log level (no per-task log line); remote control off
  (`worker_enable_remote_control=False`, `--without-gossip --without-mingle`): no pidbox
  keys are left behind and nothing else shares the connection;
- client: `apply_async` in a loop on one producer (`app.producer_or_acquire()`): Celery has
  no bulk enqueue (a `group`/`chunks` is a different workload).

Backlog mode (`harness.Backlog`): the N tasks are sent first, one `apply_async` each, with
no worker running; then K workers start and drain them. The backlog section of the suite
runs it with `--pool threads --concurrency 0` (threads, Celery's default concurrency).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version as pkg_version
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready
from harness import (
    RESULT_TIMEOUT_S,
    Backlog,
    Workers,
    cleanup,
    first_start,
    latency_result,
    main,
    measure,
    start_times,
    throughput_result,
    wait_done,
    wait_ready,
    worker_env,
)

PEER = "celery"
TASK_NAME = "bench_task"

# ---- worker side (read when Celery's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def queue_for(run_id: str) -> str:
    return f"bench-{run_id}"


def make_app(redis_url: str, run_id: str, mode: str) -> Celery:
    app = Celery(
        "celery_runner",
        broker=redis_url,
        backend=redis_url if mode == "latency" else None,
        set_as_current=False,
    )
    app.conf.update(
        task_default_queue=queue_for(run_id),
        task_ignore_result=(mode != "latency"),
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME)(bench_task)
    return app


_client: Any = None
_client_pid = -1


def _redis() -> Any:
    """One client per process (a prefork child must not share its parent's sockets)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(WORKER_REDIS_URL)
        _client_pid = os.getpid()
    return _client


def bench_task(index: int, submitted_at: float) -> None:
    started = time.time()
    r = _redis()
    if MODE == "latency":
        r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    elif MODE == "backlog" and first_start():
        r.rpush(f"bench:{RUN_ID}:first", repr(started))
    r.incr(f"bench:{RUN_ID}:done")


app = make_app(WORKER_REDIS_URL, RUN_ID, MODE)


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    redis.Redis.from_url(WORKER_REDIS_URL).incr(f"bench:{RUN_ID}:ready")


# ---- peer-specific client side ----
def worker_cmds(args: argparse.Namespace, run_id: str, k: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_runner",
            "worker",
            f"--pool={args.pool}",
            *([f"--concurrency={args.concurrency}"] if args.concurrency else []),
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"bench-{run_id}-w{i}@%h",
        ]
        for i in range(k)
    ]


POOLS = {
    "solo": "pool=solo (task runs in the worker process)",
    "prefork": "pool=prefork",
    "threads": "pool=threads",
}


def settings_line(args: argparse.Namespace, mode: str) -> str:
    v = pkg_version
    pool = POOLS[args.pool]
    if args.pool != "solo":
        pool += (
            f", concurrency={args.concurrency}"
            if args.concurrency
            else f", concurrency={os.cpu_count()} (default: CPUs)"
        )
    parts = [
        f"celery {v('celery')} + kombu {v('kombu')} + redis-py {v('redis')}",
        f"worker via celery CLI: {pool}",
        "prefetch multiplier 4 (default)",
        "early ack (default)",
        "remote control/gossip/mingle off",
        "log level WARNING (default)",
    ]
    if mode == "latency":
        parts.append("result backend: Redis (same server), AsyncResult.get() (pub/sub)")
    elif mode == "backlog":
        parts.append("no result backend (task_ignore_result)")
        parts.append("client apply_async once per task on one producer, before any worker")
    else:
        parts.append("no result backend (task_ignore_result)")
        parts.append("client apply_async in a loop on one producer (no bulk API)")
    return "; ".join(parts)


def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    client = make_app(args.redis_url, run_id, "throughput")
    task = client.tasks[TASK_NAME]
    workers = Workers(PEER, worker_cmds(args, run_id, k), worker_env(args, run_id, "throughput"))
    try:
        wait_ready(r, workers, run_id, k)
        with client.producer_or_acquire() as producer:
            t0 = time.perf_counter()
            for i in range(n):
                task.apply_async((i, time.time()), task_id=f"bench-{run_id}-{i}", producer=producer)
            t_sub = time.perf_counter()
        done = wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        cleanup(r, run_id)
        client.close()
        r.close()
    return throughput_result(
        PEER,
        pkg_version("celery"),
        n,
        k,
        done,
        t0,
        t_sub,
        t_done,
        settings_line(args, "throughput"),
    )


def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = redis.Redis.from_url(args.redis_url)
    client = make_app(args.redis_url, run_id, "latency")
    task = client.tasks[TASK_NAME]
    workers = Workers(PEER, worker_cmds(args, run_id, 1), worker_env(args, run_id, "latency"))
    try:
        wait_ready(r, workers, run_id, 1)

        def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            res = task.apply_async((index, submitted_at), task_id=f"bench-{run_id}-{index}")
            res.get(timeout=RESULT_TIMEOUT_S)
            seen = time.time()
            res.forget()  # drops the result key (cleanup would too); not timed
            return submitted_at, seen

        submitted, result_ms = measure(one, r, run_id, n)
        start_ms = start_times(r, run_id, submitted)
    finally:
        workers.stop()
        cleanup(r, run_id)
        client.close()
        r.close()
    return latency_result(
        PEER, pkg_version("celery"), n, start_ms, result_ms, settings_line(args, "latency")
    )


def run_backlog(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    client = make_app(args.redis_url, run_id, "backlog")
    task = client.tasks[TASK_NAME]
    bl = Backlog(r, run_id, n)
    try:
        bl.before()
        with client.producer_or_acquire() as producer:
            for i in range(n):
                task.apply_async((i, time.time()), task_id=f"bench-{run_id}-{i}", producer=producer)
        bl.enqueued()
        env = worker_env(args, run_id, "backlog")
        bl.drain(lambda: Workers(PEER, worker_cmds(args, run_id, k), env))
    finally:
        bl.stop()
        cleanup(r, run_id)
        client.close()
        r.close()
    return bl.result(PEER, pkg_version("celery"), k, settings_line(args, "backlog"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--pool",
        choices=sorted(POOLS),
        default="solo",
        help="worker pool; solo is the headline of the throughput and latency sections",
    )
    ap.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="--concurrency of the prefork and threads pools; 0: Celery's default (CPUs)",
    )


if __name__ == "__main__":
    sys.exit(main(PEER, run_throughput, run_latency, add_args, run_backlog=run_backlog))
