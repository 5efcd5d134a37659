"""The worker record: the `worker:<id>` hash, its typed view, and every write to it.

`WorkerRecord` is what a worker registers; `WorkerPresence` the fields each heartbeat
rewrites. The functions below queue their commands into a pipeline the caller runs
(sync in the worker's presence thread, async in the orchestrator), so the hash has one
owner here just as `task:<id>` has `TaskStore`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flowmesh.events import EventType, add_event
from flowmesh.keys import Keys
from flowmesh.status import ExecutorState, WorkerStatus

log = logging.getLogger(__name__)

# How long a stopped or lost worker's record stays readable (`flowmesh workers`).
RECORD_TTL_SEC = 86_400


@dataclass(frozen=True)
class ExecutorStatus:
    """One executor on one worker: starting, ready, or failed (with why)."""

    state: ExecutorState
    since: float
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.value, "since": round(self.since, 3)}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ExecutorStatus:
        return cls(ExecutorState(raw["state"]), float(raw.get("since", 0)), raw.get("reason"))


@dataclass(frozen=True)
class WorkerPresence:
    """What every heartbeat rewrites."""

    status: WorkerStatus
    running: int
    current_tasks: list[str]
    loaded_models: list[str]
    executor_states: dict[str, ExecutorStatus]
    devices: dict[str, list[int]]  # attempt -> GPU indices it holds
    load: dict[str, Any]
    cost_accrued: float
    loading_models: list[str] = field(default_factory=list)
    # Per executor, what its engines report (a batching engine: model, state, requests
    # running and its batch capacity).
    engines: dict[str, Any] = field(default_factory=dict)
    # Per executor, models loaded since the worker started (ExecutorHost.model_loads);
    # None: not reported (the field is then left out of the hash).
    model_loads: dict[str, int] | None = None

    def to_hash(self, now: float) -> dict[str, str | int]:
        loads = {} if self.model_loads is None else {"model_loads": json.dumps(self.model_loads)}
        return {
            **loads,
            "status": self.status.value,
            "last_seen": f"{now:.6f}",
            "running": self.running,
            "current_tasks": json.dumps(self.current_tasks),
            "loaded_models": json.dumps(self.loaded_models),
            "loading_models": json.dumps(self.loading_models),
            "engines": json.dumps(self.engines),
            "executor_states": json.dumps(
                {name: s.to_json() for name, s in sorted(self.executor_states.items())}
            ),
            "devices": json.dumps(self.devices),
            "load": json.dumps(self.load),
            "cost_accrued": f"{self.cost_accrued:.6f}",
        }


# What a worker's inbox reader understands, in its record: 1 one attempt per entry; 2 also
# merged deliveries (`merge_children`, task merge). The scheduler merges only onto 2.
PROTOCOL = 2
MERGE_PROTOCOL = 2


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as registered: identity, capacity, and the last presence it wrote."""

    worker_id: str
    inbox: str
    hostname: str = ""
    pid: int = 0
    version: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    executors: list[str] = field(default_factory=list)
    slots: int = 0
    # Tasks that reserve nothing may be queued in the inbox this far beyond the slots.
    prefetch: int = 0
    cost_per_hour: float = 1.0
    heartbeat_interval: float = 30.0
    started_at: float = 0.0
    protocol: int = 1  # a record without one is from before task merge
    # Artifact settings (upload target host, bandwidth throttle, archive format); no secrets.
    artifacts: dict[str, Any] = field(default_factory=dict)
    # Presence fields, as last written:
    status: str = ""
    last_seen: float = 0.0
    running: int = 0
    current_tasks: list[str] = field(default_factory=list)
    loaded_models: list[str] = field(default_factory=list)
    executor_states: dict[str, ExecutorStatus] = field(default_factory=dict)
    devices: dict[str, list[int]] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    cost_accrued: float = 0.0
    loading_models: list[str] = field(default_factory=list)
    engines: dict[str, Any] = field(default_factory=dict)
    model_loads: dict[str, int] = field(default_factory=dict)
    # Written by the orchestrator (API or elastic scaling), never by the worker's beats:
    # a disabled worker stays registered and beating, takes no task and accrues no cost.
    disabled: bool = False
    disabled_reason: str = ""
    disabled_at: float = 0.0
    drain_requested: bool = False

    @property
    def ready_executors(self) -> frozenset[str]:
        """Executors tasks can be placed for. A record without states (a worker from before
        executor states) counts every executor it offers as ready."""
        if not self.executor_states:
            return frozenset(self.executors)
        return frozenset(
            name for name, s in self.executor_states.items() if s.state is ExecutorState.READY
        )

    def identity_hash(self) -> dict[str, str | int | float]:
        return {
            "worker_id": self.worker_id,
            "inbox": self.inbox,
            "hostname": self.hostname,
            "pid": self.pid,
            "version": self.version,
            "hardware": json.dumps(self.hardware),
            "tags": json.dumps(self.tags),
            "executors": json.dumps(self.executors),
            "slots": self.slots,
            "prefetch": self.prefetch,
            "cost_per_hour": self.cost_per_hour,
            "heartbeat_interval": self.heartbeat_interval,
            "started_at": f"{self.started_at:.6f}",
            "protocol": self.protocol,
            "artifacts": json.dumps(self.artifacts),
        }

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> WorkerRecord:
        def j(name: str, default: Any) -> Any:
            value = raw.get(name)
            return json.loads(value) if value else default

        return cls(
            worker_id=raw["worker_id"],
            inbox=raw.get("inbox", ""),
            hostname=raw.get("hostname", ""),
            pid=int(raw.get("pid") or 0),
            version=raw.get("version", ""),
            hardware=j("hardware", {}),
            tags=j("tags", []),
            executors=j("executors", []),
            slots=int(raw.get("slots") or 0),
            prefetch=int(raw.get("prefetch") or 0),
            cost_per_hour=float(raw.get("cost_per_hour") or 1.0),
            heartbeat_interval=float(raw.get("heartbeat_interval") or 30.0),
            started_at=float(raw.get("started_at") or 0),
            protocol=int(raw.get("protocol") or 1),
            artifacts=j("artifacts", {}),
            status=raw.get("status", ""),
            last_seen=float(raw.get("last_seen") or 0),
            running=int(raw.get("running") or 0),
            current_tasks=j("current_tasks", []),
            loaded_models=j("loaded_models", []),
            loading_models=j("loading_models", []),
            engines=j("engines", {}),
            model_loads=j("model_loads", {}),
            executor_states=_states(j("executor_states", {})),
            disabled=raw.get("disabled") == "1",
            disabled_reason=raw.get("disabled_reason", ""),
            disabled_at=float(raw.get("disabled_at") or 0),
            drain_requested=raw.get("drain_requested") == "1",
            devices=j("devices", {}),
            load=j("load", {}),
            cost_accrued=float(raw.get("cost_accrued") or 0),
        )

    def to_json(self) -> dict[str, Any]:
        """The record as the API serves it."""
        return {
            "worker_id": self.worker_id,
            "status": self.status,
            "hostname": self.hostname,
            "pid": self.pid,
            "hardware": self.hardware,
            "tags": self.tags,
            "executors": self.executors,
            "executor_states": {n: s.to_json() for n, s in sorted(self.executor_states.items())},
            "slots": self.slots,
            "prefetch": self.prefetch,
            "running": self.running,
            "current_tasks": self.current_tasks,
            "loaded_models": self.loaded_models,
            "loading_models": self.loading_models,
            "model_loads": self.model_loads,
            "engines": self.engines,
            "devices": self.devices,
            "load": self.load,
            "cost_per_hour": self.cost_per_hour,
            "cost_accrued": self.cost_accrued,
            "heartbeat_interval": self.heartbeat_interval,
            "started_at": self.started_at,
            "last_heartbeat": self.last_seen,
            "version": self.version,
            "disabled": self.disabled,
            "disabled_reason": self.disabled_reason or None,
            "disabled_at": self.disabled_at or None,
            "drain_requested": self.drain_requested,
        }


