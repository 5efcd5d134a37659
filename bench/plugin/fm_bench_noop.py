"""The benchmark's no-op task for FlowMesh: counts itself in Redis like every peer's task."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from executors.base import Executor, TaskContext


class BenchNoop(Executor):
    name = "bench_noop"
    max_concurrency = 1

    def setup(self) -> None:
        self.redis = redis.Redis.from_url(os.environ["FLOWMESH_BENCH_REDIS_URL"])

    def run(self, task: TaskContext) -> dict[str, Any]:
        args = task.body.echo.message if task.body.echo else {}
        run_id, index = args["run"], args["i"]
        if args.get("latency"):
            self.redis.rpush(f"bench:{run_id}:start", f"{index}:{time.time()}")
        self.redis.incr(f"bench:{run_id}:done")
        return {"i": index}
