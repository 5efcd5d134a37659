"""Find executors through the `flowmesh.executors` entry-point group."""

from __future__ import annotations

import functools
import logging
from importlib.metadata import EntryPoint, entry_points

from executors.base import Executor, MissingExtra

GROUP = "flowmesh.executors"
log = logging.getLogger(__name__)


@functools.cache
def entry_points_by_name() -> dict[str, EntryPoint]:
    """Installed executors by name. Read once per process (scanning every installed
    distribution takes milliseconds); a newly installed plugin is seen after a restart."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str) -> type[Executor]:
    eps = entry_points_by_name()
    if name not in eps:
        raise KeyError(f"no executor named {name!r}; installed: {', '.join(sorted(eps))}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise TypeError(f"entry point {name!r} = {eps[name].value} is not an Executor subclass")
    if cls.run is Executor.run and not cls.is_async():
        raise TypeError(f"executor {name!r} ({eps[name].value}) implements neither run nor arun")
    if cls.isolation not in ("shared", "task"):
        raise TypeError(
            f"executor {name!r}: isolation must be 'shared' or 'task', got {cls.isolation!r}"
        )
    return cls


def available(only: set[str] | None = None) -> dict[str, type[Executor]]:
    """Executors that can run in this environment; the absent ones are logged with why."""
    found: dict[str, type[Executor]] = {}
    for name in sorted(entry_points_by_name()):
        if only is not None and name not in only:
            continue
        try:
            cls = load(name)
        except (ImportError, TypeError, AttributeError) as exc:
            log.warning("executor %s unavailable: cannot load its entry point: %s", name, exc)
            continue
        missing: MissingExtra | None = cls.missing()
        if missing is not None:
            log.info("executor %s unavailable: %s", name, missing)
            continue
        found[name] = cls
    if only:
        for name in sorted(only - set(found)):
            log.warning("executor %s was asked for (WORKER_EXECUTORS) but is not available", name)
    return found
