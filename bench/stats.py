"""The one percentile every FlowMesh-side benchmark reports (nearest rank, as the peers do)."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]
