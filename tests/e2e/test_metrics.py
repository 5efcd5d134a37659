"""`GET /metrics` scraped as Prometheus would: the backlog moves as tasks come and go."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until


def scrape(orchestrator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = orchestrator.http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def backlog(metrics, executor: str = "echo", klass: str = "cpu") -> float:
    key = ("flowmesh_backlog_tasks", (("executor", executor), ("resource_class", klass)))
    return metrics.get(key, 0.0)


def test_backlog_rises_with_submits_and_drains_to_zero(orchestrator, start_worker):
    assert backlog(scrape(orchestrator)) == 0
    gpu_task = {"spec": {"taskType": "echo", "resources": {"hardware": {"gpu": {"count": 1}}}}}
    orchestrator.submit(*[{"spec": {"taskType": "echo"}}] * 5, gpu_task)
    metrics = scrape(orchestrator)
    assert backlog(metrics) == 5  # no worker yet: everything waits
    assert backlog(metrics, klass="gpu") == 1
    assert metrics[("flowmesh_tasks", (("status", "PENDING"),))] == 6

    start_worker("w1")
    wait_until(lambda: backlog(scrape(orchestrator)) == 0, timeout=30, what="the backlog drained")
    metrics = wait_until(
        lambda: (m := scrape(orchestrator))[("flowmesh_tasks", (("status", "DONE"),))] == 5 and m,
        timeout=30,
    )
    assert backlog(metrics, klass="gpu") == 1  # no GPU worker: it still waits, and says so
    assert metrics[("flowmesh_workers", (("status", "idle"),))] == 1
    assert metrics[("flowmesh_worker_up", (("worker", "w1"),))] == 1
    assert metrics[("flowmesh_worker_slots", (("worker", "w1"),))] >= 1


def test_metrics_need_the_api_token(start_orchestrator):
    orchestrator = start_orchestrator(token="metrics-token-0123456789")
    assert httpx.get(f"{orchestrator.url}/metrics").status_code == 401
    assert orchestrator.http.get("/metrics").status_code == 200


def samples(metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in metrics.items() if n == name}


def echo(**spec: object) -> dict:
    return {"spec": {"taskType": "echo", **spec}}


def test_task_timings_attempts_failures_and_merges_are_counted(orchestrator, start_worker):
    # Queued before any worker exists, so the identical pair is placed as one delivery.
    done = orchestrator.submit(*[echo(echo={"message": i}) for i in range(3)])
    (permanent,) = orchestrator.submit(echo(echo={"fail": "no good"}))
    # Times out twice (both attempts are retried failures: the second one for good).
    (timed_out,) = orchestrator.submit(
        echo(echo={"delaySec": 30}, timeoutSec=0.5, maxAttempts=2, retryBackoffSec=0.1)
    )
    twins = orchestrator.submit(*[echo(merge=True, echo={"message": "twin", "delaySec": 0.5})] * 2)
    metrics = scrape(orchestrator)
    assert not samples(metrics, "flowmesh_task_attempts_ended_total")  # nothing ran yet

    start_worker("w1", WORKER_CANCEL_GRACE_SEC="0.5")
    (cancelled,) = orchestrator.submit(echo(echo={"delaySec": 30}))
    orchestrator.wait(cancelled, ("RUNNING",))
    assert orchestrator.http.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
    tasks = [
        orchestrator.wait(t, timeout=60) for t in [*done, permanent, timed_out, *twins, cancelled]
    ]
    statuses = [t["status"] for t in tasks]
    assert statuses == ["DONE"] * 3 + ["FAILED", "FAILED", "DONE", "DONE", "CANCELLED"]
    history = [h for t in tasks for h in t["history"]]
    assert len(history) == 9  # 3 + 1 + 2 (timed out, retried, timed out) + 2 twins + 1
    served = [t for t in tasks if (t["result"] or {}).get("executed_by")]
    assert len(served) == 1  # one twin ran; the other got its result

    echo_label = (("executor", "echo"),)

    def counted():
        m = scrape(orchestrator)
        ended = m.get(("flowmesh_task_attempts_ended_total", echo_label))
        return ended == len(history) and m

    metrics = wait_until(counted, timeout=30, what="every ended attempt counted")
    failures = {
        dict(labels)["kind"]: v
        for labels, v in samples(metrics, "flowmesh_task_failures_total").items()
        if dict(labels)["executor"] == "echo"
    }
    assert failures == {"permanent": 1, "timeout": 2, "cancelled": 1}
    # The same as the tasks' histories say.
    kinds = [h["outcome"] for h in history if h["outcome"] != "done"]
    assert failures == {k: kinds.count(k) for k in kinds}
    # Every attempt here started (the cancelled one was RUNNING), so each was timed.
    for name in ("flowmesh_task_queue_wait_seconds", "flowmesh_task_run_seconds"):
        count = metrics[(f"{name}_count", echo_label)]
        assert count == len(history), name
        assert metrics[(f"{name}_bucket", (*echo_label, ("le", "+Inf")))] == count
        assert metrics[(f"{name}_sum", echo_label)] >= 0
    assert metrics[("flowmesh_task_run_seconds_sum", echo_label)] > 0
    # Task merge: the twins shared one delivery, and one run served both.
    assert metrics[("flowmesh_merged_tasks_total", echo_label)] == 1
    assert metrics[("flowmesh_merge_runs_saved_total", echo_label)] == 1
    assert metrics[("flowmesh_merge_saved_seconds_total", echo_label)] >= 0


@pytest.mark.timeout(180)
def test_model_loads_are_counted_per_worker_and_executor(orchestrator, start_worker, rdb, tmp_path):
    pytest.importorskip("torch", reason="needs the inference extra: uv sync --extra inference")
    pytest.importorskip("transformers", reason="needs the inference extra")
    from flowmesh.tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny-llama")
    start_worker("w1", WORKER_EXECUTORS="echo,inference")
    spec = {
        "spec": {
            "taskType": "inference",
            "model": {"source": {"identifier": str(model)}},
            "data": {"items": ["hello"]},
            "inference": {"max_tokens": 2, "temperature": 0},
        }
    }
    tasks = []
    for _ in range(2):  # one after the other: the second finds the model warm
        (task_id,) = orchestrator.submit(spec)
        tasks.append(orchestrator.wait(task_id, timeout=150))
    assert [t["status"] for t in tasks] == ["DONE", "DONE"], tasks[0]["error"]
    assert [t["result"]["warm"] for t in tasks] == [False, True]
    key = ("flowmesh_model_loads_total", (("executor", "inference"), ("worker", "w1")))
    wait_until(lambda: scrape(orchestrator).get(key) == 1, timeout=30, what="one model load")
    (row,) = orchestrator.http.get("/api/v1/workers").json()["workers"]
    assert row["model_loads"]["inference"] == 1
