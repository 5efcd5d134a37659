"""Benchmark runner for arq (https://github.com/python-arq/arq), the common peer protocol.

Run with the arq venv's python, from the repo root:

    .bench/venvs/arq/bin/python bench/peers/arq_runner.py --redis-url URL \
        --mode {throughput,latency,backlog} --tasks N --workers K --out OUT.json

Imports only arq and redis-py. Worker processes are started with arq's own CLI
(`python -m arq arq_runner.WorkerSettings`), each in its own process group, and are
killed at the end. The worker side reads its configuration from BENCH_* environment
variables, because arq reads WorkerSettings when it imports this module.

Defaults kept: max_jobs=10, poll_delay=0.5 s, keep_result=3600 s, the CLI's INFO logging
(two log lines per job). arq has no blocking read: the worker reads its queue (a sorted
set) with ZRANGEBYSCORE once per poll_delay, at most queue_read_limit=100 job ids a time
(max(5*max_jobs, 100)), so a worker tops out near 100/0.5 s = 200 jobs/s and an idle one
starts a job up to 0.5 s late. `--tuned` sets the worker's poll_delay to 0.01 s, for a
"what a tuned setting gives" number; it is not the headline.

Backlog mode (`harness.Backlog`): the N jobs are enqueued first, one awaited `enqueue_job`
at a time, with no worker running; then K worker CLIs start and drain them.
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
from arq import create_pool, func
from arq.connections import RedisSettings
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

PEER = "arq"

# ---- worker side (read when arq's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
TUNED = os.environ.get("BENCH_TUNED") == "1"
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

TUNED_POLL_DELAY = 0.01
# client side, latency mode: job.result(poll_delay=...); arq's default is 0.5 s
RESULT_POLL_DELAY = 0.001


def queue_for(run_id: str) -> str:
    return f"arq:queue:bench-{run_id}"


async def bench_task(ctx: dict, index: int, submitted_at: float) -> None:
    started = time.time()
    r = ctx["redis"]
    if MODE == "latency":
        await r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    elif MODE == "backlog" and first_start():
        await r.rpush(f"bench:{RUN_ID}:first", repr(started))
    await r.incr(f"bench:{RUN_ID}:done")


async def _on_startup(ctx: dict) -> None:
    await ctx["redis"].incr(f"bench:{RUN_ID}:ready")


class WorkerSettings:
    functions = [func(bench_task, name="bench_task")]
    redis_settings = RedisSettings.from_dsn(WORKER_REDIS_URL)
    queue_name = queue_for(RUN_ID)
    on_startup = _on_startup
    if TUNED:
        poll_delay = TUNED_POLL_DELAY


SUBMIT_CHUNK = 100  # concurrent enqueues in flight (asyncio.gather in bounded chunks)


# ---- peer-specific client side ----
def tuned_env(args: argparse.Namespace, run_id: str, mode: str) -> dict[str, str]:
    return worker_env(args, run_id, mode, BENCH_TUNED="1" if args.tuned else "0")


def worker_cmd() -> list[str]:
    return [sys.executable, "-m", "arq", "arq_runner.WorkerSettings"]


def settings_line(args: argparse.Namespace, mode: str) -> str:
    if args.tuned:
        poll = f"poll_delay={TUNED_POLL_DELAY}s (TUNED; default 0.5s)"
    else:
        poll = "poll_delay=0.5s (default)"
    s = (
        f"arq {pkg_version('arq')} + redis-py {pkg_version('redis')}; "
        f"worker via arq CLI, 1 asyncio process each, max_jobs=10 (default), {poll}, "
        f"keep_result=3600s (default), INFO logging (default); "
    )
    if mode == "backlog":
        s += "client enqueue_job once per job, awaited, before any worker"
    else:
        s += f"client enqueue_job (no bulk API), {SUBMIT_CHUNK} concurrent"
    if mode == "latency":
        s += f"; result via job.result(poll_delay={RESULT_POLL_DELAY}) (default poll_delay 0.5s)"
    return s


async def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = aioredis.Redis.from_url(args.redis_url)
    pool = await create_pool(
        RedisSettings.from_dsn(args.redis_url), default_queue_name=queue_for(run_id)
    )
    workers = WatchedWorkers(PEER, worker_cmd(), tuned_env(args, run_id, "throughput"), k)
    try:
        await async_wait_ready(r, workers, run_id, k)
        t0 = time.perf_counter()
        for lo in range(0, n, SUBMIT_CHUNK):
            await asyncio.gather(
                *(
                    pool.enqueue_job("bench_task", i, time.time(), _job_id=f"bench-{run_id}-{i}")
                    for i in range(lo, min(n, lo + SUBMIT_CHUNK))
                )
            )
        t_sub = time.perf_counter()
        done = await async_wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        await async_cleanup(r, run_id)
        await pool.aclose()
        await r.aclose()
    return throughput_result(
        PEER, pkg_version("arq"), n, k, done, t0, t_sub, t_done, settings_line(args, "throughput")
    )


async def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = aioredis.Redis.from_url(args.redis_url)
    pool = await create_pool(
        RedisSettings.from_dsn(args.redis_url), default_queue_name=queue_for(run_id)
    )
    workers = WatchedWorkers(PEER, worker_cmd(), tuned_env(args, run_id, "latency"), 1)
    try:
        await async_wait_ready(r, workers, run_id, 1)

        async def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            job = await pool.enqueue_job(
                "bench_task", index, submitted_at, _job_id=f"bench-{run_id}-{index}"
            )
            await job.result(timeout=RESULT_TIMEOUT_S, poll_delay=RESULT_POLL_DELAY)
            return submitted_at, time.time()

        submitted, result_ms = await async_measure(one, r, run_id, n)
        raw = await r.lrange(f"bench:{run_id}:start", 0, -1)
    finally:
        workers.stop()
        await async_cleanup(r, run_id)
        await pool.aclose()
        await r.aclose()
    start_ms = start_ms_from(raw, submitted)
    return latency_result(
        PEER, pkg_version("arq"), n, start_ms, result_ms, settings_line(args, "latency")
    )


async def run_backlog(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    pool = await create_pool(
        RedisSettings.from_dsn(args.redis_url), default_queue_name=queue_for(run_id)
    )
    bl = Backlog(r, run_id, n)
    try:
        bl.before()
        for i in range(n):
            await pool.enqueue_job("bench_task", i, time.time(), _job_id=f"bench-{run_id}-{i}")
        bl.enqueued()
        env = tuned_env(args, run_id, "backlog")
        bl.drain(lambda: WatchedWorkers(PEER, worker_cmd(), env, k))
    finally:
        bl.stop()
        cleanup(r, run_id)
        await pool.aclose()
        r.close()
    return bl.result(PEER, pkg_version("arq"), k, settings_line(args, "backlog"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--tuned", action="store_true", help="non-default worker poll_delay (not the headline)"
    )


if __name__ == "__main__":
    sys.exit(main(PEER, run_throughput, run_latency, add_args, run_backlog=run_backlog))
