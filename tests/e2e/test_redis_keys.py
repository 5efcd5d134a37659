"""What the README's key schema promises is what the code writes, read back with plain Redis."""

from __future__ import annotations

import json

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
