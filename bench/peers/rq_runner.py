"""Benchmark runner for RQ (https://python-rq.org), the common peer protocol.

Run with the rq venv's python, from the repo root:

    .bench/venvs/rq/bin/python bench/peers/rq_runner.py --redis-url URL \
        --mode {throughput,latency,backlog} --tasks N --workers K --out OUT.json \
        [--worker-class {default,simple}] [--result-wait {poll,block}]

Imports only rq and redis-py. Workers are started with RQ's own CLI
(`python -m rq.cli worker -u URL QUEUE`), each in its own process group, and are killed
at the end (RQ's work horses make their own process group: they are found through /proc
and killed too). The task reads the run id and mode from BENCH_* environment variables.

Settings (the headline):
- the default `rq.Worker`: it forks a work horse for every job (RQ's natural setting, and
  its cost); `--worker-class simple` runs `rq.SimpleWorker` (no fork, the job runs in the
  worker process), which is not the headline;
- one job at a time per worker, no prefetch (the worker pops one job with a blocking read);
- RQ's default result storage (every job's result kept 500 s, `result_ttl`), default INFO
  logging (a few log lines per job);
- client: `Queue.enqueue_many` (one pipeline per chunk of SUBMIT_CHUNK jobs);
- latency mode: `job.latest_result()` polled every 1 ms (`--result-wait block` uses
  `job.latest_result(timeout=...)`, a blocking XREAD on the result stream, instead).

Backlog mode (`harness.Backlog`): the N jobs are enqueued first, one `Queue.enqueue` each,
with no worker running; then K workers start and drain them. Each work horse is a fresh
fork, so every job records its start (one RPUSH more per job), and the horses' CPU counts
with the worker that reaped them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version as pkg_version

import redis
from harness import (
    READY_TIMEOUT_S,
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
    worker_env,
)
from rq import Queue, Worker, get_current_job
from rq.worker import WorkerStatus

PEER = "rq"
TASK = "rq_runner.bench_task"  # by import path: the client runs this file as __main__
SUBMIT_CHUNK = 100  # jobs per enqueue_many call (one pipeline each)
RESULT_POLL_S = 0.001

# ---- worker side (read when RQ's work horse imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")


def queue_for(run_id: str) -> str:
    return f"bench-{run_id}"


def bench_task(index: int, submitted_at: float) -> None:
    started = time.time()
    r = get_current_job().connection  # the worker's own connection
    if MODE == "latency":
        r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    elif MODE == "backlog" and first_start():
        r.rpush(f"bench:{RUN_ID}:first", repr(started))
    r.incr(f"bench:{RUN_ID}:done")


# ---- peer-specific client side ----
WORKER_CLASSES = {"default": "rq.Worker", "simple": "rq.SimpleWorker"}


def worker_cmds(args: argparse.Namespace, run_id: str, k: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "rq.cli",
            "worker",
            "-u",
            args.redis_url,
            "-w",
            WORKER_CLASSES[args.worker_class],
            "-n",
            f"bench-{run_id}-w{i}",
            queue_for(run_id),
        ]
        for i in range(k)
    ]


def wait_rq_ready(r: redis.Redis, workers: Workers, queue: Queue, k: int) -> None:
    """Ready: k workers registered on the queue, all idle (waiting in their blocking pop)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        ws = Worker.all(connection=r, queue=queue)
        if len(ws) >= k and all(w.get_state() == WorkerStatus.IDLE for w in ws):
            return
        workers.check_alive()
        if time.monotonic() > deadline:
            raise workers.not_ready()
        time.sleep(0.05)


def rq_cleanup(r: redis.Redis, run_id: str, queue: Queue) -> None:
    cleanup(r, run_id)
    # the shared sets that name this run's queue and workers
    r.srem("rq:queues", queue.key)
    stale = [m for m in r.smembers("rq:workers") if f"bench-{run_id}".encode() in m]
    if stale:
        r.srem("rq:workers", *stale)


