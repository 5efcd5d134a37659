"""Task state in Redis: typed methods over atomic transitions.

Public methods here are the only writers of `task:<id>` hashes and the status
indexes. Each transition is one MULTI/EXEC or one Lua script from `flowmesh/lua/`,
so a crash between two commands can never leave a task half-moved.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from flowmesh.events import EVENTS_MAXLEN  # lives in flowmesh.events; importable from here
from flowmesh.keys import INBOX_GROUP, Keys
from flowmesh.spec import Requirements, TaskSpec
from flowmesh.status import ACTIVE, TaskStatus


def _script(name: str) -> str:
    return resources.files("flowmesh").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class NewTask:
    """A task `submit` stored. `score` orders the pending queue (ascending: higher
    priority first, then older first); submit.lua computes it, nothing else does."""

    task_id: str
    seq: int
    spec: TaskSpec
    requirements: Requirements
    score: float
    merge_key: str = ""
    identity: str = ""
    prefer: frozenset[str] = frozenset()
    prefer_why: str = ""

    def queue_entry(self) -> QueueEntry:
        return QueueEntry(
            self.task_id,
            self.requirements,
            self.score,
            merge_key=self.merge_key,
            identity=self.identity,
            prefer=self.prefer,
            prefer_why=self.prefer_why,
        )


@dataclass(frozen=True)
class StageRelease:
    """A pipeline stage's tasks, stored by `TaskStore.submit` only while the stage is
    `waiting` in a RUNNING pipeline, together with the stage's new record (which lists
    `task_ids`). `for_each`: the tasks are items, numbered in the order given. `prefer`:
    workers holding the stage's input (see QueueEntry.prefer)."""

    pipeline_id: str
    stage: str
    task_ids: tuple[str, ...]
    record_json: str
    for_each: bool = False
    prefer: frozenset[str] = frozenset()
    prefer_why: str = ""


class StageNotReleased(Exception):
    """The stage was released before, or its pipeline is no longer RUNNING."""


@dataclass(frozen=True)
class Delivery:
    """One attempt of a task handed to a worker: an inbox entry, or one child of a merged
    entry (they share its `stream_id`; `group` lists the tasks it carries). `spec` is the
    stored spec as JSON text; the executor child parses it. `task_type` names the executor
    that runs it. `identity` is set when identical tasks may be run once for all."""

    stream_id: str
    task_id: str
    attempt: int
    task_type: str
    timeout: float | None
    spec: str
    identity: str = ""
    created_at: float | None = None
    group: tuple[str, ...] = ()

    @classmethod
    def from_entry(cls, stream_id: str, fields: dict[str, str]) -> list[Delivery]:
        """The attempts an inbox entry carries: one, or each child of a merged delivery."""
        task_type, timeout = fields.get("task_type"), fields.get("timeout_sec")
        if task_type is None:  # placed by an orchestrator from before these fields
            body = json.loads(fields["spec"])["spec"]
            task_type, timeout = body["taskType"], body.get("timeoutSec")
        children = fields.get("merge_children")
        if children:
            rows = json.loads(children)
            group = tuple(str(c["task_id"]) for c in rows)
            return [
                cls(
                    stream_id=stream_id,
                    task_id=str(c["task_id"]),
                    attempt=int(c["attempt"]),
                    task_type=task_type,
                    timeout=float(c["timeout_sec"]) if c.get("timeout_sec") else None,
                    spec=c["spec"],
                    identity=c.get("identity") or "",
                    created_at=float(c["created_at"]) if c.get("created_at") else None,
                    group=group,
                )
                for c in rows
            ]
        created = fields.get("created_at")
        return [
            cls(
                stream_id=stream_id,
                task_id=fields["task_id"],
                attempt=int(fields["attempt"]),
                task_type=task_type,
                timeout=float(timeout) if timeout else None,
                spec=fields["spec"],
                identity=fields.get("identity") or "",
                created_at=float(created) if created else None,
            )
        ]


@dataclass(frozen=True)
class Ending:
    """How one attempt ended, as `TaskStore.settle_many` records it. `error` is the
    failure record (flowmesh.errors.failure); `stream_id` the inbox entry to ack."""

    task_id: str
    attempt: int
    outcome: TaskStatus
    result_json: str = ""
    error: dict[str, Any] | None = None
    charge: bool = True
    immediate: bool = False
    avoid: bool = True
    stream_id: str = ""


