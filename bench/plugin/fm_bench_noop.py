"""The benchmark's no-op task for FlowMesh: counts itself in Redis like every peer's task."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from pydantic import BaseModel

from executors.base import Executor, ExecutorConfig, TaskContext


class BenchArgs(BaseModel):
    run: str
    i: int
    t: float = 0.0
    latency: bool = False
    backlog: bool = False


class BenchNoop(Executor):
    name = "bench_noop"
    options = BenchArgs
    max_concurrency = 1

    def setup(self, config: ExecutorConfig) -> None:
        # A plugin of the benchmark's own, told where the benchmark counts (like each
        # peer's task); FlowMesh's executors take every setting from `config`.
        self.redis = redis.Redis.from_url(os.environ["FLOWMESH_BENCH_REDIS_URL"])
        self.first_noted = False

    def run(self, task: TaskContext) -> dict[str, Any]:
        started = time.time()
        args: BenchArgs = task.options
        if args.latency:
            self.redis.rpush(f"bench:{args.run}:start", f"{args.i}:{started}")
        elif args.backlog and not self.first_noted:  # once per process, as the peers do
            self.first_noted = True
            self.redis.rpush(f"bench:{args.run}:first", repr(started))
        self.redis.incr(f"bench:{args.run}:done")
        return {"i": args.i}