def settings_line(args: argparse.Namespace, mode: str) -> str:
    if args.worker_class == "default":
        wc = "rq.Worker (default: forks a work horse per job)"
    else:
        wc = "rq.SimpleWorker (NOT the default: no fork, job runs in the worker process)"
    parts = [
        f"rq {pkg_version('rq')} + redis-py {pkg_version('redis')}",
        f"worker via rq CLI: {wc}",
        "one job at a time, no prefetch (BLMOVE to an intermediate queue, no explicit ack)",
        "results kept 500 s (default result_ttl)",
        "INFO logging (default)",
    ]
    if mode == "latency":
        if args.result_wait == "poll":
            parts.append(f"result: job.latest_result() polled every {RESULT_POLL_S * 1000:g} ms")
        else:
            parts.append("result: job.latest_result(timeout=...) (blocking XREAD)")
    elif mode == "backlog":
        parts.append("client Queue.enqueue once per job, before any worker")
    else:
        parts.append(f"client Queue.enqueue_many in chunks of {SUBMIT_CHUNK}")
    return "; ".join(parts)


def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    q = Queue(queue_for(run_id), connection=r)
    workers = Workers(PEER, worker_cmds(args, run_id, k), worker_env(args, run_id, "throughput"))
    try:
        wait_rq_ready(r, workers, q, k)
        t0 = time.perf_counter()
        for lo in range(0, n, SUBMIT_CHUNK):
            q.enqueue_many(
                [
                    Queue.prepare_data(TASK, (i, time.time()), job_id=f"bench-{run_id}-{i}")
                    for i in range(lo, min(n, lo + SUBMIT_CHUNK))
                ]
            )
        t_sub = time.perf_counter()
        done = wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        rq_cleanup(r, run_id, q)
        r.close()
    return throughput_result(
        PEER, pkg_version("rq"), n, k, done, t0, t_sub, t_done, settings_line(args, "throughput")
    )


def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = redis.Redis.from_url(args.redis_url)
    q = Queue(queue_for(run_id), connection=r)
    workers = Workers(PEER, worker_cmds(args, run_id, 1), worker_env(args, run_id, "latency"))
    try:
        wait_rq_ready(r, workers, q, 1)

        def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            job = q.enqueue(TASK, index, submitted_at, job_id=f"bench-{run_id}-{index}")
            if args.result_wait == "block":
                res = job.latest_result(timeout=int(RESULT_TIMEOUT_S))
            else:
                deadline = time.monotonic() + RESULT_TIMEOUT_S
                while (res := job.latest_result()) is None and time.monotonic() < deadline:
                    time.sleep(RESULT_POLL_S)
            seen = time.time()
            if res is None:
                raise RuntimeError(f"no result for job {job.id} after {RESULT_TIMEOUT_S}s")
            if res.type != res.Type.SUCCESSFUL:
                raise RuntimeError(f"job {job.id} failed: {res.exc_string}")
            return submitted_at, seen

        submitted, result_ms = measure(one, r, run_id, n)
        start_ms = start_times(r, run_id, submitted)
    finally:
        workers.stop()
        rq_cleanup(r, run_id, q)
        r.close()
    return latency_result(
        PEER, pkg_version("rq"), n, start_ms, result_ms, settings_line(args, "latency")
    )


def run_backlog(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    q = Queue(queue_for(run_id), connection=r)
    bl = Backlog(r, run_id, n)
    try:
        bl.before()
        for i in range(n):
            q.enqueue(TASK, i, time.time(), job_id=f"bench-{run_id}-{i}")
        bl.enqueued()
        env = worker_env(args, run_id, "backlog")
        bl.drain(lambda: Workers(PEER, worker_cmds(args, run_id, k), env))
    finally:
        bl.stop()
        rq_cleanup(r, run_id, q)
        r.close()
    return bl.result(PEER, pkg_version("rq"), k, settings_line(args, "backlog"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--worker-class",
        choices=sorted(WORKER_CLASSES),
        default="default",
        help="rq.Worker (default, the headline: forks per job) or rq.SimpleWorker (no fork)",
    )
    ap.add_argument(
        "--result-wait",
        choices=["poll", "block"],
        default="poll",
        help="latency mode: poll latest_result() every 1 ms (headline) or block on it",
    )


if __name__ == "__main__":
    sys.exit(main(PEER, run_throughput, run_latency, add_args, run_backlog=run_backlog))