@dataclass(frozen=True)
class QueueEntry:
    """A PENDING task as the scheduler queues it; `score` is the one submit.lua stored."""

    task_id: str
    requirements: Requirements
    score: float
    not_before: float = 0.0
    avoid: frozenset[str] = frozenset()
    # Task merge (orchestrator.merge): tasks with one merge key may share a delivery;
    # tasks with one identity are the same request, run once. '' for none.
    merge_key: str = ""
    identity: str = ""
    # Workers that hold the task's input (a pipeline stage's upstream artifact): preferred
    # by placement after a warm model (a soft score), with `prefer_why` saying what it is.
    prefer: frozenset[str] = frozenset()
    prefer_why: str = ""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was stored with a different request; nothing was stored."""

    def __init__(self, key: str, task_ids: list[str]):
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request")
        self.key = key
        self.task_ids = task_ids


def request_hash(specs: list[TaskSpec]) -> str:
    """sha256 of a request's validated specs as canonical JSON (sorted keys, no spaces):
    the same tasks hash the same whatever the body's format, whitespace or key order."""
    canonical = json.dumps(
        [spec.model_dump(mode="json") for spec in specs],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _loads(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


class TaskStore:
    def __init__(self, conn: aioredis.Redis, keys: Keys):
        self.conn = conn
        self.keys = keys
        self._submit = conn.register_script(_script("submit"))
        self._dispatch = conn.register_script(_script("dispatch"))
        self._start = conn.register_script(_script("start"))
        self._take = conn.register_script(_script("take"))
        self._progress = conn.register_script(_script("progress"))
        self._settle = conn.register_script(_script("settle"))
        self._cancel = conn.register_script(_script("cancel"))
        self._requeue_dead = conn.register_script(_script("requeue_dead"))

    # -- submit ------------------------------------------------------------------
    async def submit(
        self,
        specs: list[TaskSpec],
        idempotency_key: str | None = None,
        ttl: int = 86_400,
        merge: list[tuple[str, str]] | None = None,
        release: StageRelease | None = None,
    ) -> tuple[list[NewTask], list[str] | None]:
        """Store a batch of PENDING tasks all at once, or none of them: one script call.

        With an idempotency key seen before, nothing is stored: for the same request (the
        same `request_hash`) the ids created the first time are returned instead (second
        element; otherwise that is None); for a different one IdempotencyConflict is raised.
        With `release`, the tasks are a pipeline stage's (its `task_ids`), stored only if
        the stage is still waiting in a RUNNING pipeline, else StageNotReleased.
        """
        if not specs:
            return [], None
        k = self.keys
        ids = list(release.task_ids) if release else [uuid.uuid4().hex for _ in specs]
        requirements = [Requirements.of(spec.spec) for spec in specs]
        merge = merge or [("", "")] * len(specs)
        rows = []
        for i, (task_id, spec, req, (merge_key, identity)) in enumerate(
            zip(ids, specs, requirements, merge, strict=True)
        ):
            body = spec.spec
            stage = (
                [
                    release.pipeline_id,
                    release.stage,
                    str(i) if release.for_each else "",
                    ",".join(sorted(release.prefer)),
                    release.prefer_why if release.prefer else "",
                ]
                if release
                else []
            )
            rows.append(
                [
                    task_id,
                    spec.metadata.name or "",
                    body.taskType,
                    str(body.priority),
                    str(body.maxAttempts),
                    repr(body.retryBackoffSec),
                    repr(body.timeoutSec) if body.timeoutSec else "",
                    stored_spec(spec),
                    req.model_dump_json(exclude_defaults=True),
                    req.executor,
                    merge_key,
                    identity,
                    *stage,
                ]
            )
        args = [
            f"{time.time():.6f}",
            ttl,
            json.dumps(ids) if idempotency_key else "",
            json.dumps(rows, ensure_ascii=False),
            request_hash(specs) if idempotency_key else "",
            f"stage:{release.stage}" if release else "",
            release.record_json if release else "",
        ]
        reply = await self._submit(
            keys=[
                k.task_seq,
                k.tasks_all,
                k.tasks_by_status(TaskStatus.PENDING),
                k.pending_queue,
                k.idempotency(idempotency_key or ""),
                k.pipeline(release.pipeline_id) if release else k.pipeline(""),
                *(key for t in ids for key in (k.task(t), k.task_spec(t))),
            ],
            args=args,
        )
        if int(reply[0]) == -2:
            raise StageNotReleased(str(reply[1]))
        if int(reply[0]) < 0:
            raise IdempotencyConflict(idempotency_key or "", list(json.loads(reply[1])))
        if not reply[0]:
            return [], list(json.loads(reply[1]))
        first, scores = int(reply[1]), reply[2]
        prefer = (release.prefer, release.prefer_why) if release and release.prefer else ()
        return [
            NewTask(task_id, first + i, spec, req, float(score), *keys, *prefer)
            for i, (task_id, spec, req, score, keys) in enumerate(
                zip(ids, specs, requirements, scores, merge, strict=True)
            )
        ], None

    # -- read --------------------------------------------------------------------
    async def get(self, task_id: str) -> dict[str, Any] | None:
        """The task as the API shows it, its spec included (`get_many` leaves it out)."""
        async with self.conn.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.task(task_id))
            pipe.get(self.keys.task_spec(task_id))
            raw, spec = await pipe.execute()
        if not raw:
            return None
        task = decode_task(raw)
        task["spec"] = full_spec(spec or raw.get("spec"))  # in the hash: an older task
        return task

    async def get_many(self, task_ids: list[str]) -> list[dict[str, Any]]:
        async with self.conn.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self.keys.task(task_id))
            rows = await pipe.execute()
        return [decode_task(r) for r in rows if r]

    async def fields(
        self, task_ids: Sequence[str], names: Sequence[str]
    ) -> dict[str, list[str | None]]:
        """`names` of each task (None for a field or task that is not there), pipelined a
        thousand tasks per round trip."""
        out: dict[str, list[str | None]] = {}
        for start in range(0, len(task_ids), 1000):
            chunk = task_ids[start : start + 1000]
            async with self.conn.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.hmget(self.keys.task(task_id), list(names))
                out.update(zip(chunk, await pipe.execute(), strict=True))
        return out

    async def list_tasks(
        self,
        *,
        status: TaskStatus | None,
        task_type: str | None,
        limit: int,
        after: int | None,
        descending: bool = False,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Tasks in submission order, oldest first (newest first with `descending`).

        `after` is the cursor returned by the previous page in the same order: the
        submission sequence of its last task; the page starts just past it.
        """
        index = self.keys.tasks_by_status(status) if status else self.keys.tasks_all
        out: list[dict[str, Any]] = []
        cursor = after
        while len(out) < limit:
            ids = await page_after(self.conn, index, cursor, max(limit * 2, 50), descending)
            if not ids:
                return out, None
            rows = await self.get_many([task_id for task_id, _ in ids])
            by_id = {r["task_id"]: r for r in rows}
            for task_id, score in ids:
                cursor = int(score)
                row = by_id.get(task_id)
                if row and (task_type is None or row["task_type"] == task_type):
                    out.append(row)
                    if len(out) == limit:
                        break
        return out, cursor

    async def pending_ids(self) -> list[tuple[str, float]]:
        return await self.conn.zrange(self.keys.pending_queue, 0, -1, withscores=True)

    async def requirements(self, task_ids: list[str]) -> list[Requirements | None]:
        async with self.conn.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(self.keys.task(task_id), "requirements")
            raws = await pipe.execute()
        return [Requirements.model_validate_json(r) if r else None for r in raws]

    async def queue_entries(self, task_ids: list[str]) -> list[QueueEntry | None]:
        """What the scheduler needs to queue each PENDING task (None if not PENDING)."""
        async with self.conn.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hmget(
                    self.keys.task(task_id),
                    [
                        "status",
                        "requirements",
                        "score",
                        "retry_at",
                        "avoid_workers",
                        "merge_key",
                        "identity",
                        "prefer",
                        "prefer_why",
                    ],
                )
            rows = await pipe.execute()
        out: list[QueueEntry | None] = []
        for task_id, (
            status,
            req,
            score,
            retry_at,
            avoid,
            merge_key,
            identity,
            prefer,
            prefer_why,
        ) in zip(task_ids, rows, strict=True):
            if status != TaskStatus.PENDING.value or not req:
                out.append(None)
                continue
            out.append(
                QueueEntry(
                    task_id=task_id,
                    requirements=Requirements.model_validate_json(req),
                    score=float(score),
                    not_before=float(retry_at) if retry_at else 0.0,
                    avoid=frozenset(a for a in (avoid or "").split(",") if a),
                    merge_key=merge_key or "",
                    identity=identity or "",
                    prefer=frozenset(w for w in (prefer or "").split(",") if w),
                    prefer_why=prefer_why or "",
                )
            )
        return out

    async def set_reason(self, task_ids: list[str], reason: str) -> None:
        """Say why PENDING tasks wait; only for tasks still PENDING."""
        async with self.conn.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hset(self.keys.task(task_id), "reason", reason)
            await pipe.execute()

    # -- orchestrator: place -----------------------------------------------------
    async def dispatch(self, placements: list[tuple[str, str, str, str]]) -> list[Outcome]:
        """Place (task_id, worker_id, inbox, parent) tuples in one script call. Tasks with
        the same parent on one worker go in one merged delivery (the parent first); a task
        whose parent is itself, or '', alone. Outcomes come back in the order given."""
        if not placements:
            return []
        k = self.keys
        # worker -> parent -> indexes, in the order given
        by_worker: dict[tuple[str, str], dict[str, list[int]]] = {}
        for i, (task_id, worker_id, inbox, parent) in enumerate(placements):
            deliveries = by_worker.setdefault((worker_id, inbox), {})
            deliveries.setdefault(parent or task_id, []).append(i)
        keys = [
            k.pending_queue,
            k.tasks_by_status(TaskStatus.PENDING),
            k.tasks_by_status(TaskStatus.DISPATCHED),
        ]
        groups: list[tuple[str, list[list[str]]]] = []
        order: list[int] = []
        for (worker_id, inbox), deliveries in by_worker.items():
            keys += [k.worker(worker_id), k.heartbeat(worker_id), k.worker_tasks(worker_id), inbox]
            ids: list[list[str]] = []
            for indexes in deliveries.values():
                ids.append([placements[i][0] for i in indexes])
                for i in indexes:
                    keys += [k.task(placements[i][0]), k.task_spec(placements[i][0])]
                order += indexes
            groups.append((worker_id, ids))
        reply = await self._dispatch(keys=keys, args=[f"{time.time():.6f}", json.dumps(groups)])
        out: list[Outcome] = [Outcome(False)] * len(placements)
        for i, r in zip(order, reply, strict=True):
            out[i] = Outcome(True) if isinstance(r, int) else Outcome(False, str(r))
        return out

    async def set_placed_because(self, reasons: list[tuple[str, str]]) -> None:
        """Record why placement chose a task's worker, when a soft preference decided it
        (locality: the worker holds its input)."""
        async with self.conn.pipeline(transaction=False) as pipe:
            for task_id, why in reasons:
                pipe.hset(self.keys.task(task_id), "placed_because", why)
            await pipe.execute()

    # -- worker: run -------------------------------------------------------------
    async def start(self, worker_id: str, attempts: list[tuple[str, int]]) -> list[Outcome]:
        """Mark (task_id, attempt) pairs RUNNING on `worker_id`, in one script call."""
        k = self.keys
        reply = await self._start(
            keys=[*self._start_keys(worker_id), *(k.task(t) for t, _ in attempts)],
            args=[
                worker_id,
                f"{time.time():.6f}",
                EVENTS_MAXLEN,
                json.dumps([(t, str(a)) for t, a in attempts]),
            ],
        )
        return [Outcome(True) if r == 1 else Outcome(False, str(r)) for r in reply]

    def _start_keys(self, worker_id: str) -> list[str]:
        """The keys start.lua and take.lua both move an attempt through, in their order."""
        k = self.keys
        return [
            k.tasks_by_status(TaskStatus.DISPATCHED),
            k.tasks_by_status(TaskStatus.RUNNING),
            k.events,
            k.worker_tasks(worker_id),
        ]

    async def take(
        self, worker_id: str, inbox: str, count: int, here: Sequence[str]
    ) -> list[tuple[str, dict[str, str], list[Outcome | None]]]:
        """Read up to `count` new entries of `worker_id`'s inbox and start the attempts they
        carry, in one script call: (stream id, fields, an outcome per attempt of
        `Delivery.from_entry`) per entry. A worker whose inbox holds work saves the round
        trip between its read and `start`. An attempt of a task in `here` (one with an
        attempt on the worker now) is not started: its outcome is None, and the worker
        reads its entry again, through `start`, once that attempt has ended."""
        k = self.keys
        entries, outcomes = await self._take(
            keys=[inbox, *self._start_keys(worker_id)],
            args=[
                INBOX_GROUP,
                worker_id,
                count,
                f"{time.time():.6f}",
                EVENTS_MAXLEN,
                k.task(""),
                json.dumps(list(here)),
            ],
        )
        return [
            (
                str(stream_id),
                dict(zip(flat[::2], flat[1::2], strict=True)),
                [
                    Outcome(True) if r == 1 else None if r == 0 else Outcome(False, str(r))
                    for r in started
                ],
            )
            for (stream_id, flat), started in zip(entries, outcomes, strict=True)
        ]

    async def progress(
        self, worker_id: str, task_id: str, attempt: int, progress: dict[str, Any]
    ) -> bool:
        """Keep a running attempt's latest progress on its task; False when the attempt is
        no longer the task's live one (nothing written)."""
        reply = await self._progress(
            keys=[self.keys.task(task_id)],
            args=[worker_id, str(attempt), json.dumps(progress), f"{time.time():.6f}"],
        )
        return bool(reply)

    async def settle_many(
        self, worker_id: str, endings: list[Ending], inbox: str = ""
    ) -> list[Outcome]:
        """End attempts of `worker_id` in one script call, each atomically: DONE, or a
        retry after backoff, or FAILED and dead-lettered; ack their entries in `inbox`.

        An ending's `charge` says whether a failure counts toward maxAttempts (a
        hand-back does not); `immediate` skips the backoff (a lost worker is not the
        task's fault).
        """
        k = self.keys
        rows = []
        for e in endings:
            error = e.error or {}
            rows.append(
                [
                    e.task_id,
                    str(e.attempt),
                    e.outcome.value,
                    e.result_json,
                    json.dumps(error) if error else "",
                    error.get("kind", ""),
                    "1" if error.get("retryable", True) else "0",
                    "1" if e.charge else "0",
                    "1" if e.immediate else "0",
                    "1" if e.avoid else "0",
                    repr(random.random()),
                    e.stream_id,
                ]
            )
        args = [
            worker_id,
            f"{time.time():.6f}",
            INBOX_GROUP,
            EVENTS_MAXLEN,
            json.dumps(rows, ensure_ascii=False),
        ]
        reply = await self._settle(
            keys=[
                k.tasks_by_status(TaskStatus.DISPATCHED),
                k.tasks_by_status(TaskStatus.RUNNING),
                k.tasks_by_status(TaskStatus.PENDING),
                k.tasks_by_status(TaskStatus.DONE),
                k.tasks_by_status(TaskStatus.FAILED),
                k.pending_queue,
                k.dead_letters,
                k.worker_tasks(worker_id),
                k.events,
                inbox or k.events,
                *(k.task(e.task_id) for e in endings),
            ],
            args=args,
        )
        return [Outcome(bool(r[0]), str(r[1])) for r in reply]

    async def cancel(self, task_id: str) -> tuple[bool, str, str, int]:
        """(cancelled?, previous or current status, worker id, attempt)."""
        k = self.keys
        reply = await self._cancel(
            keys=[
                k.task(task_id),
                k.pending_queue,
                k.tasks_by_status(TaskStatus.PENDING),
                k.tasks_by_status(TaskStatus.DISPATCHED),
                k.tasks_by_status(TaskStatus.RUNNING),
                k.tasks_by_status(TaskStatus.CANCELLED),
                k.events,
            ],
            args=[task_id, f"{time.time():.6f}", EVENTS_MAXLEN],
        )
        if not reply[0]:
            return False, str(reply[1]), "", 0
        return True, str(reply[1]), str(reply[2]), int(reply[3])

    async def dead_letters(self, limit: int, after: float | None) -> list[dict[str, Any]]:
        low = f"({after}" if after is not None else "-inf"
        ids = await self.conn.zrangebyscore(
            self.keys.dead_letters, low, "+inf", start=0, num=limit, withscores=True
        )
        rows = await self.get_many([task_id for task_id, _ in ids])
        for row, (_, score) in zip(rows, ids, strict=False):
            row["dead_lettered_at"] = score
        return rows

    async def requeue_dead(self, task_id: str) -> Outcome:
        k = self.keys
        reply = await self._requeue_dead(
            keys=[
                k.task(task_id),
                k.dead_letters,
                k.tasks_by_status(TaskStatus.FAILED),
                k.tasks_by_status(TaskStatus.PENDING),
                k.pending_queue,
                k.events,
            ],
            args=[task_id, f"{time.time():.6f}", EVENTS_MAXLEN],
        )
        return Outcome(bool(reply[0]), "" if reply[0] else str(reply[1]))


async def page_after(
    conn: aioredis.Redis, index: str, cursor: int | None, num: int, descending: bool
) -> list[tuple[str, float]]:
    """Up to `num` (member, score) of a sorted set scored by submission sequence, just past
    `cursor` (a score, exclusive; None: from the start), oldest first or newest first."""
    if descending:
        high = "+inf" if cursor is None else f"({cursor}"
        return await conn.zrevrangebyscore(index, high, "-inf", start=0, num=num, withscores=True)
    low = "-inf" if cursor is None else f"({cursor}"
    return await conn.zrangebyscore(index, low, "+inf", start=0, num=num, withscores=True)


def stored_spec(spec: TaskSpec) -> str:
    """A spec as its key stores it: JSON without the fields at their defaults (a no-op
    task's spec shrinks from 465 bytes to about 100). Validating it gives the spec back."""
    return spec.model_dump_json(exclude_defaults=True)


def full_spec(raw: str | None) -> Any:
    """A stored spec as the API shows it: every field, defaults included."""
    if not raw:
        return None
    try:
        return TaskSpec.model_validate_json(raw).model_dump(mode="json")
    except ValueError:  # stored by a version whose spec this one no longer reads
        return json.loads(raw)


def decode_task(raw: dict[str, str]) -> dict[str, Any]:
    """A task hash as the API shows it, without its spec (`TaskStore.get` adds it)."""
    status = TaskStatus(raw["status"])

    def num(field: str) -> float | None:
        return float(raw[field]) if raw.get(field) else None

    return {
        "task_id": raw["task_id"],
        "name": raw.get("name") or None,
        "task_type": raw.get("task_type"),
        "status": status.value,
        "priority": int(raw.get("priority", 0)),
        "attempts": int(raw.get("attempts", 0)),
        "failures": int(raw.get("failures", 0)),
        "max_attempts": int(raw.get("max_attempts", 0)),
        "worker_id": raw.get("worker_id") or None,
        "reason": raw.get("reason") or None if status == TaskStatus.PENDING else None,
        "result": (result := _loads(raw.get("result"))),
        "error": _loads(raw.get("error")),
        "created_at": num("created_at"),
        "dispatched_at": num("dispatched_at"),
        "started_at": num("started_at"),
        "finished_at": num("finished_at"),
        "updated_at": num("updated_at"),
        "retry_at": num("retry_at") if status == TaskStatus.PENDING else None,
        "history": _loads(raw.get("history")) or [],
        "progress": _loads(raw.get("progress")),
        "progress_at": num("progress_at"),
        "merge": _merge_view(raw, result),
        "pipeline": (
            {
                "pipeline_id": raw["pipeline_id"],
                "stage": raw.get("stage"),
                "item": int(raw["item"]) if raw.get("item") else None,
            }
            if raw.get("pipeline_id")
            else None
        ),
        "placed_because": raw.get("placed_because") or None,
        "active": status in ACTIVE,
    }


def _merge_view(raw: dict[str, str], result: Any) -> dict[str, Any] | None:
    """How task merge treats the task: None when merge is off for it; else whether its
    last delivery was merged and with which tasks, and, when an identical task ran for it,
    which one."""
    if not raw.get("merge_key"):
        return None
    group = _loads(raw.get("merge_group")) or []
    executed_by = result.get("executed_by") if isinstance(result, dict) else None
    return {
        "enabled": True,
        "identical_runs_once": bool(raw.get("identity")),
        "merged": len(group) > 1,
        "parent": raw.get("merge_parent") or None,
        "with": [t for t in group if t != raw["task_id"]],
        "executed_by": executed_by,
    }
