"""Running pipelines: who releases a stage, and when.

The orchestrator does. `evaluate(pipeline)` reads the pipeline and its stages' tasks from
Redis and moves every stage it can: a running stage whose tasks all ended becomes done,
failed or cancelled; a waiting stage whose upstream stages are all final is released (its
templates resolved, its tasks stored PENDING in the same step that marks it running:
`submit.lua`'s stage guard, so a stage is released once however often it is evaluated),
failed or skipped by its `onUpstreamFailure`, or failed when its wait deadline passed;
and when every stage is final the pipeline ends.

Evaluation is driven by task events that name a pipeline (`settle.lua`, `cancel.lua`), but
never depends on them: every active pipeline is also evaluated on start and every
FLOWMESH_PIPELINE_SCAN_SEC, from task state alone. An orchestrator killed at any point
therefore loses nothing, and a restarted one releases exactly what is still due.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from flowmesh import failpoints
from flowmesh.pipeline import MAX_ITEMS
from flowmesh.pipeline_store import (
    PipelineRow,
    PipelineStatus,
    PipelineStore,
    StageRecord,
    StageState,
)
from flowmesh.spec import SpecError, TaskSpec
from flowmesh.status import TaskStatus
from flowmesh.store import StageNotReleased, StageRelease
from orchestrator import intake
from orchestrator.fleet import Fleet
from orchestrator.pipelines.planner import stage_document
from orchestrator.pipelines.release import locality, resolve
from orchestrator.pipelines.templates import (
    TemplateError,
    templated_paths,
)
from orchestrator.waiters import Waiters

log = logging.getLogger(__name__)

TASK_FIELDS = ("status", "result", "last_worker_id", "error", "finished_at")
# Tasks of a running stage read per round trip while checking whether all have ended.
ENDED_CHUNK = 64


def result_fields(task_type: str) -> frozenset[str] | None:
    cls = intake.executor_class(task_type)
    return cls.result_fields if cls is not None else None


class PipelineRunner:
    def __init__(
        self, fleet: Fleet, *, scan_sec: float = 5.0, idempotency_ttl: int = 86_400
    ) -> None:
        self.fleet = fleet
        self.store = PipelineStore(fleet.conn, fleet.keys)
        self.scan_sec = scan_sec
        self.idempotency_ttl = idempotency_ttl
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        # pipeline -> task id -> its fields, for tasks seen ended (they never change again)
        self._ended: dict[str, dict[str, dict[str, Any]]] = {}
        # Long-poll readers of a pipeline (GET ?wait=), woken when it ends.
        self.waiters = Waiters()
        self._loop_task: asyncio.Task[None] | None = None
        self._pause = failpoints.from_environment("pipeline_release")
        fleet.on_pipeline_event = self.touch

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="pipelines")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    def touch(self, pipeline_id: str) -> None:
        """Something happened to one of the pipeline's tasks: evaluate it soon."""
        self._dirty.add(pipeline_id)
        self._wake.set()

    async def _loop(self) -> None:
        next_scan = 0.0
        while True:
            timeout = max(0.0, next_scan - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                if time.monotonic() >= next_scan:
                    active = set(await self.store.active_ids())
                    self._dirty.update(active)
                    self._forget_all_but(active)
                    next_scan = time.monotonic() + self.scan_sec
                batch, self._dirty = self._dirty, set()
                for pipeline_id in sorted(batch):
                    try:
                        await self.evaluate(pipeline_id)
                    except (RedisError, OSError):
                        self._dirty.add(pipeline_id)
                        raise
                    except Exception:
                        log.exception("pipeline %s: evaluation failed", pipeline_id)
            except (RedisError, OSError) as exc:
                log.warning("pipelines paused: Redis unreachable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    def _forget_all_but(self, active: set[str]) -> None:
        """Drop what is remembered of pipelines no longer active (ended here, or by
        another orchestrator, or deleted)."""
        for pipeline_id in [p for p in self._ended if p not in active]:
            del self._ended[pipeline_id]
        for pipeline_id, lock in list(self._locks.items()):
            # one being submitted may not be in `active` as read: keep a lock in use
            if pipeline_id not in active and not lock.locked():
                del self._locks[pipeline_id]

    # -- submit and cancel -------------------------------------------------------
    async def submit(
        self, plan: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        """Store a planned pipeline and release the stages that wait for nothing;
        (its id, True), or (the first request's id, False) for a replayed key."""
        pipeline_id = uuid.uuid4().hex
        _, existing = await self.store.create(
            pipeline_id,
            plan["name"],
            plan,
            list(plan["stages"]),
            idempotency_key,
            self.idempotency_ttl,
        )
        if existing is not None:
            return existing, False
        log.info(
            "pipeline %s (%s): %d stage(s) submitted",
            pipeline_id,
            plan["name"] or "unnamed",
            len(plan["stages"]),
        )
        try:
            await self.evaluate(pipeline_id)
        except Exception:  # stored: the runner's loop evaluates it again in a moment
            log.exception("pipeline %s: first evaluation failed; retrying", pipeline_id)
            self.touch(pipeline_id)
        return pipeline_id, True

    async def cancel(self, pipeline_id: str) -> tuple[bool, str]:
        """Cancel a RUNNING pipeline: no stage is released any more, and every task of
        its stages not yet ended is cancelled. (cancelled?, status before or now)."""
        row = await self.store.get(pipeline_id)
        if row is None:
            return False, "missing"
        _, status = await self.store.update(pipeline_id, status=PipelineStatus.CANCELLED)
        if status != PipelineStatus.CANCELLED or row.status != PipelineStatus.RUNNING:
            return False, (status or row.status).value
        log.info("pipeline %s: cancelled", pipeline_id)
        await self.evaluate(pipeline_id)  # cancels the stages' tasks (CANCELLED at once)
        await self.evaluate(pipeline_id)  # and records their stages as cancelled
        return True, row.status.value

    # -- evaluation --------------------------------------------------------------
    async def evaluate(self, pipeline_id: str) -> None:
        # One evaluation of a pipeline at a time here; across orchestrators the Lua steps'
        # compare-and-set keeps each stage's moves single.
        async with self._locks.setdefault(pipeline_id, asyncio.Lock()):
            await self._evaluate(pipeline_id)

    async def _evaluate(self, pipeline_id: str) -> None:
        row = await self.store.get(pipeline_id)
        if row is None:
            return
        stages = row.plan["stages"]
        records = row.stages
        await self._finish_running(row)
        if row.status == PipelineStatus.CANCELLED:
            await self._cancel_rest(row)
        elif row.status == PipelineStatus.RUNNING:
            now = time.time()
            for name in row.plan["order"]:
                if records[name].state == StageState.WAITING:
                    try:
                        await self._consider(row, name, stages[name], now)
                    except (RedisError, OSError):
                        raise
                    except Exception as exc:  # a bug must end the stage, not retry for ever
                        log.exception("pipeline %s: stage %s", pipeline_id, name)
                        await self._end(
                            row, name, StageState.FAILED, f"internal error releasing it: {exc!r}"
                        )
        if all(r.state.final for r in records.values()):
            failed = [n for n, r in records.items() if r.state in _UNSUCCESSFUL]
            final = PipelineStatus.FAILED if failed else PipelineStatus.DONE
            _, status = await self.store.update(pipeline_id, status=final, retire=True)
            self._ended.pop(pipeline_id, None)
            self._locks.pop(pipeline_id, None)
            if row.status == PipelineStatus.RUNNING:
                log.info(
                    "pipeline %s: %s%s",
                    pipeline_id,
                    status.value if status else final.value,
                    f" (failed: {', '.join(failed)})" if failed else "",
                )
            self.waiters.notify(pipeline_id)

    async def _finish_running(self, row: PipelineRow) -> None:
        """Running stages whose tasks have all ended become done, failed or cancelled."""
        running = [n for n, r in row.stages.items() if r.state == StageState.RUNNING]
        if not running:
            return
        for name in running:
            record = row.stages[name]
            tasks = await self._all_ended(row.pipeline_id, record.task_ids)
            if tasks is None:
                continue
            ended = [tasks[t] for t in record.task_ids]
            statuses = Counter(t["status"] for t in ended)
            finished_at = max((t.get("finished_at") or 0.0) for t in ended) or time.time()
            if statuses[TaskStatus.FAILED.value]:
                task_id, task = next(
                    (i, t)
                    for i, t in zip(record.task_ids, ended, strict=True)
                    if t["status"] == TaskStatus.FAILED.value
                )
                error = (task.get("error") or {}).get("message") or "no error recorded"
                state = StageState.FAILED
                reason = (
                    f"{statuses[TaskStatus.FAILED.value]} of {len(ended)} task(s) failed; "
                    f"task {task_id}: {error}"
                )
            elif statuses[TaskStatus.CANCELLED.value]:
                state = StageState.CANCELLED
                reason = f"{statuses[TaskStatus.CANCELLED.value]} task(s) cancelled"
            else:
                state, reason = StageState.DONE, ""
            new = replace(record, state=state, reason=reason, finished_at=finished_at)
            await self._set(row, name, StageState.RUNNING, new)

    async def _cancel_rest(self, row: PipelineRow) -> None:
        for name, record in row.stages.items():
            if record.state == StageState.WAITING:
                new = StageRecord(
                    state=StageState.CANCELLED,
                    reason="the pipeline was cancelled",
                    finished_at=time.time(),
                )
                await self._set(row, name, StageState.WAITING, new)
            elif record.state == StageState.RUNNING:
                tasks = await self._tasks(row.pipeline_id, record.task_ids)
                for task_id in record.task_ids:
                    task = tasks.get(task_id)
                    if task is not None and not TaskStatus(task["status"]).terminal:
                        await self.fleet.cancel(task_id)
        # The cancelled tasks' stages end at the next evaluation (their cancel events).

    async def _consider(
        self, row: PipelineRow, name: str, stage: dict[str, Any], now: float
    ) -> None:
        records = row.stages
        deps = stage["deps"]
        pending = [d for d in deps if not records[d].state.final]
        if pending:
            deadline = row.created_at + stage["waitTimeoutSec"]
            if now > deadline:
                waiting_on = ", ".join(f"{d} ({records[d].state.value})" for d in pending)
                await self._end(
                    row,
                    name,
                    StageState.FAILED,
                    f"waited more than {stage['waitTimeoutSec']:g} s (waitTimeoutSec) for "
                    f"upstream stage(s) {waiting_on}",
                )
            return
        failed = [d for d in deps if records[d].state in _UNSUCCESSFUL]
        skipped = [d for d in deps if records[d].state == StageState.SKIPPED]
        policy = stage["onUpstreamFailure"]
        if failed and policy != "run":
            what = ", ".join(
                f"{d} {'was cancelled' if records[d].state == StageState.CANCELLED else 'failed'}"
                for d in failed
            )
            state = StageState.FAILED if policy == "fail" else StageState.SKIPPED
            await self._end(row, name, state, f"upstream {what}")
        elif skipped and not failed and policy != "run":
            await self._end(
                row, name, StageState.SKIPPED, f"upstream {', '.join(skipped)} was skipped"
            )
        else:
            await self._release(row, name, stage)

    async def _end(self, row: PipelineRow, name: str, state: StageState, reason: str) -> None:
        new = StageRecord(state=state, reason=reason, finished_at=time.time())
        if await self._set(row, name, StageState.WAITING, new):
            log.info("pipeline %s: stage %s %s: %s", row.pipeline_id, name, state.value, reason)

    async def _set(
        self, row: PipelineRow, name: str, expected: StageState, new: StageRecord
    ) -> bool:
        changed, _ = await self.store.update(row.pipeline_id, [(name, expected, new)])
        if changed:
            row.stages[name] = new
            return True
        await self._reread(row, name)  # someone else moved it
        return False

    async def _reread(self, row: PipelineRow, name: str) -> None:
        fresh = await self.store.get(row.pipeline_id)
        if fresh is not None:
            row.stages[name] = fresh.stages[name]

    # -- release -----------------------------------------------------------------
    async def _release(self, row: PipelineRow, name: str, stage: dict[str, Any]) -> None:
        document = stage_document(row.plan, name)
        refs = templated_paths(document)
        try:
            values = await self._upstream(row, stage)
            reads_dirs = any(r.field == "outputs_dir" for found in refs.values() for r in found)
            dirs = await self._outputs_dirs(row, stage, values) if reads_dirs else {}
            docs, inputs, items = resolve(row, stage, document, refs, values, dirs)
        except TemplateError as exc:
            await self._end(row, name, StageState.FAILED, f"cannot resolve its inputs: {exc}")
            return
        if not docs:
            new = StageRecord(
                state=StageState.DONE,
                reason="forEach gave no items: nothing to run",
                released_at=time.time(),
                finished_at=time.time(),
                items=0,
            )
            await self._set(row, name, StageState.WAITING, new)
            return

        async def check_here(check: Callable[[list[Any]], list[TaskSpec]]) -> list[TaskSpec]:
            return check(docs)

        try:
            specs = await intake.checked(self.fleet, MAX_ITEMS, check_here)
        except SpecError as exc:
            await self._end(
                row, name, StageState.FAILED, f"its spec, once resolved, is not valid: {exc}"
            )
            return
        task_ids = tuple(uuid.uuid4().hex for _ in specs)
        record = StageRecord(
            state=StageState.RUNNING,
            task_ids=task_ids,
            released_at=time.time(),
            inputs=inputs,
            items=len(specs) if items is not None else None,
        )
        prefer, why = locality(stage, values)
        release = StageRelease(
            pipeline_id=row.pipeline_id,
            stage=name,
            task_ids=task_ids,
            record_json=record.to_json(),
            for_each=items is not None,
            prefer=prefer,
            prefer_why=why,
        )
        if self._pause:
            log.warning(
                "failpoint pipeline_release: %.1fs before releasing stage %s", self._pause, name
            )
            await asyncio.sleep(self._pause)
        try:
            await self.fleet.submit(specs, None, intake.merge_keys_of(specs), release=release)
        except StageNotReleased as exc:
            log.debug("pipeline %s: stage %s not released: %s", row.pipeline_id, name, exc)
            await self._reread(row, name)
            return
        row.stages[name] = record
        log.info(
            "pipeline %s: stage %s released: %d task(s)%s",
            row.pipeline_id,
            name,
            len(task_ids),
            f", preferring {', '.join(sorted(prefer))}" if prefer else "",
        )

    async def _upstream(self, row: PipelineRow, stage: dict[str, Any]) -> dict[str, list[dict]]:
        """The ended tasks of every stage this one depends on, in item order."""
        out: dict[str, list[dict[str, Any]]] = {}
        wanted = [t for d in stage["deps"] for t in row.stages[d].task_ids]
        tasks = await self._tasks(row.pipeline_id, wanted)
        for dep in stage["deps"]:
            out[dep] = [tasks.get(t) or {} for t in row.stages[dep].task_ids]
        return out

    async def _outputs_dirs(
        self, row: PipelineRow, stage: dict[str, Any], values: dict[str, list[dict]]
    ) -> dict[str, str]:
        """RESULTS_DIR/<task_id> of each upstream stage's (first) task, on the worker
        that ran it, as that worker's record says (the worker must still be registered)."""
        out: dict[str, str] = {}
        for name in stage["deps"]:
            tasks = values.get(name, [])
            worker = tasks[0].get("last_worker_id") if tasks else None
            if not worker or not row.stages[name].task_ids:
                continue
            raw = await self.fleet.conn.hget(self.fleet.keys.worker(worker), "artifacts")
            base = json.loads(raw).get("results_dir") if raw else None
            if base:
                out[name] = f"{base.rstrip('/')}/{row.stages[name].task_ids[0]}"
        return out

    async def _all_ended(
        self, pipeline_id: str, task_ids: Sequence[str]
    ) -> dict[str, dict[str, Any]] | None:
        """TASK_FIELDS of every task when all have ended, else None. Read in order, a
        chunk at a time, stopping at the first chunk with a task still going: a 1,000-task
        stage is evaluated at every batch of its tasks' ends, and each evaluation then reads
        a chunk or two, not every task still running (ended ones are remembered)."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(task_ids), ENDED_CHUNK):
            tasks = await self._tasks(pipeline_id, task_ids[start : start + ENDED_CHUNK])
            if any(not TaskStatus(t["status"]).terminal for t in tasks.values()):
                return None
            out.update(tasks)
        return out

    async def _tasks(self, pipeline_id: str, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """TASK_FIELDS of each task; ended ones are remembered and not read again."""
        ended = self._ended.setdefault(pipeline_id, {})
        out = {t: ended[t] for t in task_ids if t in ended}
        todo = [t for t in task_ids if t not in ended]
        for task_id, values in (await self.fleet.store.fields(todo, TASK_FIELDS)).items():
            task: dict[str, Any]
            if values[0] is None:  # deleted from Redis: it will never end by itself
                task = {
                    "status": TaskStatus.FAILED.value,
                    "error": {"message": f"task {task_id} is no longer in Redis"},
                    "result": None,
                    "last_worker_id": None,
                    "finished_at": None,
                }
            else:
                task = dict(zip(TASK_FIELDS, values, strict=True))
                task["result"] = json.loads(task["result"]) if task["result"] else None
                task["error"] = json.loads(task["error"]) if task["error"] else None
                finished = task["finished_at"]
                task["finished_at"] = float(finished) if finished else None
            out[task_id] = task
            # FAILED is not final: a dead letter can be requeued; read it again.
            if values[0] is None or task["status"] in _FINAL_TASK:
                ended[task_id] = task
        return out


_FINAL_TASK = frozenset({TaskStatus.DONE.value, TaskStatus.CANCELLED.value})
_UNSUCCESSFUL = frozenset({StageState.FAILED, StageState.CANCELLED})
