"""Benchmark runner for Dramatiq (https://dramatiq.io), the common peer protocol.

Run with the dramatiq venv's python, from the repo root:

    .bench/venvs/dramatiq/bin/python bench/peers/dramatiq_runner.py --redis-url URL \
        --mode {throughput,latency,backlog} --tasks N --workers K --out OUT.json

Imports only dramatiq and redis-py. The workers are started with Dramatiq's own CLI,
`python -m dramatiq dramatiq_runner --processes K --threads 8`: one supervisor process
that forks K worker processes, all in one process group of their own, killed at the end.
The worker side reads its configuration from BENCH_* environment variables, because the
CLI sets the broker up when it imports this module.

Settings (the headline):
- K worker processes, each with Dramatiq's default 8 worker threads; prefetch is the
  default, 2 x threads = 16 messages per process; acks after the actor ran (Dramatiq's
  only mode); default middleware (AgeLimit, TimeLimit, ShutdownNotifications, Callbacks,
  Pipelines, Retries);
- an idle consumer polls the queue (a Lua fetch, no blocking read) with an exponential
  backoff from 10-20 ms up to the default worker_timeout of 1000 ms: this is what sets the
  start latency of a single task sent to an idle worker;
- throughput mode: no result backend; latency mode: the `Results` middleware with the
  Redis backend on the same Redis, results read with `message.get_result(block=True)`
  (BRPOPLPUSH);
- client: `actor.send()` in a loop (Dramatiq has no bulk enqueue: `group` sends one by one
  too) on the broker's connection pool;
- the broker's key namespace is `dramatiq-bench-<run_id>` instead of `dramatiq` so every
  key of the run (queue, .msgs, acks, heartbeats) can be deleted at the end; this changes
  only the key names.

Backlog mode (`harness.Backlog`): the N messages are sent first, one `actor.send` each,
with no worker running; then the CLI starts (one supervisor forking K worker processes:
"worker" and "child" in the CPU split) and drains them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version as pkg_version
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
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

PEER = "dramatiq"
ACTOR_NAME = "bench_task"
THREADS = 8  # Dramatiq's default --threads

# ---- worker side (read when Dramatiq's CLI imports this module) ----
RUN_ID = os.environ.get("BENCH_RUN_ID", "unset")
MODE = os.environ.get("BENCH_MODE", "throughput")
WORKER_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def queue_for(run_id: str) -> str:
    return f"bench-{run_id}"


def namespace_for(run_id: str) -> str:
    return f"dramatiq-bench-{run_id}"


_client: Any = None
_client_pid = -1


def _redis() -> Any:
    """One client per process (thread-safe: redis-py's pool serves the 8 worker threads)."""
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


class _Ready(Middleware):
    """Counts booted worker processes in bench:<run_id>:ready."""

    def __init__(self, redis_url: str, run_id: str):
        self.redis_url = redis_url
        self.run_id = run_id

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        redis.Redis.from_url(self.redis_url).incr(f"bench:{self.run_id}:ready")


def setup(
    redis_url: str, run_id: str, mode: str, worker_side: bool
) -> tuple[RedisBroker, Any, Any]:
    """The broker, the actor and (latency mode) the result backend, for either side."""
    broker = RedisBroker(url=redis_url, namespace=namespace_for(run_id))
    backend = None
    if mode == "latency":
        backend = RedisBackend(url=redis_url)
        broker.add_middleware(Results(backend=backend))
    if worker_side:
        broker.add_middleware(_Ready(redis_url, run_id))
    dramatiq.set_broker(broker)
    opts = {"store_results": True} if mode == "latency" else {}
    actor = dramatiq.actor(
        bench_task, actor_name=ACTOR_NAME, queue_name=queue_for(run_id), broker=broker, **opts
    )
    return broker, actor, backend


if os.environ.get("BENCH_DRAMATIQ_WORKER") == "1":
    broker, _actor, _backend = setup(WORKER_REDIS_URL, RUN_ID, MODE, worker_side=True)


# ---- peer-specific client side ----
def worker_cmds(args: argparse.Namespace, run_id: str, k: int) -> list[list[str]]:
    # one CLI supervisor forking K worker processes (Dramatiq's own way to run K processes)
    return [
        [
            sys.executable,
            "-m",
            "dramatiq",
            "dramatiq_runner",
            "--processes",
            str(k),
            "--threads",
            str(THREADS),
        ]
    ]


def dramatiq_env(args: argparse.Namespace, run_id: str, mode: str) -> dict[str, str]:
    return worker_env(args, run_id, mode, BENCH_DRAMATIQ_WORKER="1")


def settings_line(args: argparse.Namespace, mode: str, k: int) -> str:
    parts = [
        f"dramatiq {pkg_version('dramatiq')} + redis-py {pkg_version('redis')}",
        f"worker via dramatiq CLI: --processes {k} --threads {THREADS} (default threads)",
        f"prefetch {2 * THREADS}/process (default)",
        "ack after run (only mode)",
        "default middleware",
        "idle poll backoff up to worker_timeout 1000 ms (default)",
    ]
    if mode == "latency":
        parts.append("Results middleware, RedisBackend (same server), get_result(block=True)")
    elif mode == "backlog":
        parts.append("no result backend")
        parts.append("client actor.send() once per task, before any worker")
    else:
        parts.append("no result backend")
        parts.append("client actor.send() in a loop (no bulk API)")
    return "; ".join(parts)


def run_throughput(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    client_broker, actor, _ = setup(args.redis_url, run_id, "throughput", worker_side=False)
    workers = Workers(PEER, worker_cmds(args, run_id, k), dramatiq_env(args, run_id, "throughput"))
    try:
        wait_ready(r, workers, run_id, k)
        t0 = time.perf_counter()
        for i in range(n):
            actor.send(i, time.time())
        t_sub = time.perf_counter()
        done = wait_done(r, workers, run_id, n, t0)
        t_done = time.perf_counter()
    finally:
        workers.stop()
        cleanup(r, run_id)
        client_broker.close()
        r.close()
    return throughput_result(
        PEER,
        pkg_version("dramatiq"),
        n,
        k,
        done,
        t0,
        t_sub,
        t_done,
        settings_line(args, "throughput", k),
    )


def run_latency(args: argparse.Namespace, run_id: str) -> dict:
    n = args.tasks
    r = redis.Redis.from_url(args.redis_url)
    client_broker, actor, backend = setup(args.redis_url, run_id, "latency", worker_side=False)
    workers = Workers(PEER, worker_cmds(args, run_id, 1), dramatiq_env(args, run_id, "latency"))
    try:
        wait_ready(r, workers, run_id, 1)

        def one(index: int) -> tuple[float, float]:
            submitted_at = time.time()
            message = actor.send(index, submitted_at)
            message.get_result(backend=backend, block=True, timeout=int(RESULT_TIMEOUT_S * 1000))
            seen = time.time()
            r.delete(
                backend.build_message_key(message)
            )  # the result key (a hash: no pattern finds it)
            return submitted_at, seen

        submitted, result_ms = measure(one, r, run_id, n)
        start_ms = start_times(r, run_id, submitted)
    finally:
        workers.stop()
        cleanup(r, run_id)
        client_broker.close()
        r.close()
    return latency_result(
        PEER, pkg_version("dramatiq"), n, start_ms, result_ms, settings_line(args, "latency", 1)
    )


def run_backlog(args: argparse.Namespace, run_id: str) -> dict:
    n, k = args.tasks, args.workers
    r = redis.Redis.from_url(args.redis_url)
    client_broker, actor, _ = setup(args.redis_url, run_id, "backlog", worker_side=False)
    bl = Backlog(r, run_id, n)
    try:
        bl.before()
        for i in range(n):
            actor.send(i, time.time())
        bl.enqueued()
        env = dramatiq_env(args, run_id, "backlog")
        bl.drain(lambda: Workers(PEER, worker_cmds(args, run_id, k), env))
    finally:
        bl.stop()
        cleanup(r, run_id)
        client_broker.close()
        r.close()
    return bl.result(PEER, pkg_version("dramatiq"), k, settings_line(args, "backlog", k))


if __name__ == "__main__":
    sys.exit(main(PEER, run_throughput, run_latency, run_backlog=run_backlog))
