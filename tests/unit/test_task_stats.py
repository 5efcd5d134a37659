"""The orchestrator's task figures (orchestrator/task_stats.py) as Prometheus reads them,
and the model loads a worker counts (worker/host.py) and records (flowmesh/workers.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from executors.base import ExecutorConfig
from flowmesh.status import WorkerStatus
from flowmesh.workers import WorkerPresence, WorkerRecord
from orchestrator.task_stats import RUN_BUCKETS, WAIT_BUCKETS, TaskStats
from worker.host import ExecutorProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def exposed(stats: TaskStats) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(stats)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def ended(outcome: str | None, wait: str = "", run: str = "", **fields: str) -> dict[str, str]:
    out = {"type": "task.finished", "task_id": "t", "executor": "echo", **fields}
    if outcome is not None:
        out.update(outcome=outcome, wait_sec=wait, run_sec=run)
    return out


def test_buckets_span_a_millisecond_to_hours_and_ten_milliseconds_to_a_day():
    assert WAIT_BUCKETS[0] == 0.001 and WAIT_BUCKETS[-1] >= 3600
    assert RUN_BUCKETS[0] == 0.01 and RUN_BUCKETS[-1] == 86400
    assert list(WAIT_BUCKETS) == sorted(WAIT_BUCKETS)
    assert list(RUN_BUCKETS) == sorted(RUN_BUCKETS)


def test_attempts_failures_and_timings_by_executor_and_kind():
    stats = TaskStats()
    stats.attempt_ended(ended("done", wait="0.002", run="0.5"))
    stats.attempt_ended(ended("timeout", wait="3", run="30"))
    stats.attempt_ended(ended("timeout", wait="0.0005", run="30"))
    stats.attempt_ended(ended("cancelled"))  # ended before it started: no timings
    stats.attempt_ended(ended("exception", wait="1", run="2", executor="inference"))
    stats.attempt_ended(ended(None))  # a dead letter's requeue, say: no attempt ended
    m = exposed(stats)

    assert m[("flowmesh_task_attempts_ended_total", (("executor", "echo"),))] == 4
    assert m[("flowmesh_task_attempts_ended_total", (("executor", "inference"),))] == 1
    failures = {
        (labels[0][1], labels[1][1]): v
        for (name, labels), v in m.items()
        if name == "flowmesh_task_failures_total"
    }
    assert failures == {
        ("echo", "timeout"): 2,
        ("echo", "cancelled"): 1,
        ("inference", "exception"): 1,
    }

    wait = "flowmesh_task_queue_wait_seconds"
    echo = (("executor", "echo"),)
    assert m[(f"{wait}_count", echo)] == 3
    assert m[(f"{wait}_sum", echo)] == 3.0025
    # Cumulative buckets, upper bounds inclusive.
    assert m[(f"{wait}_bucket", (("executor", "echo"), ("le", "0.001")))] == 1
    assert m[(f"{wait}_bucket", (("executor", "echo"), ("le", "0.005")))] == 2
    assert m[(f"{wait}_bucket", (("executor", "echo"), ("le", "1.0")))] == 2
    assert m[(f"{wait}_bucket", (("executor", "echo"), ("le", "5.0")))] == 3
    assert m[(f"{wait}_bucket", (("executor", "echo"), ("le", "+Inf")))] == 3
    run = "flowmesh_task_run_seconds"
    assert m[(f"{run}_count", echo)] == 3 and m[(f"{run}_sum", echo)] == 60.5
    assert m[(f"{run}_bucket", (("executor", "echo"), ("le", "30.0")))] == 3
    assert m[(f"{run}_count", (("executor", "inference"),))] == 1


def test_merges_and_the_runs_they_saved():
    stats = TaskStats()
    stats.placed_merged("echo", 3)
    stats.attempt_ended(ended("done", wait="0.1", run="2.5", executed_by="owner"))
    stats.attempt_ended(ended("done", wait="0.1", run="2.5"))  # the owner: ran itself
    m = exposed(stats)
    echo = (("executor", "echo"),)
    assert m[("flowmesh_merged_tasks_total", echo)] == 3
    assert m[("flowmesh_merge_runs_saved_total", echo)] == 1
    assert m[("flowmesh_merge_saved_seconds_total", echo)] == 2.5


def test_nothing_ended_nothing_exposed():
    m = exposed(TaskStats())
    assert not [k for k in m if k[0].startswith(("flowmesh_task_", "flowmesh_merge"))]


def test_a_workers_model_loads_survive_its_childs_restart():
    class Gone:
        exitcode = -9

    proc = ExecutorProcess("inference", "INFO", ExecutorConfig("w1"))
    assert proc.model_loads == 0
    proc.health = {"loaded_models": ["m"], "model_loads": 2}
    assert proc.model_loads == 2
    child: Any = Gone()
    proc._proc = child
    proc._on_exit(child)  # the child died: its health is gone, its loads are not
    assert proc.health == {} and proc.model_loads == 2
    proc.health = {"model_loads": 1}  # the next child's own count
    assert proc.model_loads == 3


def test_model_loads_go_in_the_worker_hash_when_reported():
    def presence(**extra: Any) -> WorkerPresence:
        return WorkerPresence(
            status=WorkerStatus.IDLE,
            running=0,
            current_tasks=[],
            loaded_models=[],
            executor_states={},
            devices={},
            load={},
            cost_accrued=0.0,
            **extra,
        )

    assert "model_loads" not in presence().to_hash(0.0)
    raw = presence(model_loads={"inference": 2}).to_hash(0.0)
    record = WorkerRecord.from_hash({"worker_id": "w1", **{k: str(v) for k, v in raw.items()}})
    assert record.model_loads == {"inference": 2}
    assert WorkerRecord.from_hash({"worker_id": "w1"}).model_loads == {}
