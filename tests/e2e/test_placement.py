"""Placement by executor, tags and hardware, with a visible reason while a task waits."""

from __future__ import annotations

from tests.conftest import wait_until


def spec(task_type: str = "echo", **resources: object) -> dict:
    return {"spec": {"taskType": task_type, "resources": resources}}


def test_tags_send_tasks_only_to_workers_that_have_them(orchestrator, start_worker):
    start_worker("plain")
    start_worker("tagged", WORKER_TAGS="a100,eu")
    tagged = orchestrator.submit(*[spec(tags=["a100"]) for _ in range(10)])
    anywhere = orchestrator.submit(*[spec() for _ in range(10)])
    assert {orchestrator.wait(t)["worker_id"] for t in tagged} == {"tagged"}
    assert {orchestrator.wait(t)["status"] for t in anywhere} == {"DONE"}


def test_task_no_worker_fits_waits_with_a_reason_until_one_does(orchestrator, start_worker):
    start_worker("small", WORKER_CPUS="1", WORKER_MEMORY="1Gi")
    big, gpu, tagged, fits = orchestrator.submit(
        spec(hardware={"memory": "2Gi"}),
        spec(hardware={"gpu": {"count": 1, "type": "H100"}}),
        spec(tags=["gpu"]),
        spec(hardware={"cpu": 1, "memory": "512Mi"}),
    )
    assert orchestrator.wait(fits)["worker_id"] == "small"

    def reason(task_id: str) -> str:
        task = orchestrator.task(task_id)
        assert task["status"] == "PENDING"
        return task["reason"] or ""

    assert "GiB RAM" in reason(big)
    assert "GPU" in reason(gpu) and "H100" in reason(gpu)
    assert "lacks tag(s) gpu" in reason(tagged)
    # The reason is also written to the task hash, for redis-cli users.
    assert (
        "GiB RAM"
        in orchestrator.http.get("/api/v1/tasks", params={"status": "PENDING"}).json()["tasks"][0][
            "reason"
        ]
    )

    start_worker("large", WORKER_MEMORY="4Gi")
    assert orchestrator.wait(big)["worker_id"] == "large"
    assert orchestrator.task(gpu)["status"] == "PENDING"


def test_task_for_an_executor_no_worker_offers_waits_with_reason(orchestrator, start_worker):
    start_worker("echo-only")
    (task_id,) = orchestrator.submit(
        {
            "spec": {
                "taskType": "inference",
                "model": {"source": {"identifier": "some/model"}},
                "data": {"items": ["hi"]},
            }
        }
    )
    reason = wait_until(lambda: orchestrator.task(task_id)["reason"], what="a pending reason")
    assert "lacks executor 'inference'" in reason


def test_resources_are_accounted_so_a_worker_is_not_oversubscribed(orchestrator, start_worker):
    start_worker("w1", WORKER_CPUS="2", WORKER_SLOTS="8")
    ids = orchestrator.submit(
        *[
            {
                "spec": {
                    "taskType": "echo",
                    "echo": {"delaySec": 0.6},
                    "resources": {"hardware": {"cpu": 1}},
                }
            }
            for _ in range(4)
        ]
    )
    tasks = [orchestrator.wait(t) for t in ids]
    # Two 1-CPU tasks fit a 2-CPU worker at a time: never three running together.
    events = sorted([(t["started_at"], 1) for t in tasks] + [(t["finished_at"], -1) for t in tasks])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2


def echo_slow(message: object, **resources: object) -> dict:
    return {
        "spec": {
            "taskType": "echo",
            "echo": {"message": message, "delaySec": 1.5},
            "resources": resources,
        }
    }


def test_prefetch_queues_work_in_the_inbox_and_a_killed_worker_loses_none(
    orchestrator, start_worker, rdb
):
    import signal

    w1 = start_worker("w1", WORKER_SLOTS="1", WORKER_PREFETCH="2")
    ids = orchestrator.submit(*[echo_slow(i) for i in range(4)])
    # One running, two queued in w1's inbox (they start as soon as the slot frees, without
    # the orchestrator), the fourth pending.
    wait_until(lambda: rdb.scard("worker:w1:tasks") == 3, what="3 tasks held by w1")
    statuses = sorted(orchestrator.task(t)["status"] for t in ids)
    assert statuses == ["DISPATCHED", "DISPATCHED", "PENDING", "RUNNING"], statuses
    assert rdb.xlen("tasks:inbox:w1") == 3
    (row,) = orchestrator.http.get("/api/v1/workers").json()["workers"]
    assert (row["slots"], row["prefetch"]) == (1, 2)
    # A task holding a CPU is never queued behind others: it waits where it can start.
    (heavy,) = orchestrator.submit(echo_slow("heavy", hardware={"cpu": 1}))
    assert orchestrator.task(heavy)["status"] == "PENDING"
    # w1 dies holding a running task and two queued ones: all are re-placed, none lost.
    start_worker("w2", WORKER_SLOTS="4", WORKER_PREFETCH="0")
    w1.signal(signal.SIGKILL)
    tasks = [orchestrator.wait(t, timeout=60) for t in [*ids, heavy]]
    assert [t["status"] for t in tasks] == ["DONE"] * 5
    for t in tasks:
        assert [h["outcome"] for h in t["history"]].count("done") == 1, t["history"]
