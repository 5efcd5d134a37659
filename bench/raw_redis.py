"""What Redis itself allows on this machine: the floor under every queue's numbers.

Round trip: one LPUSH then one BRPOP, one item at a time (a queue's minimum per-task cost).
Pipelined: N items pushed in pipelines of 500, then popped with LPOP count=500 in pipelines.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from bench.stats import percentile


def round_trip(url: str, n: int = 2000) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    key = f"bench:raw:{uuid.uuid4().hex[:8]}"
    times = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        r.lpush(key, i)
        r.brpop([key], timeout=1)
        times.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    r.delete(key)
    r.close()
    return {
        "system": "redis LPUSH+BRPOP",
        "mode": "raw",
        "ops": n,
        "throughput": n / total,
        "p50_ms": percentile(times, 0.5),
        "p99_ms": percentile(times, 0.99),
    }


def pipelined(url: str, n: int = 10_000, batch: int = 500) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    key = f"bench:raw:{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + batch)):
                pipe.lpush(key, i)
            pipe.execute()
    popped = 0
    while popped < n:
        got = r.lpop(key, batch) or []
        popped += len(got)
    total = time.perf_counter() - t0
    r.delete(key)
    r.close()
    return {"system": "redis pipelined", "mode": "raw", "ops": n, "throughput": n / total}
