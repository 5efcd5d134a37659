"""The events stream's contract: every event type, and how an event is added.

Events are written by the Lua steps in `flowmesh/lua/` (task.*), by workers (worker.*)
and by the orchestrator (worker.lost); the orchestrator reads them through a consumer
group. They are hints: the stream is trimmed to about `EVENTS_MAXLEN` entries, and
state is always re-read from the task and worker hashes.
"""

from __future__ import annotations

from enum import StrEnum

import redis
import redis.asyncio

from flowmesh.keys import Keys

# The events stream is trimmed (MAXLEN ~) to about this many entries.
EVENTS_MAXLEN = 100_000


class EventType(StrEnum):
    # Written by the Lua steps (flowmesh/lua/*.lua).
    TASK_STARTED = "task.started"  # start.lua: an attempt began (RUNNING)
    TASK_FINISHED = "task.finished"  # settle.lua: DONE, or FAILED for good
    TASK_RETRY = "task.retry"  # settle.lua, requeue_dead.lua: back to PENDING
    TASK_STALE = "task.stale"  # settle.lua: a superseded attempt reported; slot freed
    TASK_CANCELLED = "task.cancelled"  # cancel.lua
    # Written by workers and the orchestrator.
    WORKER_REGISTERED = "worker.registered"  # a worker (re-)registered
    WORKER_READY = "worker.ready"  # a worker's executor became ready, or failed to
    WORKER_STOPPED = "worker.stopped"  # a worker deregistered
    WORKER_LOST = "worker.lost"  # the orchestrator's lease check gave a worker up
    WORKER_DISABLED = "worker.disabled"  # the orchestrator took a worker out of placement
    WORKER_ENABLED = "worker.enabled"  # ... and put it back


def add_event(
    pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline,
    keys: Keys,
    type: EventType,
    **fields: str,
) -> None:
    """Queue `XADD <events> MAXLEN ~ EVENTS_MAXLEN * type <type> <fields...>` on a redis
    pipeline, sync or async (it only queues the command; the caller executes it)."""
    pipe.xadd(
        keys.events,
        {"type": EventType(type).value, **fields},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
