"""Fault injection for the crash tests: where a process pauses so a test can kill it there."""

from __future__ import annotations

from flowmesh.errors import ConfigError

# Where a test may make FlowMesh pause (FLOWMESH_FAILPOINTS=name:seconds[,...]):
# `before_settle`: a worker, after writing a result and before recording it;
# `train_step`: a trainer, after every optimizer step (a training long enough to kill);
# `pipeline_release`: the orchestrator, before it releases a pipeline stage.
FAILPOINTS = ("before_settle", "train_step", "pipeline_release")


def parse_failpoints(raw: str) -> dict[str, float]:
    """`name:seconds[,name:seconds]`: where a worker pauses, so a test can kill it there."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, _, seconds = part.partition(":")
        if name not in FAILPOINTS:
            raise ConfigError(
                f"FLOWMESH_FAILPOINTS: unknown failpoint {name!r}; known: {', '.join(FAILPOINTS)}"
            )
        try:
            out[name] = float(seconds)
        except ValueError:
            raise ConfigError(f"FLOWMESH_FAILPOINTS: {part!r} needs name:seconds") from None
    return out


def from_environment(name: str) -> float:
    """The pause FLOWMESH_FAILPOINTS sets for `name` in this process's environment, or 0."""
    import os

    return parse_failpoints(os.environ.get("FLOWMESH_FAILPOINTS", "")).get(name, 0.0)
