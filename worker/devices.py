"""Which GPUs this worker may use (WORKER_GPUS) and which attempt holds which of them.

Pure bookkeeping: no NVML calls and no I/O; the GPU list comes from worker.hardware.
"""

from __future__ import annotations

from collections.abc import Iterable

from flowmesh.errors import ConfigError
from worker.hardware import Gpu


def select_gpus(raw: str, gpus: list[Gpu]) -> list[Gpu]:
    """The GPUs WORKER_GPUS names (NVML indices or UUIDs, comma-separated); blank means all."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        return list(gpus)
    wanted: set[int] = set()
    for item in items:
        match = next((g for g in gpus if _names(item, g)), None)
        if match is None:
            raise ConfigError(f"WORKER_GPUS: no GPU '{item}' on this machine; {_describe(gpus)}")
        wanted.add(match.index)
    # The machine's order, not the order written, so the same GPUs always list the same way.
    return [g for g in gpus if g.index in wanted]


def _names(item: str, gpu: Gpu) -> bool:
    if item.isdigit():
        return int(item) == gpu.index
    return item.lower() == gpu.uuid.lower()


def _describe(gpus: list[Gpu]) -> str:
    if not gpus:
        return "this machine has no NVIDIA GPU visible"
    return "GPUs: " + ", ".join(f"{g.index} ({g.name}, {g.uuid})" for g in gpus)


class DeviceAllocator:
    """Hands the worker's GPUs to attempts and takes them back when the attempt ends.

    A GPU belongs to one attempt at a time, except that attempts sharing a `share_key`
    (tasks of one batching engine) may hold the same GPUs together.
    """

    def __init__(self, gpus: list[Gpu]) -> None:
        self.gpus = sorted(gpus, key=lambda g: g.index)
        self._held: dict[str, tuple[Gpu, ...]] = {}
        self._share_keys: dict[str, str | None] = {}

    def allocate(
        self,
        holder: str,
        count: int,
        type: str | None = None,
        memory: int = 0,
        share_key: str | None = None,
    ) -> tuple[Gpu, ...] | None:
        """`count` GPUs for `holder` (an attempt id), or None when not enough fit right now."""
        if count < 0:
            raise ValueError(f"GPU count must not be negative, got {count}")
        if count == 0:
            return ()
        if holder in self._held:
            # A second allocation would leak the first one's GPUs on a single release.
            raise ValueError(f"{holder!r} already holds GPUs {self._indices(holder)}")
        shared: list[Gpu] = []
        free: list[Gpu] = []
        for gpu in self.gpus:
            if not _fits(gpu, type, memory):
                continue
            keys = {self._share_keys[h] for h, held in self._held.items() if gpu in held}
            if not keys:
                free.append(gpu)
            elif share_key is not None and keys == {share_key}:
                shared.append(gpu)
        # The engine's own GPUs first, so a batching engine stays where its model is loaded.
        chosen = (shared + free)[:count]
        if len(chosen) < count:
            return None
        self._held[holder] = tuple(chosen)
        self._share_keys[holder] = share_key
        return self._held[holder]

    def release(self, holder: str) -> tuple[Gpu, ...]:
        """Free what `holder` had; an unknown holder had nothing."""
        self._share_keys.pop(holder, None)
        return self._held.pop(holder, ())

    def held(self) -> dict[str, tuple[int, ...]]:
        """Holder -> GPU indices, for the heartbeat record."""
        return {holder: self._indices(holder) for holder in self._held}

    def free_count(self) -> int:
        """GPUs no holder has."""
        taken = {gpu for held in self._held.values() for gpu in held}
        return sum(1 for gpu in self.gpus if gpu not in taken)

    def _indices(self, holder: str) -> tuple[int, ...]:
        return tuple(gpu.index for gpu in self._held[holder])


def _fits(gpu: Gpu, type: str | None, memory: int) -> bool:
    # `type` is a substring of the NVML name ("H100" in "NVIDIA H100 80GB HBM3").
    if type is not None and type.lower() not in gpu.name.lower():
        return False
    return gpu.memory_total >= memory


def cuda_visible_devices(gpus: Iterable[Gpu]) -> str:
    """CUDA_VISIBLE_DEVICES for a process that may use exactly `gpus`.

    UUIDs rather than indices: they name the same GPU whatever CUDA_DEVICE_ORDER says.
    """
    return ",".join(gpu.uuid for gpu in gpus)