def _states(raw: dict[str, Any]) -> dict[str, ExecutorStatus]:
    """Executor states as recorded; one a newer worker writes that this version does not
    know is left out (its executor is then not ready here) rather than failing the read."""
    out = {}
    for name, state in raw.items():
        try:
            out[name] = ExecutorStatus.from_json(state)
        except (KeyError, ValueError, TypeError):
            continue
    return out


# -- writes (each queues commands into the caller's pipeline) --------------------------


def register(
    pipe: Any, keys: Keys, record: WorkerRecord, presence: WorkerPresence, ttl: int
) -> None:
    """A fresh record (whatever an earlier run left is replaced), the id in the set of
    workers, the heartbeat key, and `worker.registered`. Run in a MULTI pipeline."""
    now = time.time()
    key = keys.worker(record.worker_id)
    pipe.delete(key)
    pipe.hset(key, mapping={**record.identity_hash(), **presence.to_hash(now)})
    pipe.sadd(keys.worker_ids, record.worker_id)
    pipe.set(keys.heartbeat(record.worker_id), f"{now:.6f}", ex=ttl)
    add_event(pipe, keys, EventType.WORKER_REGISTERED, worker_id=record.worker_id)


def beat(
    pipe: Any,
    keys: Keys,
    worker_id: str,
    presence: WorkerPresence | None,
    ttl: int,
    *,
    executors_changed: bool = False,
) -> None:
    """One heartbeat. The first reply says whether the worker is still registered (the
    orchestrator forgets a worker it declared lost). `presence` None: the worker's state
    could not be read, and the beat still keeps the lease. `executors_changed`: an executor
    became ready or failed since the last beat; the orchestrator re-reads the fleet."""
    now = time.time()
    pipe.sismember(keys.worker_ids, worker_id)
    pipe.set(keys.heartbeat(worker_id), f"{now:.6f}", ex=ttl)
    if presence is None:
        pipe.hset(keys.worker(worker_id), "last_seen", f"{now:.6f}")
        return
    pipe.hset(keys.worker(worker_id), mapping=presence.to_hash(now))
    if executors_changed:
        add_event(pipe, keys, EventType.WORKER_READY, worker_id=worker_id)


