"""Benchmark runner for Taskiq + taskiq-redis, the common peer protocol.

Run with the taskiq venv's python, from the repo root:

    .bench/venvs/taskiq/bin/python bench/peers/taskiq_runner.py --redis-url URL \
        --mode {throughput,latency,backlog} --tasks N --workers K --out OUT.json

Imports only taskiq, taskiq-redis and redis-py. Setup as taskiq-redis's README shows it:
RedisStreamBroker (Redis streams, consumer group, acks) with RedisAsyncResultBackend
(here with result_ex_time=3600, which the README "highly recommends"). Each worker
process is taskiq's own CLI, `python -m taskiq worker taskiq_runner:broker --workers 1`
(a supervisor process plus one worker child, one process group), with the default
--max-async-tasks 100, --ack-type when_saved and INFO logging (one log line per task).
The worker side reads its configuration from BENCH_* environment variables, because the
CLI imports this module to find `broker`.

The stream broker blocks in XREADGROUP (xread_block=2000 ms, count=100): no poll delay.
The client side of latency mode polls with task.wait_result(check_interval=0.001)
(default 0.2 s). `--tuned` is accepted for symmetry with the other runners and changes
nothing here.

Backlog mode (`harness.Backlog`): the N tasks are sent first, one awaited `task.kiq` at a
time, with no worker running (the client's `broker.startup()` has made the consumer group,
so they are kept); then K worker CLIs start (each a supervisor, "worker" in the CPU split,
and its worker child, "child") and drain them.
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
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

PEER = "taskiq"

# ---- worker side (read when taskiq's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

RESULT_CHECK_INTERVAL = 0.001  # client side, latency mode; taskiq's default is 0.2 s
RESULT_EX_TIME = 3600


def make_broker(url: str, run_id: str) -> RedisStreamBroker:
    name = f"taskiq:bench-{run_id}"
    backend = RedisAsyncResultBackend(redis_url=url, result_ex_time=RESULT_EX_TIME, prefix_str=name)
    return RedisStreamBroker(url=url, queue_name=name).with_result_backend(backend)


_bench_redis: aioredis.Redis | None = None  # the worker's own client for the bench counters


async def bench_task(index: int, submitted_at: float) -> None:
    started = time.time()
    r = _bench_redis
    if MODE == "latency":
        await r.rpush(f"bench:{RUN_ID}:start", f"{index}:{started!r}")
    elif MODE == "backlog" and first_start():
        await r.rpush(f"bench:{RUN_ID}:first", repr(started))
    await r.incr(f"bench:{RUN_ID}:done")


broker = make_broker(WORKER_REDIS_URL, RUN_ID)
broker.register_task(bench_task, task_name="bench_task")


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _on_worker_startup(state: TaskiqState) -> None:
    global _bench_redis
    _bench_redis = aioredis.Redis.from_url(WORKER_REDIS_URL)
    await _bench_redis.incr(f"bench:{RUN_ID}:ready")


SUBMIT_CHUNK = 100  # concurrent enqueues in flight (asyncio.gather in bounded chunks)


# ---- peer-specific client side ----
def tuned_env(args: argparse.Namespace, run_id: str, mode: str) -> dict[str, str]:
    return worker_env(args, run_id, mode, BENCH_TUNED="1" if args.tuned else "0")


def worker_cmd() -> list[str]:
    return [sys.executable, "-m", "taskiq", "worker", "taskiq_runner:broker", "--workers", "1"]


def settings_line(args: argparse.Namespace, mode: str) -> str:
    s = (
        f"taskiq {pkg_version('taskiq')} + taskiq-redis {pkg_version('taskiq-redis')} + "
        f"redis-py {pkg_version('redis')}; RedisStreamBroker (XREADGROUP block 2000ms, count 100, "
        f"acks) + RedisAsyncResultBackend(result_ex_time={RESULT_EX_TIME}); worker via taskiq CLI "
        f"--workers 1 per process (supervisor + 1 child), --max-async-tasks 100 (default), "
        f"ack when_saved (default), INFO logging (default); "
    )
    if mode == "backlog":
        s += "client task.kiq once per task, awaited, before any worker"
    else:
        s += f"client task.kiq (no bulk API), {SUBMIT_CHUNK} concurrent"
    if mode == "latency":
        s += f"; result via task.wait_result(check_interval={RESULT_CHECK_INTERVAL}) (default 0.2s)"
    if args.tuned:
        s += "; --tuned: no poll delay to tune, same as default"
    return s


async def client_broker(url: str, run_id: str):
    b = make_broker(url, run_id)
    task = b.register_task(bench_task, task_name="bench_task")
    await (
        b.startup()
    )  # declares the consumer group (the workers do too): messages sent after it are kept
    return b, task


async def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = aioredis.Redis.from_url(args.redis_url)
    b, task = await client_broker(args.redis_url, run_id)
    workers = WatchedWorkers(PEER, worker_cmd(), tuned_env(args, run_id, "throughput"), k)
    try:
        await async_wait_ready(r, workers, run_id, k)
        t0 = time.perf_counter()
        for lo in range(0, n, SUBMIT_CHUNK):
            await asyncio.gather(
                *(task.kiq(i, time.time()) for i in range(lo, min(n, lo + SUBMIT_CHUNK)))
            )
        t_sub = time.perf_counter()
        done = await async_wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        await async_cleanup(r, run_id)
        await b.shutdown()
        await r.aclose()
    return throughput_result(
        PEER,
        pkg_version("taskiq"),
        n,
        k,
        done,
        t0,
        t_sub,
        t_done,
        settings_line(args, "throughput"),
    )


async def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = aioredis.Redis.from_url(args.redis_url)
    b, task = await client_broker(args.redis_url, run_id)
    workers = WatchedWorkers(PEER, worker_cmd(), tuned_env(args, run_id, "latency"), 1)
    try:
        await async_wait_ready(r, workers, run_id, 1)

        async def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            t = await task.kiq(index, submitted_at)
            res = await t.wait_result(
                check_interval=RESULT_CHECK_INTERVAL, timeout=RESULT_TIMEOUT_S
            )
            seen = time.time()
            if res.is_err:
                raise RuntimeError(f"task {index} failed: {res.error!r}")
            return submitted_at, seen

        submitted, result_ms = await async_measure(one, r, run_id, n)
        raw = await r.lrange(f"bench:{run_id}:start", 0, -1)
    finally:
        workers.stop()
        await async_cleanup(r, run_id)
        await b.shutdown()
        await r.aclose()
    start_ms = start_ms_from(raw, submitted)
    return latency_result(
        PEER, pkg_version("taskiq"), n, start_ms, result_ms, settings_line(args, "latency")
    )


async def run_backlog(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    b, task = await client_broker(args.redis_url, run_id)
    bl = Backlog(r, run_id, n)
    try:
        bl.before()
        for i in range(n):
            await task.kiq(i, time.time())
        bl.enqueued()
        env = tuned_env(args, run_id, "backlog")
        bl.drain(lambda: WatchedWorkers(PEER, worker_cmd(), env, k))
    finally:
        bl.stop()
        cleanup(r, run_id)
        await b.shutdown()
        r.close()
    return bl.result(PEER, pkg_version("taskiq"), k, settings_line(args, "backlog"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--tuned", action="store_true", help="accepted for symmetry; changes nothing for taskiq"
    )


if __name__ == "__main__":
    sys.exit(main(PEER, run_throughput, run_latency, add_args, run_backlog=run_backlog))
