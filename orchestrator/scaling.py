"""Elastic scaling inside a fleet (ENABLE_ELASTIC_SCALING): idle workers beyond a minimum
are disabled, and disabled ones are enabled again when a backlog needs them.

A disabled worker stays registered: it beats, keeps its executors and models warm, takes
no task (the scheduler skips it, `dispatch.lua` refuses it) and accrues no cost. That makes
scaling up a matter of one Redis write, not a start: the right worker is back in the next
placement round. Starting and stopping processes or pods is the job of the local scaler
(`flowmesh scale`) or of an autoscaler reading `flowmesh_backlog_tasks` (KEDA).

The decision is pure (`ElasticScaler.decide`), from the fleet snapshot and the
requirements the last placement round could not place:
- enable, at once: for each blocked kind of task, the best disabled worker that could run
  it: one with its model warm first, then the cheapest;
- disable: an enabled worker idle for ELASTIC_IDLE_SEC that could run none of the blocked
  tasks, while more than ELASTIC_MIN_ACTIVE_WORKERS stay enabled; never within
  ELASTIC_COOLDOWN_SEC of the last enable (no flapping). Cold, expensive workers go first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from flowmesh import workers
from flowmesh.config import Env, env_bool, env_float, env_int
from flowmesh.keys import Keys
from flowmesh.spec import Requirements
from orchestrator.scheduler import TAKING_WORK, WorkerView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingSettings:
    enabled: bool = True
    min_active: int = 1
    idle_sec: float = 300.0
    cooldown_sec: float = 60.0

    @classmethod
    def from_env(cls, env: Env) -> ScalingSettings:
        return cls(
            enabled=env_bool(env, "ENABLE_ELASTIC_SCALING", True),
            min_active=env_int(env, "ELASTIC_MIN_ACTIVE_WORKERS", 1, minimum=0),
            idle_sec=env_float(env, "ELASTIC_IDLE_SEC", 300.0, minimum=0.0),
            cooldown_sec=env_float(env, "ELASTIC_COOLDOWN_SEC", 60.0, minimum=0.0),
        )


@dataclass(frozen=True)
class Change:
    worker_id: str
    enable: bool
    reason: str


class ElasticScaler:
    def __init__(self, settings: ScalingSettings):
        self.settings = settings
        self.idle_since: dict[str, float] = {}
        self.last_enable = float("-inf")

    def decide(
        self, views: list[WorkerView], blocked: list[Requirements], now: float
    ) -> list[Change]:
        s = self.settings
        usable = [w for w in views if w.alive and w.status in TAKING_WORK]
        for w in usable:
            if w.running == 0:
                self.idle_since.setdefault(w.worker_id, now)
            else:
                self.idle_since.pop(w.worker_id, None)
        present = {w.worker_id for w in usable}
        for worker_id in [i for i in self.idle_since if i not in present]:
            del self.idle_since[worker_id]

        changes: list[Change] = []
        chosen: set[str] = set()
        for req in blocked:
            options = [
                w
                for w in usable
                if w.disabled and w.worker_id not in chosen and w.why_never(req) is None
            ]
            if not options:
                continue
            best = min(
                options,
                key=lambda w: (0 if w.warm(req.model) else 1, w.cost_per_hour, w.worker_id),
            )
            chosen.add(best.worker_id)
            warm = f", model {req.model} warm there" if req.model and best.warm(req.model) else ""
            changes.append(Change(best.worker_id, True, f"backlog of {req.executor} tasks{warm}"))
        if changes:
            self.last_enable = now
            return changes
        if now - self.last_enable < s.cooldown_sec:
            return []
        active = [w for w in usable if not w.disabled]
        spare = len(active) - s.min_active
        idle = [
            w
            for w in active
            if now - self.idle_since.get(w.worker_id, now) >= s.idle_sec
            and all(w.why_never(req) is not None for req in blocked)
        ]
        # Keep warm, cheap workers enabled: disable the cold and expensive ones first.
        idle.sort(key=lambda w: (len(w.loaded_models), -w.cost_per_hour, w.worker_id))
        for w in idle[: max(spare, 0)]:
            idle_for = now - self.idle_since[w.worker_id]
            changes.append(Change(w.worker_id, False, f"idle for {idle_for:.0f} s"))
        return changes


async def apply(conn: aioredis.Redis, keys: Keys, changes: list[Change]) -> None:
    async with conn.pipeline(transaction=True) as pipe:
        for c in changes:
            if c.enable:
                workers.set_enabled(pipe, keys, c.worker_id, f"elastic scaling: {c.reason}")
            else:
                workers.set_disabled(pipe, keys, c.worker_id, f"elastic scaling: {c.reason}")
        await pipe.execute()
    for c in changes:
        log.info(
            "elastic scaling: %s worker %s (%s)",
            "enabled" if c.enable else "disabled",
            c.worker_id,
            c.reason,
        )
