"""`GET /metrics` scraped as Prometheus would: the backlog moves as tasks come and go."""

from __future__ import annotations

import httpx
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
