"""What this machine has (psutil, NVML) and how busy it is, for registration and heartbeats.

A machine without NVIDIA GPUs, or without the driver, reports no GPUs and no error.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    memory_total: int


@dataclass(frozen=True)
class Hardware:
    hostname: str
    platform: str
    cpu_count: float
    memory_total: int
    gpus: list[Gpu] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Nvml:
    """NVML when a driver is present; otherwise an empty GPU list, logged once."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml
        except ImportError as exc:
            log.info("no NVIDIA GPUs visible (nvidia-ml-py not importable: %s)", exc)
            return
        try:
            pynvml.nvmlInit()
            self._nvml = pynvml
        except pynvml.NVMLError as exc:  # no driver, or no libnvidia-ml on this machine
            log.info("no NVIDIA GPUs visible (NVML: %s)", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def gpus(self) -> list[Gpu]:
        if self._nvml is None:
            return []
        n = self._nvml
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            name = n.nvmlDeviceGetName(h)
            uuid = n.nvmlDeviceGetUUID(h)
            out.append(
                Gpu(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else name,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    memory_total=int(n.nvmlDeviceGetMemoryInfo(h).total),
                )
            )
        return out

    def sample(self) -> list[dict[str, Any]]:
        if self._nvml is None:
            return []
        n = self._nvml
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            entry: dict[str, Any] = {
                "index": i,
                "memory_used": int(mem.used),
                "memory_total": int(mem.total),
            }
            try:
                entry["power_watts"] = n.nvmlDeviceGetPowerUsage(h) / 1000.0
                entry["utilization"] = n.nvmlDeviceGetUtilizationRates(h).gpu
            except n.NVMLError as exc:  # not every board reports power or utilisation
                entry["telemetry_error"] = str(exc)
            out.append(entry)
        return out


def detect(nvml: Nvml, *, cpus: float | None = None, memory: int | None = None) -> Hardware:
    """This machine's capacity; `cpus`/`memory` cap what the worker offers (WORKER_CPUS/MEMORY)."""
    try:
        usable = float(len(os.sched_getaffinity(0)))
    except AttributeError:
        usable = float(psutil.cpu_count() or 1)
    total_mem = psutil.virtual_memory().total
    return Hardware(
        hostname=socket.gethostname(),
        platform=f"{platform.system()}-{platform.machine()}",
        cpu_count=min(cpus, usable) if cpus else usable,
        memory_total=min(memory, total_mem) if memory else total_mem,
        gpus=nvml.gpus(),
    )


def sample_load(nvml: Nvml) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_avg": list(os.getloadavg()),
        "memory_used": int(vm.total - vm.available),
        "memory_percent": vm.percent,
        "gpus": nvml.sample(),
    }
