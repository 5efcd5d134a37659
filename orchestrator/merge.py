"""Task merge keys, computed once at submit and stored with the task.

Two keys, both sha256 hex of canonical JSON:

- `merge_key`: tasks that may share one delivery to one worker. Everything of the spec
  but its request data (`spec.data`) and the fields that are the requester's own
  (metadata, priority, timeout, attempts, backoff, the merge switch) must be equal: the
  executor, model, adapter, engine options, sampling options and resources.
- `identity`: tasks that are the same request: the merge key and the data, when the
  executor says such a spec gives the same result every time (`Executor.deterministic`:
  greedy decoding or a fixed seed). Identical tasks run once; every requester gets the
  result.

A task with merge off (`spec.merge: false`, or an executor that does not merge and a
spec that does not ask) gets neither key and is never merged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from executors.base import Executor
from flowmesh.spec import TaskSpec, executor_name

# Fields of a task's spec that are its requester's own: tasks differing only in them merge.
_OWN_FIELDS = frozenset(
    {"data", "priority", "timeoutSec", "maxAttempts", "retryBackoffSec", "merge"}
)


@dataclass(frozen=True)
class MergeKeys:
    merge_key: str = ""
    identity: str = ""


NO_MERGE = MergeKeys()


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def merge_keys(spec: TaskSpec, cls: type[Executor] | None) -> MergeKeys:
    """The task's keys; NO_MERGE when merge is off for it. `cls` is its executor where the
    orchestrator runs (None for a plugin only workers have: its tasks merge only when the
    spec asks, and are never run once for several)."""
    body = spec.spec
    enabled = body.merge if body.merge is not None else bool(cls is not None and cls.merges)
    if not enabled:
        return NO_MERGE
    dumped = body.model_dump(mode="json")
    shared = {k: v for k, v in dumped.items() if k not in _OWN_FIELDS}
    merge_key = _digest({"executor": executor_name(body), "spec": shared})
    identity = ""
    if cls is not None:
        try:
            same = cls.deterministic(body, cls.parse_options(body))
        except Exception:  # a plugin's check failing: merge, but run each task
            same = False
        if same:
            identity = _digest({"merge_key": merge_key, "data": dumped.get("data")})
    return MergeKeys(merge_key, identity)
