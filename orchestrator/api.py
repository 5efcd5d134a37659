"""HTTP routes under /api/v1: submit and read tasks, list workers."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from flowmesh import workers
from flowmesh.failures import public_error
from flowmesh.pipeline import is_pipeline
from flowmesh.spec import SpecError
from flowmesh.status import TaskStatus
from orchestrator import intake
from orchestrator.documents import read_documents, spec_error
from orchestrator.fleet import Fleet
from orchestrator.pipelines.routes import submit_pipeline
from orchestrator.waiters import MAX_WAIT_SEC

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1")

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "description": "One task spec, a list of specs, or several YAML documents.",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/TaskSpec"},
                        {"type": "array", "items": {"$ref": "#/components/schemas/TaskSpec"}},
                    ]
                }
            },
        },
    }
}


def fleet(request: Request) -> Fleet:
    value: Fleet = request.app.state.fleet
    return value


@router.post(
    "/tasks", status_code=201, openapi_extra=_SUBMIT_BODY, summary="Submit one task spec or a batch"
)
async def submit_tasks(request: Request) -> Any:
    f = fleet(request)
    settings = request.app.state.settings
    read = await read_documents(request)
    if isinstance(read, JSONResponse):
        return read
    docs, key, run = read
    if any(is_pipeline(doc) for doc in docs):
        return await submit_pipeline(request, docs, key, run)
    try:
        specs = await intake.checked(f, settings.max_batch, lambda check: run(check, docs))
    except SpecError as exc:
        return spec_error(exc)
    tasks, existing = await f.submit(specs, key, intake.merge_keys_of(specs))
    if existing is not None:
        # Seen before: the first request's tasks as they are now; nothing new is stored.
        rows = await f.store.get_many(existing)
        return JSONResponse(
            status_code=200,
            content={
                "tasks": [
                    {"task_id": r["task_id"], "name": r["name"], "status": r["status"]}
                    for r in rows
                ],
                "idempotent_replay": True,
            },
        )
    return {
        "tasks": [
            {"task_id": t.task_id, "name": t.spec.metadata.name, "status": TaskStatus.PENDING.value}
            for t in tasks
        ]
    }


def _public(f: Fleet, task: dict[str, Any]) -> dict[str, Any]:
    """A task as the API serves it: the traceback without the worker's paths (its log has
    the whole one), and for a PENDING task why it waits, as of now."""
    task["error"] = public_error(task.get("error"))
    if task["status"] == TaskStatus.PENDING.value:
        entry = f.scheduler.pending.get(task["task_id"])
        retry_at = task.get("retry_at") or 0
        if entry is not None and retry_at <= time.time():
            task["reason"] = f.scheduler.explain(entry.requirements)
    return task


@router.get("/tasks/{task_id}", summary="One task: status, attempts, worker, result, error")
async def get_task(
    task_id: str,
    request: Request,
    wait: float = Query(
        0,
        ge=0,
        le=MAX_WAIT_SEC,
        description="Long poll: hold the request up to this many seconds until the task "
        "has ended (DONE, FAILED or CANCELLED); the reply is its state either way.",
    ),
) -> Any:
    f = fleet(request)

    async def read() -> dict[str, Any]:
        task = await f.store.get(task_id)
        if task is None:
            raise HTTPException(404, f"no task with id {task_id!r}")
        return task

    task = await f.waiters.poll(task_id, read, lambda t: TaskStatus(t["status"]).terminal, wait)
    return _public(f, task)


@router.get("/tasks/{task_id}/result", summary="The executor's output of a finished task")
async def get_result(task_id: str, request: Request) -> Any:
    task = await fleet(request).store.get(task_id)
    if task is None:
        raise HTTPException(404, f"no task with id {task_id!r}")
    if task["status"] != TaskStatus.DONE.value:
        raise HTTPException(409, f"task {task_id} is {task['status']}, not DONE; no result yet")
    return {"task_id": task_id, "status": task["status"], "result": task["result"]}


@router.post("/tasks/{task_id}/cancel", summary="Cancel a pending or running task")
async def cancel_task(task_id: str, request: Request) -> Any:
    cancelled, status = await fleet(request).cancel(task_id)
    if status == "missing":
        raise HTTPException(404, f"no task with id {task_id!r}")
    if not cancelled:
        raise HTTPException(409, f"task {task_id} is already {status}; nothing to cancel")
    return {"task_id": task_id, "status": TaskStatus.CANCELLED.value, "previous": status}


@router.get("/dead-letters", summary="Tasks that failed for good, newest last, with their error")
async def dead_letters(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[float | None, Query(description="next_cursor of the previous page")] = None,
) -> Any:
    rows = await fleet(request).store.dead_letters(limit, cursor)
    for row in rows:
        row["error"] = public_error(row.get("error"))
    next_cursor = rows[-1]["dead_lettered_at"] if len(rows) == limit else None
    return {"tasks": rows, "next_cursor": next_cursor}


@router.post(
    "/dead-letters/{task_id}/requeue",
    summary="Put a dead-lettered task back in the queue with a fresh failure budget",
)
async def requeue_dead_letter(task_id: str, request: Request) -> Any:
    f = fleet(request)
    outcome = await f.store.requeue_dead(task_id)
    if not outcome.ok:
        if await f.store.get(task_id) is None:
            raise HTTPException(404, f"no task with id {task_id!r}")
        raise HTTPException(409, f"task {task_id} cannot be requeued: {outcome.reason}")
    return {"task_id": task_id, "status": TaskStatus.PENDING.value}


@router.get(
    "/tasks",
    summary="List tasks, filtered by status and type, oldest first (newest first: order=desc)",
)
async def list_tasks(
    request: Request,
    status: Annotated[TaskStatus | None, Query(description="Only tasks in this status")] = None,
    type: Annotated[str | None, Query(description="Only tasks of this taskType")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None,
        Query(description="next_cursor of the previous page, requested with the same order"),
    ] = None,
    order: Annotated[
        Literal["asc", "desc"],
        Query(description="By submission: asc (oldest first, the default) or desc (newest first)"),
    ] = "asc",
) -> Any:
    after = None
    if cursor:
        if not re.fullmatch(r"[0-9]{1,19}", cursor):
            raise HTTPException(422, f"cursor must be a next_cursor value, got {cursor!r}")
        after = int(cursor)
    f = fleet(request)
    rows, next_cursor = await f.store.list_tasks(
        status=status, task_type=type, limit=limit, after=after, descending=order == "desc"
    )
    for row in rows:
        row.pop("result", None)
        _public(f, row)
    return {"tasks": rows, "next_cursor": str(next_cursor) if next_cursor else None}


@router.get(
    "/workers", summary="Registered workers: hardware, tags, executors and their states, load"
)
async def list_workers(request: Request) -> Any:
    f = fleet(request)
    now = time.time()
    out = []
    for record, pttl, _tasks in await workers.read_all(f.conn, f.keys):
        row = record.to_json()
        ttl = max(pttl, 0) / 1000.0
        row.update(
            alive=pttl > 0,
            heartbeat_ttl_sec=round(ttl, 3),
            seconds_since_heartbeat=round(now - record.last_seen, 3),
        )
        out.append(row)
    return {"workers": out}


async def _admin(request: Request, worker_id: str, write: Callable[[Any], None]) -> None:
    """Queue `write` (a `flowmesh.workers` admin write) for a registered worker, in one
    transaction, and have the fleet re-read; 404 for a worker that is not registered."""
    f = fleet(request)
    if not await f.conn.sismember(f.keys.worker_ids, worker_id):
        raise HTTPException(404, f"no registered worker with id {worker_id!r}")
    async with f.conn.pipeline(transaction=True) as pipe:
        write(pipe)
        await pipe.execute()
    f.wake(refresh=True)


@router.post(
    "/workers/{worker_id}/disable",
    summary="Take a worker out of placement; it stays registered and warm, and accrues no cost",
)
async def disable_worker(worker_id: str, request: Request) -> Any:
    keys = fleet(request).keys
    await _admin(
        request,
        worker_id,
        lambda pipe: workers.set_disabled(pipe, keys, worker_id, "disabled by request"),
    )
    return {"worker_id": worker_id, "disabled": True}


@router.post("/workers/{worker_id}/enable", summary="Put a disabled worker back into placement")
async def enable_worker(worker_id: str, request: Request) -> Any:
    keys = fleet(request).keys
    await _admin(
        request,
        worker_id,
        lambda pipe: workers.set_enabled(pipe, keys, worker_id, "enabled by request"),
    )
    return {"worker_id": worker_id, "disabled": False}


@router.post(
    "/workers/{worker_id}/drain",
    summary="Stop a worker as SIGTERM does: no new tasks, finish or hand back, deregister, exit",
)
async def drain_worker(worker_id: str, request: Request) -> Any:
    keys = fleet(request).keys
    await _admin(request, worker_id, lambda pipe: workers.request_drain(pipe, keys, worker_id))
    return {"worker_id": worker_id, "drain_requested": True}
