"""GPU assignment on a worker: WORKER_GPUS parsing, allocation by count/type/memory,
sharing within one batching engine, and release."""

from __future__ import annotations

import pytest

from flowmesh.errors import ConfigError
from worker.devices import DeviceAllocator, cuda_visible_devices, select_gpus
from worker.hardware import Gpu

GIB = 1024**3
H100_0 = Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa-0000", 80 * GIB)
H100_1 = Gpu(1, "NVIDIA H100 80GB HBM3", "GPU-bbbb-1111", 80 * GIB)
A10 = Gpu(2, "NVIDIA A10", "GPU-cccc-2222", 24 * GIB)
ALL = [H100_0, H100_1, A10]


def test_second_task_waits_until_the_first_releases() -> None:
    alloc = DeviceAllocator([H100_0])
    assert alloc.allocate("t1:1", 1) == (H100_0,)
    assert alloc.allocate("t2:1", 1) is None
    assert alloc.release("t1:1") == (H100_0,)
    assert alloc.allocate("t2:1", 1) == (H100_0,)


def test_lowest_free_index_first() -> None:
    alloc = DeviceAllocator([A10, H100_1, H100_0])
    assert alloc.allocate("t1:1", 1) == (H100_0,)
    assert alloc.allocate("t2:1", 2) == (H100_1, A10)


def test_type_and_memory_filter() -> None:
    alloc = DeviceAllocator(ALL)
    assert alloc.allocate("a10:1", 1, type="a10") == (A10,)
    assert alloc.allocate("big:1", 1, type="A10", memory=40 * GIB) is None
    assert alloc.allocate("h100:1", 2, memory=40 * GIB) == (H100_0, H100_1)
    assert alloc.allocate("l4:1", 1, type="L4") is None


def test_too_many_changes_nothing() -> None:
    alloc = DeviceAllocator(ALL)
    alloc.allocate("t1:1", 1)
    assert alloc.allocate("t2:1", 3) is None
    assert alloc.held() == {"t1:1": (0,)}
    assert alloc.free_count() == 2


def test_zero_gpus_always_fits_and_records_nothing() -> None:
    alloc = DeviceAllocator([])
    assert alloc.allocate("cpu:1", 0) == ()
    assert alloc.held() == {}


def test_same_engine_shares_its_gpus() -> None:
    alloc = DeviceAllocator(ALL)
    assert alloc.allocate("t1:1", 1, share_key="vllm:llama") == (H100_0,)
    # Another GPU is free, but the engine already sits on GPU 0.
    assert alloc.allocate("t2:1", 1, share_key="vllm:llama") == (H100_0,)
    assert alloc.allocate("t3:1", 2, share_key="vllm:llama") == (H100_0, H100_1)
    assert alloc.held() == {"t1:1": (0,), "t2:1": (0,), "t3:1": (0, 1)}
    assert alloc.free_count() == 1


def test_whole_and_shared_gpus_never_mix() -> None:
    alloc = DeviceAllocator([H100_0, H100_1])
    alloc.allocate("engine:1", 1, share_key="vllm:llama")
    alloc.allocate("whole:1", 1)
    # A task needing a GPU to itself cannot get the engine's GPU ...
    assert alloc.allocate("whole:2", 1) is None
    # ... a sharing task cannot get a GPU held whole, nor one of another engine.
    assert alloc.allocate("engine:2", 2, share_key="vllm:llama") is None
    assert alloc.allocate("other:1", 1, share_key="vllm:mistral") is None
    alloc.release("whole:1")
    assert alloc.allocate("other:1", 1, share_key="vllm:mistral") == (H100_1,)


def test_shared_gpu_is_free_only_when_every_holder_released() -> None:
    alloc = DeviceAllocator([H100_0])
    alloc.allocate("t1:1", 1, share_key="k")
    alloc.allocate("t2:1", 1, share_key="k")
    alloc.release("t1:1")
    assert alloc.free_count() == 0
    assert alloc.allocate("whole:1", 1) is None
    alloc.release("t2:1")
    assert alloc.free_count() == 1
    assert alloc.allocate("whole:1", 1) == (H100_0,)


def test_release_unknown_holder_and_double_allocate() -> None:
    alloc = DeviceAllocator(ALL)
    assert alloc.release("nobody:1") == ()
    alloc.allocate("t1:1", 1)
    with pytest.raises(ValueError, match="t1:1"):
        alloc.allocate("t1:1", 1)
    assert alloc.held() == {"t1:1": (0,)}


def test_cuda_visible_devices_uses_uuids() -> None:
    assert cuda_visible_devices([H100_1, A10]) == "GPU-bbbb-1111,GPU-cccc-2222"
    assert cuda_visible_devices([]) == ""


@pytest.mark.parametrize("raw", ["", "   "])
def test_worker_gpus_blank_means_all(raw: str) -> None:
    assert select_gpus(raw, ALL) == ALL


def test_worker_gpus_by_index_and_uuid_keeps_machine_order() -> None:
    assert select_gpus(" 2, 0 ", ALL) == [H100_0, A10]
    assert select_gpus("gpu-BBBB-1111,1,2", ALL) == [H100_1, A10]


def test_worker_gpus_unknown_item_names_it_and_what_exists() -> None:
    with pytest.raises(ConfigError) as exc:
        select_gpus("0,3", ALL)
    message = str(exc.value)
    assert "WORKER_GPUS" in message and "'3'" in message
    assert "0 (NVIDIA H100 80GB HBM3, GPU-aaaa-0000)" in message
    with pytest.raises(ConfigError, match=r"WORKER_GPUS.*'GPU-x'.*no NVIDIA GPU visible"):
        select_gpus("GPU-x", [])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ALL),
        ({"WORKER_GPUS": "1", "CUDA_VISIBLE_DEVICES": "0"}, [H100_1]),  # WORKER_GPUS wins
        ({"CUDA_VISIBLE_DEVICES": "GPU-cccc-2222,0"}, [H100_0, A10]),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),  # started with no GPU visible: none offered
        ({"CUDA_VISIBLE_DEVICES": "MIG-xyz"}, ALL),  # not NVML's names: all, with a warning
    ],
)
def test_the_gpus_a_worker_offers(env: dict[str, str], expected: list[Gpu]) -> None:
    from worker.settings import WorkerSettings
    from worker.worker import usable_gpus

    settings = WorkerSettings.from_env({"REDIS_URL": "redis://x", **env})
    assert usable_gpus(settings, ALL) == expected