def set_disabled(pipe: Any, keys: Keys, worker_id: str, reason: str) -> None:
    """Take the worker out of placement (dispatch.lua refuses it) without stopping it: its
    executors stay warm, its beats go on, it accrues no cost. `worker.disabled`."""
    pipe.hset(
        keys.worker(worker_id),
        mapping={"disabled": "1", "disabled_reason": reason, "disabled_at": f"{time.time():.6f}"},
    )
    add_event(pipe, keys, EventType.WORKER_DISABLED, worker_id=worker_id, reason=reason)


def set_enabled(pipe: Any, keys: Keys, worker_id: str, reason: str) -> None:
    pipe.hset(keys.worker(worker_id), mapping={"disabled": "", "disabled_reason": ""})
    pipe.hdel(keys.worker(worker_id), "disabled_at")
    add_event(pipe, keys, EventType.WORKER_ENABLED, worker_id=worker_id, reason=reason)


def request_drain(pipe: Any, keys: Keys, worker_id: str) -> None:
    """Ask the worker to stop as on SIGTERM: no new tasks, finish or hand back what runs,
    deregister, exit. Durable (the worker reads the flag every beat interval) and prompt
    (a `drain` notice on its control channel)."""
    pipe.hset(keys.worker(worker_id), "drain_requested", "1")
    pipe.publish(keys.control(worker_id), "drain")


def deregister(pipe: Any, keys: Keys, worker_id: str) -> None:
    """The worker stopped on purpose: keep its record a day for inspection, forget it."""
    pipe.hset(
        keys.worker(worker_id),
        mapping={
            "status": WorkerStatus.STOPPED.value,
            "last_seen": f"{time.time():.6f}",
            "running": 0,
            "current_tasks": "[]",
            "devices": "{}",
        },
    )
    pipe.expire(keys.worker(worker_id), RECORD_TTL_SEC)
    pipe.srem(keys.worker_ids, worker_id)
    pipe.delete(keys.heartbeat(worker_id))
    add_event(pipe, keys, EventType.WORKER_STOPPED, worker_id=worker_id)


def mark_lost(pipe: Any, keys: Keys, worker_id: str, inbox: str) -> None:
    """The orchestrator declared the worker lost (its tasks were settled before this)."""
    pipe.hset(keys.worker(worker_id), mapping={"status": WorkerStatus.LOST.value})
    pipe.expire(keys.worker(worker_id), RECORD_TTL_SEC)
    pipe.srem(keys.worker_ids, worker_id)
    pipe.delete(keys.heartbeat(worker_id), keys.worker_tasks(worker_id))
    pipe.delete(inbox)
    add_event(pipe, keys, EventType.WORKER_LOST, worker_id=worker_id)


# -- reads ---------------------------------------------------------------------------


async def read_all(conn: Any, keys: Keys) -> list[tuple[WorkerRecord, int, set[str]]]:
    """Every registered worker: its record, its heartbeat key's PTTL (ms; negative when
    gone) and the tasks placed on it. Workers whose hash is gone are skipped."""
    ids = sorted(await conn.smembers(keys.worker_ids))
    async with conn.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(keys.worker(wid))
            pipe.pttl(keys.heartbeat(wid))
            pipe.smembers(keys.worker_tasks(wid))
        replies = await pipe.execute()
    out = []
    for i in range(len(ids)):
        raw, pttl, tasks = replies[3 * i : 3 * i + 3]
        if raw and "inbox" in raw and "worker_id" in raw:
            try:
                record = WorkerRecord.from_hash(raw)
            except (ValueError, TypeError, KeyError) as exc:
                # One unreadable record must not stop placement for the whole fleet.
                log.warning("worker %s: unreadable record skipped: %s", ids[i], exc)
                continue
            out.append((record, pttl, set(tasks)))
    return out
