"""GPU assignment on a real GPU worker: each task gets its GPUs whole, its process sees only
them, and WORKER_GPUS restricts what the worker offers. Skipped where NVML sees no GPU."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.gpu

PLUGIN = """
import os, time
from pydantic import BaseModel
from executors.base import Executor


class ProbeOptions(BaseModel):
    holdSec: float = 1.0


def probe(task):
    seen = None
    try:
        import torch
        seen = torch.cuda.device_count()
    except ImportError:
        pass
    start = time.time()
    time.sleep(task.options.holdSec)
    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "devices": list(task.devices),
        "torch_sees": seen,
        "start": start,
        "end": time.time(),
    }


class Isolated(Executor):
    name = "gpu_isolated"
    options = ProbeOptions
    isolation = "task"

    def run(self, task):
        return probe(task)


class Shared(Executor):
    name = "gpu_shared"
    options = ProbeOptions
    max_concurrency = 8

    def run(self, task):
        return probe(task)
"""


def nvml_gpus() -> list[dict[str, str]]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
        out.append({"index": str(i), "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid})
    return out


@pytest.fixture
def gpus() -> list[dict[str, str]]:
    found = nvml_gpus()
    if not found:
        pytest.skip("needs an NVIDIA GPU: NVML sees none on this machine")
    return found


@pytest.fixture
def plugin(install_plugin) -> str:
    return install_plugin(
        "fm_gpuprobe", PLUGIN, {"gpu_isolated": "Isolated", "gpu_shared": "Shared"}
    )


def overlapping(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.mark.parametrize("executor", ["gpu_isolated", "gpu_shared"])
def test_each_task_gets_whole_gpus_of_its_own(
    start_orchestrator, start_worker, plugin, gpus, rdb, executor
):
    orchestrator = start_orchestrator(PYTHONPATH=plugin)
    n = len(gpus)
    start_worker("g1", WORKER_EXECUTORS=executor, WORKER_SLOTS=str(n + 2), PYTHONPATH=plugin)
    spec = {
        "taskType": executor,
        executor: {"holdSec": 2},
        "resources": {"hardware": {"gpu": {"count": 1}}},
    }
    ids = orchestrator.submit(*({"spec": spec} for _ in range(n + 1)))
    # While they run, the worker record says which attempt holds which GPU.
    held = wait_until(
        lambda: json.loads(rdb.hget("worker:g1", "devices") or "{}"),
        what="the worker record to show GPUs held",
    )
    assert all(len(v) == 1 for v in held.values())
    results = [orchestrator.wait(t, timeout=120)["result"] for t in ids]
    uuids = {g["uuid"] for g in gpus}
    for r in results:
        if executor == "gpu_isolated":
            # Its own process sees exactly its GPU, as CUDA ordinal 0.
            assert r["visible"] in uuids and r["devices"] == [0]
            assert r["torch_sees"] in (None, 1)
        else:
            # The shared process sees the worker's GPUs; the task is told its ordinal.
            assert len(r["devices"]) == 1
    for i, a in enumerate(results):
        for b in results[i + 1 :]:
            if overlapping(a, b):
                assert (a["visible"], a["devices"]) != (b["visible"], b["devices"])
    # More tasks than GPUs: at least two of them could not run at the same time.
    assert any(not overlapping(a, b) for i, a in enumerate(results) for b in results[i + 1 :])
    wait_until(
        lambda: json.loads(rdb.hget("worker:g1", "devices") or "{}") == {},
        what="every GPU to be freed",
    )


def test_worker_gpus_restricts_what_the_worker_offers(start_worker, gpus, rdb, orchestrator):
    start_worker("g1", WORKER_GPUS=gpus[-1]["uuid"])
    hardware = json.loads(rdb.hget("worker:g1", "hardware"))
    assert [g["uuid"] for g in hardware["gpus"]] == [gpus[-1]["uuid"]]


def test_nvml_telemetry_reaches_the_metrics_scrape(start_orchestrator, start_worker, gpus):
    """Each GPU's utilisation, memory and power, read by the worker through NVML, beat into
    its record and served by GET /metrics as Prometheus gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    orchestrator = start_orchestrator()
    start_worker("g1", HEARTBEAT_INTERVAL_SEC="1")

    def gpu_gauges() -> dict[tuple[str, str], float]:
        text = orchestrator.http.get("/metrics").text
        return {
            (s.name, s.labels["gpu"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("flowmesh_worker_gpu_") and s.labels.get("worker") == "g1"
        }

    found = wait_until(
        lambda: (g := gpu_gauges()) and len({i for _, i in g}) == len(gpus) and g,
        timeout=30,
        what="GPU gauges for every GPU",
    )
    for gpu in gpus:
        i = gpu["index"]
        total = found[("flowmesh_worker_gpu_memory_total_bytes", i)]
        assert total > 1 << 30  # a real card's memory, in bytes
        assert 0 <= found[("flowmesh_worker_gpu_memory_used_bytes", i)] <= total
        assert 0 <= found[("flowmesh_worker_gpu_utilization_percent", i)] <= 100
        assert found[("flowmesh_worker_gpu_power_watts", i)] > 0
    print("GPU telemetry:", found)
