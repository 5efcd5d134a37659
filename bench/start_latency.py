"""Where an idle fleet's submit→start time goes, step by step.

One orchestrator and one worker (FlowMesh's defaults) on a private Redis; N no-op tasks
submitted one at a time, each long-polled to its end. For each, the times the task hash
records (`created_at` before submit.lua, `dispatched_at` before dispatch.lua, `started_at`
before start.lua) and the executor's own start time (`bench_noop`), against the client's
time before its POST. Prints the median of each step.

    uv run --group bench python -m bench.start_latency [--tasks 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.flowmesh_runner import Fleet, spec
from flowmesh.embedded import EmbeddedRedis

STEPS = (
    ("POST sent → stored (HTTP, intake, until submit.lua)", "t0", "created_at"),
    ("stored → dispatched (submit.lua, placement)", "created_at", "dispatched_at"),
    ("dispatched → started (dispatch.lua, the worker's read)", "dispatched_at", "started_at"),
    ("started → executor runs (start.lua, pipe, child)", "started_at", "child"),
    ("submit → start", "t0", "child"),
    ("executor runs → finished (outputs, settle)", "child", "finished_at"),
    ("submit → result seen by the long poll", "t0", "seen"),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", type=int, default=300)
    args = p.parse_args()
    rows: list[dict[str, float]] = []
    with EmbeddedRedis() as server:
        fleet = Fleet(server.url, 1, None, log_level=None)
        try:
            run = "latency0"
            for i in range(-20, args.tasks):  # the first 20 warm up
                body = spec(run, i, latency=True)
                t0 = body["spec"]["bench_noop"]["t"] = time.time()
                task_id = fleet.client.submit(body)[0]["task_id"]
                if fleet.client.task(task_id, wait=30)["status"] != "DONE":
                    raise RuntimeError(f"task {task_id} did not end DONE")
                seen = time.time()
                task = fleet.r.hgetall(f"{fleet.prefix}task:{task_id}")
                child = float(fleet.r.lindex(f"bench:{run}:start", -1).decode().split(":")[1])
                if i >= 0:
                    row = {k.decode(): float(v) for k, v in task.items() if k.endswith(b"_at")}
                    rows.append({**row, "t0": t0, "child": child, "seen": seen})
                time.sleep(0.01)
            fleet.r.delete(f"bench:{run}:start", f"bench:{run}:done")
        finally:
            fleet.close()
    print(f"FlowMesh, idle fleet, {args.tasks} tasks one at a time, p50 ms:")
    for name, a, b in STEPS:
        print(f"  {name:58s} {statistics.median(r[b] - r[a] for r in rows) * 1000:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
