"""Benchmark runner for SAQ (Simple Async Queue) on Redis, the common peer protocol.

Run with the saq venv's python, from the repo root:

    .bench/venvs/saq/bin/python bench/peers/saq_runner.py --redis-url URL \
        --mode {throughput,latency,backlog} --tasks N --workers K --out OUT.json

Imports only saq and redis-py. Each worker process is SAQ's own CLI,
`python -m saq saq_runner.settings` (--workers 1, one asyncio process), with the defaults:
concurrency=10, dequeue_timeout=0 (BLMOVE that blocks until a job comes: no poll delay),
job ttl 600 s, WARNING logging (nothing per job). The worker side reads its configuration
from BENCH_* environment variables, because the CLI imports this module to find `settings`.

Latency mode waits with queue.apply(..., poll_interval=0.001): SAQ's apply/map polls the
job every poll_interval (default 0.5 s). `--tuned` is accepted for symmetry with the other
runners and changes nothing here.

Backlog mode (`harness.Backlog`): the N jobs are enqueued first, one awaited
`queue.enqueue` at a time, with no worker running; then K worker CLIs start and drain them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from importlib.metadata import version as pkg_version

import redis
import redis.asyncio as aioredis
from harness import (
    RESULT_TIMEOUT_S,
    Backlog,
    WatchedWorkers,
    async_cleanup,
    async_measure,
    async_wait_done,
    async_wait_ready,
    cleanup,
    first_start,
    latency_result,
    main,
    start_ms_from,
    throughput_result,
    worker_env,
)
from saq import Queue

PEER = "saq"

# ---- worker side (read when SAQ's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

APPLY_POLL_INTERVAL = 0.001  # client side, latency mode; SAQ's default is 0.5 s


def queue_name(run_id: str) -> str:
    return f"bench-{run_id}"


async def bench_task(ctx: dict, *, index: int, submitted_at: float) -> None:
    started = time.time()
    r = ctx["worker"].queue.redis
    if MODE == "latency":
        await r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    elif MODE == "backlog" and first_start():
        await r.rpush(f"bench:{RUN_ID}:first", repr(started))
    await r.incr(f"bench:{RUN_ID}:done")


async def _startup(ctx: dict) -> None:
    await ctx["worker"].queue.redis.incr(f"bench:{RUN_ID}:ready")


settings = {
    "queue": Queue.from_url(WORKER_REDIS_URL, name=queue_name(RUN_ID)),
    "functions": [("bench_task", bench_task)],
    "startup": _startup,
}


SUBMIT_CHUNK = 100  # concurrent enqueues in flight (asyncio.gather in bounded chunks)


# ---- peer-specific client side ----
def tuned_env(args: argparse.Namespace, run_id: str, mode: str) -> dict[str, str]:
    return worker_env(args, run_id, mode, BENCH_TUNED="1" if args.tuned else "0")


def worker_cmd() -> list[str]:
    return [sys.executable, "-m", "saq", "saq_runner.settings"]


def settings_line(args: argparse.Namespace, mode: str) -> str:
    s = (
        f"saq {pkg_version('saq')} + redis-py {pkg_version('redis')}; "
        f"worker via saq CLI, 1 asyncio process each, concurrency=10 (default), "
        f"dequeue_timeout=0 (default: blocking BLMOVE), job ttl 600s (default), "
        f"WARNING logging (default); "
    )
    if mode == "backlog":
        s += "client queue.enqueue once per job, awaited, before any worker"
    else:
        s += (
            f"client queue.enqueue (no bulk API), {SUBMIT_CHUNK} concurrent "
            f"(SAQ caps in-flight enqueues at max_concurrent_ops=20, default)"
        )
    if mode == "latency":
        s += f"; result via queue.apply(poll_interval={APPLY_POLL_INTERVAL}) (default 0.5s)"
    if args.tuned:
        s += "; --tuned: no poll delay to tune, same as default"
    return s


async def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = aioredis.Redis.from_url(args.redis_url)
    queue = Queue.from_url(args.redis_url, name=queue_name(run_id))
    await queue.connect()
    workers = WatchedWorkers(PEER, worker_cmd(), tuned_env(args, run_id, "throughput"), k)
    try:
        await async_wait_ready(r, workers, run_id, k)
        t0 = time.perf_counter()
        for lo in range(0, n, SUBMIT_CHUNK):
            await asyncio.gather(
                *(
                    queue.enqueue("bench_task", index=i, submitted_at=time.time())
                    for i in range(lo, min(n, lo + SUBMIT_CHUNK))
                )
            )
        t_sub = time.perf_counter()
        done = await async_wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        await async_cleanup(r, run_id)
        await queue.disconnect()
        await r.aclose()
    return throughput_result(
        PEER, pkg_version("saq"), n, k, done, t0, t_sub, t_done, settings_line(args, "throughput")
    )


async def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = aioredis.Redis.from_url(args.redis_url)
    queue = Queue.from_url(args.redis_url, name=queue_name(run_id))
    await queue.connect()
    workers = WatchedWorkers(PEER, worker_cmd(), tuned_env(args, run_id, "latency"), 1)
    try:
        await async_wait_ready(r, workers, run_id, 1)

        async def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            await queue.apply(
                "bench_task",
                timeout=RESULT_TIMEOUT_S,
                poll_interval=APPLY_POLL_INTERVAL,
                index=index,
                submitted_at=submitted_at,
            )
            return submitted_at, time.time()

        submitted, result_ms = await async_measure(one, r, run_id, n)
        raw = await r.lrange(f"bench:{run_id}:start", 0, -1)
    finally:
        workers.stop()
        await async_cleanup(r, run_id)
        await queue.disconnect()
        await r.aclose()
    start_ms = start_ms_from(raw, submitted)
    return latency_result(
        PEER, pkg_version("saq"), n, start_ms, result_ms, settings_line(args, "latency")
    )


async def run_backlog(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    queue = Queue.from_url(args.redis_url, name=queue_name(run_id))
    await queue.connect()
    bl = Backlog(r, run_id, n)
    try:
        bl.before()
        for i in range(n):
            await queue.enqueue("bench_task", index=i, submitted_at=time.time())
        bl.enqueued()
        env = tuned_env(args, run_id, "backlog")
        bl.drain(lambda: WatchedWorkers(PEER, worker_cmd(), env, k))
    finally:
        bl.stop()
        cleanup(r, run_id)
        await queue.disconnect()
        r.close()
    return bl.result(PEER, pkg_version("saq"), k, settings_line(args, "backlog"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--tuned", action="store_true", help="accepted for symmetry; changes nothing for saq"
    )


if __name__ == "__main__":
    sys.exit(main(PEER, run_throughput, run_latency, add_args, run_backlog=run_backlog))
