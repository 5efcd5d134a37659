"""Redis memory per pending task: what a backlog of echo tasks costs the Redis server.

    uv run python -m bench.redis_memory --redis-url URL --tasks 100000

Stores N echo tasks through `TaskStore.submit` (the same script call the API makes, in
batches of 500) under a private key prefix, with no worker to take them, and reads Redis's
`used_memory` before and after. Everything a pending task keeps is counted: its hash (spec,
requirements, status fields, history), its entries in `tasks:all`, `tasks:status:PENDING`
and the pending queue. The keys are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

from bench.peers.harness import async_delete_matching
from flowmesh.keys import Keys
from flowmesh.redis_conn import client
from flowmesh.spec import TaskSpec
from flowmesh.store import TaskStore


def echo_spec(i: int) -> TaskSpec:
    return TaskSpec.model_validate(
        {"spec": {"taskType": "echo", "echo": {"message": {"i": i, "note": "a pending task"}}}}
    )


async def measure(redis_url: str, tasks: int) -> dict[str, Any]:
    conn = client(redis_url)
    keys = Keys(f"fmmem{uuid.uuid4().hex[:6]}:")
    store = TaskStore(conn, keys)
    try:
        await conn.execute_command("MEMORY", "PURGE")
        before = int((await conn.info("memory"))["used_memory"])
        for start in range(0, tasks, 500):
            await store.submit([echo_spec(i) for i in range(start, min(tasks, start + 500))])
        after = int((await conn.info("memory"))["used_memory"])
        sample = await conn.hgetall(keys.task((await conn.zrange(keys.tasks_all, 0, 0))[0]))
        return {
            "tasks": tasks,
            "bytes_per_task": (after - before) / tasks,
            "hash_fields": len(sample),
            "spec_bytes": len(sample.get("spec", "")),
        }
    finally:
        await async_delete_matching(conn, f"{keys.prefix}*")
        await conn.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--tasks", type=int, default=100_000)
    args = p.parse_args()
    print(json.dumps(asyncio.run(measure(args.redis_url, args.tasks))))


if __name__ == "__main__":
    main()
