"""`GET /metrics`: the fleet in Prometheus's text format, read when scraped.

The gauges are read at scrape time, from the scheduler's memory (the backlog) and from
Redis (tasks by status, workers and their load, the model loads workers count), so
nothing on the task path pays for them. `flowmesh_backlog_tasks` is the figure an
autoscaler (KEDA's Prometheus scaler) reads: PENDING tasks per executor and resource class.

Queue waits, run times, attempts, failures and merges are counted by this orchestrator as
it consumes the events the task path writes anyway (orchestrator/task_stats.py): process-
local counters and histograms, from zero when it starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flowmesh import workers
from flowmesh.spec import Requirements
from flowmesh.status import TaskStatus
from orchestrator.fleet import Fleet

router = APIRouter()


def resource_class(req: Requirements) -> str:
    """`gpu` for a task that asks for a GPU, else `cpu`: what a worker pool is sized by."""
    return "gpu" if req.gpu_count else "cpu"


class _Snapshot:
    """A collector over figures read beforehand (prometheus-client collects synchronously;
    Redis is read asynchronously, before)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


async def collect(f: Fleet) -> list[Metric]:
    backlog = GaugeMetricFamily(
        "flowmesh_backlog_tasks",
        "PENDING tasks waiting for a worker, by executor and resource class (gpu/cpu)",
        labels=["executor", "resource_class"],
    )
    waiting = Counter(
        (e.requirements.executor, resource_class(e.requirements))
        for e in f.scheduler.pending.values()
    )
    for (executor, klass), n in sorted(waiting.items()):
        backlog.add_metric([executor, klass], n)

    k = f.keys
    async with f.conn.pipeline(transaction=False) as pipe:
        for status in TaskStatus:
            pipe.zcard(k.tasks_by_status(status))
        pipe.zcard(k.dead_letters)
        pipe.scard(k.pipelines_active)
        counts = await pipe.execute()
    tasks = GaugeMetricFamily("flowmesh_tasks", "Tasks in Redis by status", labels=["status"])
    for status, n in zip(TaskStatus, counts, strict=False):
        tasks.add_metric([status.value], n)
    dead = GaugeMetricFamily("flowmesh_dead_letters", "Tasks FAILED for good", value=counts[-2])
    pipelines = GaugeMetricFamily(
        "flowmesh_pipelines_active", "Pipelines not finished", value=counts[-1]
    )
    return [backlog, tasks, dead, pipelines, *await _workers(f), *f.stats.collect()]


async def _workers(f: Fleet) -> list[Metric]:
    by_status = GaugeMetricFamily(
        "flowmesh_workers",
        "Registered workers by status (disabled: out of placement, still registered)",
        labels=["status"],
    )
    gauges: dict[str, GaugeMetricFamily] = {
        name: GaugeMetricFamily(f"flowmesh_worker_{name}", help, labels=["worker"])
        for name, help in (
            ("slots", "Tasks the worker runs at once"),
            ("running_tasks", "Tasks placed on the worker and not finished"),
            ("up", "1 while the worker's heartbeat key exists"),
            ("cost_per_hour", "WORKER_COST_PER_HOUR"),
            ("cost_accrued", "Cost accrued since the worker started (cost_per_hour x hours)"),
            ("cpu_percent", "Machine CPU use, percent"),
            ("memory_used_bytes", "Machine memory in use"),
            ("loaded_models", "Models loaded in the worker's executors"),
        )
    }
    gpu: dict[str, GaugeMetricFamily] = {
        name: GaugeMetricFamily(f"flowmesh_worker_gpu_{name}", help, labels=["worker", "gpu"])
        for name, help in (
            ("utilization_percent", "GPU utilisation, percent (NVML)"),
            ("memory_used_bytes", "GPU memory in use (NVML)"),
            ("memory_total_bytes", "GPU memory (NVML)"),
            ("power_watts", "GPU power draw (NVML)"),
        )
    }
    loads = CounterMetricFamily(
        "flowmesh_model_loads",
        "Models loaded by the worker's executors since it started (counted by the worker)",
        labels=["worker", "executor"],
    )
    states: Counter[str] = Counter()
    for record, pttl, held in await workers.read_all(f.conn, f.keys):
        states["disabled" if record.disabled else record.status or "unknown"] += 1
        w = [record.worker_id]
        load: dict[str, Any] = record.load or {}
        gauges["slots"].add_metric(w, record.slots)
        gauges["running_tasks"].add_metric(w, len(held))
        gauges["up"].add_metric(w, 1 if pttl > 0 else 0)
        gauges["cost_per_hour"].add_metric(w, record.cost_per_hour)
        gauges["cost_accrued"].add_metric(w, record.cost_accrued)
        gauges["loaded_models"].add_metric(w, len(record.loaded_models))
        for executor, n in sorted(record.model_loads.items()):
            loads.add_metric([record.worker_id, executor], float(n))
        if "cpu_percent" in load:
            gauges["cpu_percent"].add_metric(w, float(load["cpu_percent"]))
        if "memory_used" in load:
            gauges["memory_used_bytes"].add_metric(w, float(load["memory_used"]))
        for g in load.get("gpus") or []:
            labels = [record.worker_id, str(g.get("index", "?"))]
            for name, field in (
                ("utilization_percent", "utilization"),
                ("memory_used_bytes", "memory_used"),
                ("memory_total_bytes", "memory_total"),
                ("power_watts", "power_watts"),
            ):
                if g.get(field) is not None:
                    gpu[name].add_metric(labels, float(g[field]))
    for status, n in sorted(states.items()):
        by_status.add_metric([status], n)
    return [by_status, *gauges.values(), *gpu.values(), loads]


@router.get("/metrics", summary="The fleet in Prometheus's text format (backlog, tasks, workers)")
async def metrics(request: Request) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await collect(request.app.state.fleet)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
