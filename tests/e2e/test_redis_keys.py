"""What the README's key schema promises is what the code writes, read back with plain Redis."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from flowmesh.failures import FailureKind, failure
from flowmesh.keys import Keys
from flowmesh.spec import TaskSpec
from flowmesh.status import TaskStatus
from flowmesh.store import Ending, NewTask, QueueEntry, TaskStore
from tests.conftest import wait_until


def test_documented_keys_after_a_task(orchestrator, start_worker, rdb):
    start_worker("w1", WORKER_TAGS="x")
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo", "echo": {"message": "k"}}})
    orchestrator.wait(task_id)

    assert rdb.smembers("workers:ids") == {"w1"}
    worker = rdb.hgetall("worker:w1")
    for field in (
        "status",
        "hardware",
        "tags",
        "executors",
        "slots",
        "inbox",
        "cost_per_hour",
        "last_seen",
        "loaded_models",
        "current_tasks",
        "load",
        "cost_accrued",
    ):
        assert field in worker, field
    assert json.loads(worker["tags"]) == ["x"]
    assert worker["inbox"] == "tasks:inbox:w1"
    # HEARTBEAT_INTERVAL_SEC=0.5 in tests: TTL is max(0.5 * 4, 120) = 120.
    assert 100 < rdb.ttl("worker:w1:heartbeat") <= 120

    task = rdb.hgetall(f"task:{task_id}")
    assert task["status"] == "DONE"
    assert task["attempts"] == "1"
    assert task["worker_id"] == "w1"
    assert json.loads(task["result"])["message"] == "k"
    assert rdb.zscore("tasks:status:DONE", task_id) is not None
    assert rdb.zscore("tasks:all", task_id) is not None
    assert rdb.zcard("tasks:pending") == 0
    assert rdb.scard("worker:w1:tasks") == 0

    assert rdb.type("tasks:inbox:w1") == "stream"
    (group,) = rdb.xinfo_groups("tasks:inbox:w1")
    assert group["name"] == "worker"
    assert group["pending"] == 0  # acked together with the recorded result
    types = [fields["type"] for _, fields in rdb.xrange("events")]
    assert "worker.registered" in types
    assert "task.started" in types and "task.finished" in types


def test_a_pending_task_is_a_compact_hash_and_its_spec_key(orchestrator, rdb):
    """A pending task costs Redis about 1.2 KB, not 2.9: its hash stays listpack-encoded
    (every value short) because the spec, without its defaults, has a key of its own. The
    API still shows the whole spec, defaults included."""
    (task_id,) = orchestrator.submit(
        {"spec": {"taskType": "echo", "priority": 5, "echo": {"message": "m" * 200}}}
    )
    assert rdb.hget(f"task:{task_id}", "status") == "PENDING"  # no worker: it stays so
    assert rdb.object("encoding", f"task:{task_id}") == "listpack"
    assert "spec" not in rdb.hkeys(f"task:{task_id}")
    stored = json.loads(rdb.get(f"task:{task_id}:spec"))
    assert stored == {"spec": {"taskType": "echo", "priority": 5, "echo": {"message": "m" * 200}}}
    shown = orchestrator.task(task_id)["spec"]
    assert shown["spec"]["echo"] == {"message": "m" * 200}
    assert shown["spec"]["priority"] == 5 and shown["spec"]["maxAttempts"] == 3
    assert shown["apiVersion"] == "flowmesh/v1" and shown["kind"] == "Task"


def test_heartbeat_ttl_follows_the_interval(start_worker, rdb):
    start_worker("slow-beat", HEARTBEAT_INTERVAL_SEC="40")
    assert 150 < rdb.ttl("worker:slow-beat:heartbeat") <= 160


def test_task_topic_and_key_prefix_name_the_keys(start_orchestrator, start_worker, rdb):
    orch = start_orchestrator(REDIS_KEY_PREFIX="fleetA:")
    start_worker("w9", TASK_TOPIC="jobs", REDIS_KEY_PREFIX="fleetA:")
    (task_id,) = orch.submit({"spec": {"taskType": "echo"}})
    assert orch.wait(task_id)["status"] == "DONE"
    assert rdb.smembers("fleetA:workers:ids") == {"w9"}
    assert rdb.hget(f"fleetA:task:{task_id}", "status") == "DONE"
    assert rdb.type("fleetA:jobs:inbox:w9") == "stream"
    assert not rdb.exists("workers:ids")
    assert wait_until(lambda: rdb.exists("fleetA:events"))


def test_queue_score_is_stored_at_submit_and_reused_by_every_requeue(redis_url, rdb):
    """submit.lua computes the pending-queue score once and stores it as `score`; the score
    comes back to Python, the hash, the queue, a retry (settle.lua) and a dead-letter requeue
    (requeue_dead.lua) all hold exactly the same number, digits near 2^51 included."""
    first_seq = 10**12 - 10  # scores up to 2.001e15: every digit must survive
    rdb.set("tasks:seq", first_seq - 1)
    priorities = [1000, 0, -1000, 5, 5]

    async def scenario() -> tuple[list[NewTask], list[QueueEntry | None], list[str]]:
        conn = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            store = TaskStore(conn, Keys())
            specs = [
                TaskSpec.model_validate({"spec": {"taskType": "echo", "priority": p}})
                for p in priorities
            ]
            tasks, _ = await store.submit(specs)
            entries = await store.queue_entries([t.task_id for t in tasks])
            # A retry and a dead-letter requeue of the first task, on a made-up worker.
            t = tasks[0].task_id
            outcomes = []
            for attempt, kind in ((1, FailureKind.EXCEPTION), (2, FailureKind.PERMANENT)):
                await conn.zrem("tasks:pending", t)
                await conn.hset(
                    f"task:{t}",
                    mapping={"status": "DISPATCHED", "attempts": attempt, "worker_id": "w"},
                )
                (outcome,) = await store.settle_many(
                    "w", [Ending(t, attempt, TaskStatus.FAILED, error=failure(kind, "x"))]
                )
                outcomes.append(outcome.reason)
                if outcome.reason == "PENDING":
                    outcomes.append(str(await conn.zscore("tasks:pending", t)))
            assert (await store.requeue_dead(t)).ok
            return tasks, entries, outcomes
        finally:
            await conn.aclose()

    tasks, entries, outcomes = asyncio.run(scenario())
    expected = [(1000 - p) * 10**12 + first_seq + i for i, p in enumerate(priorities)]
    assert [t.seq for t in tasks] == [first_seq + i for i in range(len(priorities))]
    assert [t.score for t in tasks] == [float(e) for e in expected]
    assert [int(t.score) for t in tasks] == expected
    assert [rdb.hget(f"task:{t.task_id}", "score") for t in tasks] == [str(e) for e in expected]
    assert [e.score for e in entries if e] == [t.score for t in tasks]
    assert [rdb.zscore("tasks:pending", t.task_id) for t in tasks] == [t.score for t in tasks]
    # Higher priority first, then older first.
    order = [t.task_id for t in sorted(tasks, key=lambda t: t.score)]
    assert order == [tasks[i].task_id for i in (0, 3, 4, 1, 2)]
    assert outcomes == ["PENDING", str(tasks[0].score), "FAILED"]
    assert rdb.zscore("tasks:pending", tasks[0].task_id) == tasks[0].score


def test_take_reads_and_starts_in_one_call_but_leaves_a_task_held_here(redis_url, rdb):
    """take.lua (a busy worker's read): each new entry's attempt is started as start.lua
    would, a merged entry's children included; an attempt whose task the worker still holds
    is left DISPATCHED, to be read again by id; a refused one is reported. Nothing is acked:
    every entry stays pending until its attempt is settled."""
    rdb.hset("worker:w", mapping={"status": "idle", "slots": 8, "prefetch": 0})
    rdb.set("worker:w:heartbeat", "1")
    rdb.xgroup_create("tasks:inbox:w", "worker", id="0", mkstream=True)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        conn = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            store = TaskStore(conn, Keys())
            specs = [TaskSpec.model_validate({"spec": {"taskType": "echo"}}) for _ in range(5)]
            tasks, _ = await store.submit(specs)
            ids = [t.task_id for t in tasks]
            # ids[0] alone; ids[1] and ids[2] merged in one delivery; ids[3] and ids[4] alone.
            placed = [(ids[0], ""), (ids[1], ids[1]), (ids[2], ids[1]), (ids[3], ""), (ids[4], "")]
            outcomes = await store.dispatch([(t, "w", "tasks:inbox:w", p) for t, p in placed])
            assert all(o.ok for o in outcomes)
            await conn.hset(f"task:{ids[4]}", "status", "CANCELLED")  # cancelled meanwhile
            taken = await store.take("w", "tasks:inbox:w", 10, here=[ids[3]])
            got = [
                "started" if o and o.ok else "held" if o is None else "refused"
                for _, _, row in taken
                for o in row
            ]
            again = await store.take("w", "tasks:inbox:w", 10, here=[])
            assert again == []
            return ids, [f["task_id"] for _, f, _ in taken], got
        finally:
            await conn.aclose()

    ids, entry_tasks, got = asyncio.run(scenario())
    assert entry_tasks == [ids[0], ids[1], ids[3], ids[4]]  # four entries, one merged
    assert got == ["started", "started", "started", "held", "refused"]
    status = [rdb.hget(f"task:{t}", "status") for t in ids]
    assert status == ["RUNNING", "RUNNING", "RUNNING", "DISPATCHED", "CANCELLED"]
    assert all(rdb.hget(f"task:{t}", "started_at") for t in ids[:3])
    assert rdb.hget(f"task:{ids[3]}", "started_at") is None
    started = [f["task_id"] for _, f in rdb.xrange("events") if f["type"] == "task.started"]
    assert sorted(started) == sorted(ids[:3])
    assert rdb.zrange("tasks:status:RUNNING", 0, -1) == ids[:3]
    assert rdb.xpending("tasks:inbox:w", "worker")["pending"] == 4  # none acked
    assert not rdb.sismember("worker:w:tasks", ids[4])  # the refused one freed its slot
