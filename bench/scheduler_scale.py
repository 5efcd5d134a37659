"""Scheduler scale, in process: time per placement decision and memory per pending task.

    uv run python -m bench.scheduler_scale --workers 1000 --tasks 100000

Builds a simulated fleet (varied CPUs, RAM, GPUs, tags, executors, warm models) and a
backlog of pending tasks with varied requirements, then plans placements the way the
orchestrator does (`Scheduler.plan`), releasing finished tasks so the fleet keeps room.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

from flowmesh.spec import Requirements
from flowmesh.store import QueueEntry
from orchestrator.scheduler import GpuView, Scheduler, WorkerView

GPUS = [
    GpuView("NVIDIA H100 80GB HBM3", 80 * 2**30),
    GpuView("NVIDIA A100-SXM4-40GB", 40 * 2**30),
    GpuView("NVIDIA L4", 24 * 2**30),
]
TAGS = ["eu", "us", "spot", "nvlink", "fast-disk"]
MODELS = ["llama-3-8b", "qwen2.5-7b", "mistral-7b", None]


def fleet(n: int, rng: random.Random) -> list[WorkerView]:
    views = []
    for i in range(n):
        gpu = rng.choice([None, *GPUS])
        views.append(
            WorkerView(
                worker_id=f"w{i:04d}",
                inbox=f"tasks:inbox:w{i:04d}",
                executors=frozenset(
                    rng.sample(["echo", "inference", "sft", "rag"], rng.randint(1, 4))
                ),
                tags=frozenset(rng.sample(TAGS, rng.randint(0, 2))),
                cpu=float(rng.choice([8, 16, 32, 64])),
                memory=rng.choice([32, 64, 256]) * 2**30,
                gpus=(gpu,) * rng.choice([1, 2, 4, 8]) if gpu else (),
                slots=rng.choice([4, 8, 16]),
                status="idle",
                alive=True,
                cost_per_hour=rng.choice([0.5, 1.0, 2.5, 4.0]),
                loaded_models=frozenset(m for m in [rng.choice(MODELS)] if m),
            )
        )
    return views


def requirement_kinds(rng: random.Random, k: int) -> list[Requirements]:
    kinds = []
    for _ in range(k):
        gpu = rng.choice([0, 0, 1, 2])
        kinds.append(
            Requirements(
                executor=rng.choice(["echo", "inference", "sft", "rag"]),
                cpu=float(rng.choice([0, 1, 2, 4])),
                memory=rng.choice([0, 4, 16]) * 2**30,
                gpu_count=gpu,
                gpu_type=rng.choice([None, "H100", "A100"]) if gpu else None,
                tags=tuple(sorted(rng.sample(TAGS, rng.choice([0, 0, 1])))),
                model=rng.choice(MODELS),
            )
        )
    return kinds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--kinds", type=int, default=50, help="distinct requirement sets")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    kinds = requirement_kinds(rng, args.kinds)
    views = fleet(args.workers, rng)
    reqs = [rng.choice(kinds) for _ in range(args.tasks)]
    ids = [f"{i:032x}" for i in range(args.tasks)]  # task ids are 32 hex chars

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    s = Scheduler()
    s.set_workers(views, {})
    for i, (task_id, req) in enumerate(zip(ids, reqs, strict=True)):
        # A stand-in for the queue score submit.lua stores: five priority levels, then age.
        score = float(rng.randint(0, 4) * args.tasks + i)
        s.add_pending(QueueEntry(task_id, req, score), 0.0)
    pending_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    placed = 0
    decisions = 0
    t_plan = 0.0
    while s.pending:
        t0 = time.perf_counter()
        plan, blocked = s.plan(1000, 0.0)
        t_plan += time.perf_counter() - t0
        decisions += len(plan) + len(blocked)
        placed += len(plan)
        if not plan:
            break
        for placement in plan:  # the fleet finishes them; room again for the next round
            s.release(placement.task_id)
    per_decision_us = t_plan / max(decisions, 1) * 1e6
    print(f"{'workers':<28}{args.workers}")
    print(f"{'pending tasks':<28}{args.tasks}")
    print(f"{'requirement kinds':<28}{args.kinds}")
    print(f"{'placed':<28}{placed} ({args.tasks - placed} never placeable)")
    print(f"{'placement decision':<28}{per_decision_us:.1f} us (target <= 50 us)")
    print(f"{'scheduler memory / pending':<28}{pending_bytes / args.tasks:.0f} B (target < 2048 B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
