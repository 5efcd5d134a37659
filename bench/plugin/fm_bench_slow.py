"""The presence benchmark's executor: a slow start (like importing torch and loading a
model: some CPU, mostly waiting), then short tasks."""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel

from executors.base import Executor, ExecutorConfig, TaskContext


class SlowStartOptions(BaseModel):
    delaySec: float = 0.2


class BenchSlowStart(Executor):
    name = "bench_slow_start"
    options = SlowStartOptions

    def setup(self, config: ExecutorConfig) -> None:
        # A plugin of the benchmark's own, told its start-up time by the benchmark (as
        # fm_bench_noop is told where to count); FlowMesh's executors read no environment.
        setup_sec = float(os.environ.get("FLOWMESH_BENCH_SETUP_SEC", "20"))
        busy_sec = float(os.environ.get("FLOWMESH_BENCH_BUSY_SEC", "2"))
        t0 = time.monotonic()
        spins = 0
        while time.monotonic() - t0 < min(busy_sec, setup_sec):
            spins += 1
        time.sleep(max(0.0, setup_sec - (time.monotonic() - t0)))

    def run(self, task: TaskContext) -> dict[str, Any]:
        delay: float = task.options.delaySec
        time.sleep(delay)
        return {"slept": delay}
