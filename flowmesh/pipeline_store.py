"""Pipelines in Redis: one hash per pipeline, written only through the Lua steps here
and the stage guard of `submit.lua` (a stage's tasks and its `running` record are stored
together, once).

`pipeline:<id>` fields: pipeline_id, name, status (RUNNING | DONE | FAILED | CANCELLED),
seq, plan (the checked pipeline as JSON: stages, dependencies, specs with their templates),
created_at, updated_at, finished_at, and `stage:<name>` per stage: a JSON record
{state, task_ids, reason, released_at, finished_at, inputs, items}. Stage states:

    waiting ──release──▶ running ──its tasks end──▶ done | failed | cancelled
       └──────────────▶ failed | skipped | cancelled   (upstream outcome, deadline, cancel)
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from flowmesh.keys import Keys
from flowmesh.store import IdempotencyConflict, _script, page_after


class PipelineStatus(StrEnum):
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StageState(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (StageState.WAITING, StageState.RUNNING)


@dataclass(frozen=True)
class StageRecord:
    state: StageState = StageState.WAITING
    task_ids: tuple[str, ...] = ()
    reason: str = ""
    released_at: float | None = None
    finished_at: float | None = None
    # Each templated field of the stage's spec and what it resolved to (forEach: item 0's).
    inputs: dict[str, Any] = field(default_factory=dict)
    items: int | None = None  # forEach: how many tasks

    def to_json(self) -> str:
        out: dict[str, Any] = {"state": self.state.value, "task_ids": list(self.task_ids)}
        for name in ("reason", "released_at", "finished_at", "inputs", "items"):
            value = getattr(self, name)
            if value not in ("", None, {}):
                out[name] = value
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def from_json(raw: str) -> StageRecord:
        """The record stored as `raw` (memoised: a pipeline is read at every evaluation,
        and its records rarely change; records are immutable, so sharing one is safe)."""
        d = json.loads(raw)
        return StageRecord(
            state=StageState(d["state"]),
            task_ids=tuple(d.get("task_ids") or ()),
            reason=d.get("reason", ""),
            released_at=d.get("released_at"),
            finished_at=d.get("finished_at"),
            inputs=d.get("inputs") or {},
            items=d.get("items"),
        )


@functools.lru_cache(maxsize=64)
def _plan(raw: str) -> dict[str, Any]:
    """A stored plan, parsed once (a plan never changes once stored; callers never change
    the dict they get)."""
    value: dict[str, Any] = json.loads(raw)
    return value


def stage_field(name: str) -> str:
    return f"stage:{name}"


@dataclass
class PipelineRow:
    pipeline_id: str
    name: str
    status: PipelineStatus
    seq: int
    plan: dict[str, Any]
    created_at: float
    updated_at: float
    finished_at: float | None
    stages: dict[str, StageRecord]

    @classmethod
    def decode(cls, raw: dict[str, str]) -> PipelineRow:
        return cls(
            pipeline_id=raw["pipeline_id"],
            name=raw.get("name", ""),
            status=PipelineStatus(raw["status"]),
            seq=int(raw.get("seq", 0)),
            plan=_plan(raw["plan"]),
            created_at=float(raw["created_at"]),
            updated_at=float(raw.get("updated_at") or raw["created_at"]),
            finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
            stages={
                k.removeprefix("stage:"): StageRecord.from_json(v)
                for k, v in raw.items()
                if k.startswith("stage:")
            },
        )


class PipelineStore:
    def __init__(self, conn: aioredis.Redis, keys: Keys):
        self.conn = conn
        self.keys = keys
        self._create = conn.register_script(_script("pipeline_create"))
        self._update = conn.register_script(_script("pipeline_update"))

    async def create(
        self,
        pipeline_id: str,
        name: str,
        plan: dict[str, Any],
        stages: list[str],
        idempotency_key: str | None = None,
        ttl: int = 86_400,
    ) -> tuple[int, str | None]:
        """Store a RUNNING pipeline with every stage waiting: (its seq, None); with an
        idempotency key seen before for the same plan, (0, the first pipeline's id)."""
        k = self.keys
        plan_json = json.dumps(plan, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
        digest = hashlib.sha256(plan_json.encode()).hexdigest() if idempotency_key else ""
        reply = await self._create(
            keys=[
                k.pipeline(pipeline_id),
                k.pipelines_all,
                k.pipelines_active,
                k.pipeline_seq,
                k.idempotency(idempotency_key or ""),
            ],
            args=[
                f"{time.time():.6f}",
                ttl,
                "1" if idempotency_key else "",
                digest,
                pipeline_id,
                name,
                plan_json,
                json.dumps([stage_field(s) for s in stages]),
                StageRecord().to_json(),
            ],
        )
        if int(reply[0]) < 0:
            raise IdempotencyConflict(idempotency_key or "", [str(reply[1])])
        if int(reply[0]) == 0:
            return 0, str(reply[1])
        return int(reply[1]), None

    async def get(self, pipeline_id: str) -> PipelineRow | None:
        raw = await self.conn.hgetall(self.keys.pipeline(pipeline_id))
        return PipelineRow.decode(raw) if raw else None

    async def update(
        self,
        pipeline_id: str,
        stages: list[tuple[str, StageState, StageRecord]] = (),  # type: ignore[assignment]
        status: PipelineStatus | None = None,
        retire: bool = False,
    ) -> tuple[int, PipelineStatus | None]:
        """Compare-and-set stage records ((stage, the state it must still be in, new
        record)) and the pipeline's status (from RUNNING only); `retire` takes it off
        the active set. Returns (records changed, status after)."""
        k = self.keys
        reply = await self._update(
            keys=[k.pipeline(pipeline_id), k.pipelines_active],
            args=[
                f"{time.time():.6f}",
                json.dumps([[stage_field(n), s.value, r.to_json()] for n, s, r in stages]),
                status.value if status else "",
                "1" if retire else "",
                pipeline_id,
            ],
        )
        return int(reply[0]), PipelineStatus(reply[1]) if reply[1] else None

    async def active_ids(self) -> list[str]:
        return sorted(await self.conn.smembers(self.keys.pipelines_active))

    async def list(
        self, *, status: PipelineStatus | None, limit: int, after: int | None, descending: bool
    ) -> tuple[list[PipelineRow], int | None]:
        """Pipelines in submission order (newest first with `descending`), filtered by
        status; `after` is the previous page's cursor (the seq of its last pipeline)."""
        out: list[PipelineRow] = []
        cursor = after
        while len(out) < limit:
            index, num = self.keys.pipelines_all, max(limit * 2, 50)
            ids = await page_after(self.conn, index, cursor, num, descending)
            if not ids:
                return out, None
            async with self.conn.pipeline(transaction=False) as pipe:
                for pid, _ in ids:
                    pipe.hgetall(self.keys.pipeline(pid))
                raws = await pipe.execute()
            for (_, score), raw in zip(ids, raws, strict=True):
                cursor = int(score)
                if not raw:
                    continue
                row = PipelineRow.decode(raw)
                if status is None or row.status == status:
                    out.append(row)
                    if len(out) == limit:
                        break
        return out, cursor
