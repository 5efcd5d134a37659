"""Task merge through a real fleet: compatible pending tasks travel in one delivery and
each still gets its own status, result and files; identical ones run once, including
one that arrives while the first runs; a cancel stops only its own task; a merged
delivery lost with its worker goes back to the queue uncharged; `merge: false` opts out.

`echo` merges only when a spec asks (`spec.merge: true`); it is deterministic (its
result is its input), so identical echo tasks run once, like greedy inference."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import redis

from tests.conftest import Orchestrator, wait_until


def echo(
    message: Any = "hi",
    *,
    delay: float = 0.0,
    items: list[Any] | None = None,
    merge: bool | None = True,
    **extra: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"taskType": "echo", "echo": {"message": message, "delaySec": delay}}
    if merge is not None:
        spec["merge"] = merge
    if items is not None:
        spec["data"] = {"items": items}
    spec.update(extra)
    return {"apiVersion": "flowmesh/v1", "kind": "Task", "spec": spec}


def inbox_entries(rdb: redis.Redis, worker_id: str) -> int:
    return int(rdb.xlen(f"tasks:inbox:{worker_id}"))


def test_compatible_tasks_travel_in_one_delivery_and_each_keeps_its_own_outcome(
    orchestrator: Orchestrator, start_worker, rdb: redis.Redis, results_dir: Path
):
    # Queued before any worker exists, so the first placement sees all six.
    ids = orchestrator.submit(*(echo("batch", items=[f"prompt {i}"]) for i in range(6)))
    start_worker("w1", WORKER_SLOTS="16")
    tasks = [orchestrator.wait(t) for t in ids]

    assert [t["status"] for t in tasks] == ["DONE"] * 6
    assert [t["result"]["items"] for t in tasks] == [[f"prompt {i}"] for i in range(6)]
    # One inbox entry carried all six: one parent, each child naming the others.
    assert inbox_entries(rdb, "w1") == 1
    parents = {t["merge"]["parent"] for t in tasks}
    assert len(parents) == 1 and parents <= set(ids)
    for t in tasks:
        assert t["merge"]["merged"] is True
        assert sorted(t["merge"]["with"]) == sorted(set(ids) - {t["task_id"]})
        assert t["merge"]["executed_by"] is None  # different data: each ran itself
        assert len(t["history"]) == 1 and t["history"][0]["outcome"] == "done"
        # Each child's own files, written by the runner.
        responses = json.loads((results_dir / t["task_id"] / "responses.json").read_text())
        assert responses["task_id"] == t["task_id"]
        assert responses["result"]["items"] == t["result"]["items"]
    # Every entry is settled and acked once the last child is.
    assert rdb.xpending("tasks:inbox:w1", "worker")["pending"] == 0


def test_identical_tasks_run_once_and_every_requester_gets_the_result(
    orchestrator: Orchestrator, start_worker, results_dir: Path
):
    ids = orchestrator.submit(*(echo("same", delay=1.0, items=["q"]) for _ in range(4)))
    start_worker("w1")
    tasks = [orchestrator.wait(t) for t in ids]
    assert [t["status"] for t in tasks] == ["DONE"] * 4
    runners = [t for t in tasks if t["merge"]["executed_by"] is None]
    assert len(runners) == 1, "identical tasks must run once"
    owner = runners[0]["task_id"]
    for t in tasks:
        assert t["result"]["message"] == "same" and t["result"]["items"] == ["q"]
        if t["task_id"] != owner:
            assert t["result"]["executed_by"] == owner
            assert (results_dir / t["task_id"] / "responses.json").exists()


def test_an_identical_task_arriving_while_the_first_runs_joins_it(
    orchestrator: Orchestrator, start_worker
):
    start_worker("w1")
    start_worker("w2")
    [first] = orchestrator.submit(echo("late", delay=2.0))
    orchestrator.wait(first, ("RUNNING",))
    later = orchestrator.submit(echo("late", delay=2.0), echo("late", delay=2.0))
    tasks = [orchestrator.wait(t) for t in [first, *later]]
    assert [t["status"] for t in tasks] == ["DONE"] * 3
    # Sent to the worker running the first (not the idle one), and not run again there.
    assert {t["worker_id"] for t in tasks} == {tasks[0]["worker_id"]}
    assert [t["result"].get("executed_by") for t in tasks] == [None, first, first]


def test_cancelling_one_merged_task_cancels_only_that_one(orchestrator: Orchestrator, start_worker):
    ids = orchestrator.submit(*(echo("c", delay=3.0) for _ in range(3)))
    start_worker("w1")
    for t in ids:
        orchestrator.wait(t, ("RUNNING",))
    victim = ids[1]
    assert orchestrator.http.post(f"/api/v1/tasks/{victim}/cancel").status_code == 200
    assert orchestrator.wait(victim)["status"] == "CANCELLED"
    rest = [orchestrator.wait(t, timeout=30) for t in ids if t != victim]
    assert [t["status"] for t in rest] == ["DONE", "DONE"]


def test_cancelling_the_task_that_runs_leaves_its_twins_running(
    orchestrator: Orchestrator, start_worker
):
    ids = orchestrator.submit(*(echo("o", delay=3.0) for _ in range(3)))
    start_worker("w1")
    for t in ids:
        orchestrator.wait(t, ("RUNNING",))
    time.sleep(0.5)
    # The delivery's parent runs; its twins wait for its outcome. Cancel it and one twin:
    # the run goes on for the last one.
    parent = orchestrator.task(ids[0])["merge"]["parent"]
    others = [t for t in ids if t != parent]
    for t in (parent, others[0]):
        assert orchestrator.http.post(f"/api/v1/tasks/{t}/cancel").status_code == 200
    assert orchestrator.wait(parent)["status"] == "CANCELLED"
    assert orchestrator.wait(others[0])["status"] == "CANCELLED"
    last = orchestrator.wait(others[1], timeout=30)
    assert last["status"] == "DONE"
    assert last["result"]["message"] == "o" and last["result"]["executed_by"] == parent


def test_a_merged_delivery_lost_with_its_worker_is_requeued_uncharged(
    orchestrator: Orchestrator, start_worker, rdb: redis.Redis
):
    ids = orchestrator.submit(*(echo("k", delay=30.0, items=[i]) for i in range(3)))
    w1 = start_worker("w1")
    for t in ids:
        orchestrator.wait(t, ("RUNNING",))
    w1.signal(signal.SIGKILL)
    start_worker("w2", **{"WORKER_EXECUTORS": "echo"})
    # Requeued after the lease, then placed on w2 (where delay 30 s runs on): wait for that.
    for t in ids:
        wait_until(
            lambda t=t: orchestrator.task(t)["worker_id"] == "w2",
            timeout=30,
            what=f"{t} re-placed on w2",
        )
    for t in ids:
        task = orchestrator.task(t)
        assert task["failures"] == 0, "a merged delivery's loss is charged to no child"
        assert task["history"][0]["outcome"] == "worker_lost"
        assert task["attempts"] == 2
        assert rdb.hget(f"task:{t}", "status") in ("DISPATCHED", "RUNNING")


def test_merge_false_opts_out(orchestrator: Orchestrator, start_worker, rdb: redis.Redis):
    ids = orchestrator.submit(*(echo("x", merge=False) for _ in range(3)))
    start_worker("w1")
    tasks = [orchestrator.wait(t) for t in ids]
    assert [t["status"] for t in tasks] == ["DONE"] * 3
    assert all(t["merge"] is None and "executed_by" not in t["result"] for t in tasks)
    assert inbox_entries(rdb, "w1") == 3


def test_merge_is_off_for_echo_unless_asked(orchestrator: Orchestrator, start_worker):
    ids = orchestrator.submit(*(echo("y", merge=None) for _ in range(2)))
    start_worker("w1")
    tasks = [orchestrator.wait(t) for t in ids]
    assert all(t["merge"] is None for t in tasks)
