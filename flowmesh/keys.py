"""Every Redis key FlowMesh reads or writes, in one place.

The README's "Redis key schema" section documents exactly these names. A prefix
(`REDIS_KEY_PREFIX`, empty by default) lets two fleets share one Redis database.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowmesh.status import TaskStatus

# Consumer-group names. One group per inbox (the worker that owns it) and one on
# the events stream (every orchestrator replica reads through it).
INBOX_GROUP = "worker"
EVENTS_GROUP = "orchestrator"


def heartbeat_ttl(interval_sec: float) -> int:
    """The seed README's rule: the heartbeat key outlives four missed beats, and two minutes."""
    return max(int(interval_sec * 4), 120)


@dataclass(frozen=True)
class Keys:
    prefix: str = ""

    # -- workers ---------------------------------------------------------------
    @property
    def worker_ids(self) -> str:
        return f"{self.prefix}workers:ids"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}:heartbeat"

    def worker_tasks(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}:tasks"

    def control(self, worker_id: str) -> str:
        """Pub/sub channel for prompt notices (cancel); never the only path for a fact."""
        return f"{self.prefix}worker:{worker_id}:control"

    def inbox(self, topic: str, worker_id: str) -> str:
        return f"{self.prefix}{topic}:inbox:{worker_id}"

    # -- tasks -----------------------------------------------------------------
    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def task_spec(self, task_id: str) -> str:
        """String: the task's spec as JSON, without the fields at their defaults. Apart
        from the hash so that the hash keeps Redis's compact encoding (listpack: every
        value under 64 bytes), which halves a pending task's memory."""
        return f"{self.prefix}task:{task_id}:spec"

    @property
    def task_seq(self) -> str:
        return f"{self.prefix}tasks:seq"

    @property
    def tasks_all(self) -> str:
        return f"{self.prefix}tasks:all"

    def tasks_by_status(self, status: TaskStatus | str) -> str:
        return f"{self.prefix}tasks:status:{TaskStatus(status).value}"

    @property
    def pending_queue(self) -> str:
        return f"{self.prefix}tasks:pending"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}tasks:dead"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idempotency:{key}"

    # -- pipelines -------------------------------------------------------------
    def pipeline(self, pipeline_id: str) -> str:
        """Hash: the pipeline's document, status, and one `stage:<name>` field per stage."""
        return f"{self.prefix}pipeline:{pipeline_id}"

    @property
    def pipeline_seq(self) -> str:
        return f"{self.prefix}pipelines:seq"

    @property
    def pipelines_all(self) -> str:
        """Sorted set of every pipeline id, scored by submission sequence."""
        return f"{self.prefix}pipelines:all"

    @property
    def pipelines_active(self) -> str:
        """Set of pipelines not finished: the orchestrator re-evaluates each on start and
        every FLOWMESH_PIPELINE_SCAN_SEC."""
        return f"{self.prefix}pipelines:active"

    # -- events ----------------------------------------------------------------
    @property
    def events(self) -> str:
        return f"{self.prefix}events"
