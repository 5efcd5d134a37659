"""HTTP routes for pipelines: submit (also through POST /api/v1/tasks), read, list, cancel."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from flowmesh.pipeline import MAX_ITEMS, is_pipeline
from flowmesh.pipeline_store import PipelineRow, PipelineStatus
from flowmesh.spec import SpecError
from orchestrator import intake
from orchestrator.documents import Run, read_documents, spec_error
from orchestrator.pipelines.planner import plan_pipeline
from orchestrator.pipelines.runner import PipelineRunner, result_fields
from orchestrator.waiters import MAX_WAIT_SEC

router = APIRouter(prefix="/api/v1")
# Tasks listed per stage in a pipeline's view (a forEach stage may have thousands; the
# view counts them all and lists the first ones).
TASKS_SHOWN = 100
TASK_VIEW = ("status", "attempts", "worker_id", "last_worker_id", "started_at", "finished_at")


def runner(request: Request) -> PipelineRunner:
    value: PipelineRunner = request.app.state.pipelines
    return value


async def submit_pipeline(request: Request, docs: list[Any], key: str | None, run: Run) -> Any:
    """One pipeline document, checked whole (on a worker thread for a large body: `run`),
    stored, and its first stages released."""
    if len(docs) != 1:
        where = next((i for i, d in enumerate(docs) if is_pipeline(d)), 0)
        return spec_error(
            SpecError(
                [(f"[{where}]", "a pipeline is submitted alone, not in a batch with other specs")]
            )
        )
    r = runner(request)
    try:
        # the checker reads the fleet here, on the loop; `run` may plan on a thread
        plan = await intake.checked(
            r.fleet,
            MAX_ITEMS,
            lambda check: run(plan_pipeline, docs[0], check=check, result_fields=result_fields),
        )
    except SpecError as exc:
        return spec_error(exc)
    pipeline_id, created = await r.submit(plan, key)
    row = await r.store.get(pipeline_id)
    if row is None:  # a replayed key whose pipeline has been deleted since
        raise HTTPException(
            409, f"Idempotency-Key {key!r} named pipeline {pipeline_id}, which no longer exists"
        )
    view = await pipeline_view(r, row)
    view["idempotent_replay"] = not created
    return JSONResponse(status_code=201 if created else 200, content=view)


@router.post(
    "/pipelines",
    status_code=201,
    summary="Submit a pipeline (YAML or JSON): stages, or a graph of nodes",
)
async def submit(request: Request) -> Any:
    read = await read_documents(request)
    if isinstance(read, JSONResponse):
        return read
    docs, key, run = read
    if not docs or not all(is_pipeline(d) for d in docs):
        return spec_error(
            SpecError([("body", "not a pipeline: a pipeline has spec.stages or spec.graph")])
        )
    return await submit_pipeline(request, docs, key, run)


@router.get("/pipelines/{pipeline_id}", summary="One pipeline: its stages, tasks and inputs")
async def get_pipeline(
    pipeline_id: str,
    request: Request,
    wait: float = Query(
        0,
        ge=0,
        le=MAX_WAIT_SEC,
        description="Long poll: hold the request up to this many seconds until the "
        "pipeline has ended; the reply is its state either way.",
    ),
) -> Any:
    r = runner(request)

    async def read() -> PipelineRow:
        row = await r.store.get(pipeline_id)
        if row is None:
            raise HTTPException(404, f"no pipeline with id {pipeline_id!r}")
        return row

    row = await r.waiters.poll(
        pipeline_id, read, lambda row: row.status != PipelineStatus.RUNNING, wait
    )
    return await pipeline_view(r, row)


@router.get("/pipelines", summary="List pipelines, filtered by status, oldest first")
async def list_pipelines(
    request: Request,
    status: Annotated[PipelineStatus | None, Query(description="Only in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="By submission")] = "asc",
) -> Any:
    after = None
    if cursor:
        if not re.fullmatch(r"[0-9]{1,19}", cursor):
            raise HTTPException(422, f"cursor must be a next_cursor value, got {cursor!r}")
        after = int(cursor)
    r = runner(request)
    rows, next_cursor = await r.store.list(
        status=status, limit=limit, after=after, descending=order == "desc"
    )
    return {
        "pipelines": [summary(row) for row in rows],
        "next_cursor": str(next_cursor) if next_cursor and len(rows) == limit else None,
    }


@router.post("/pipelines/{pipeline_id}/cancel", summary="Cancel a pipeline and its stages")
async def cancel_pipeline(pipeline_id: str, request: Request) -> Any:
    cancelled, status = await runner(request).cancel(pipeline_id)
    if status == "missing":
        raise HTTPException(404, f"no pipeline with id {pipeline_id!r}")
    if not cancelled:
        raise HTTPException(409, f"pipeline {pipeline_id} is already {status}; nothing to cancel")
    return {"pipeline_id": pipeline_id, "status": PipelineStatus.CANCELLED.value}


def summary(row: PipelineRow) -> dict[str, Any]:
    states = Counter(r.state.value for r in row.stages.values())
    return {
        "pipeline_id": row.pipeline_id,
        "name": row.name or None,
        "status": row.status.value,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "stages": dict(states),
    }


async def pipeline_view(r: PipelineRunner, row: PipelineRow) -> dict[str, Any]:
    """A pipeline as the API serves it: each stage's state, dependencies, resolved inputs,
    timings, and its tasks (the first TASKS_SHOWN of them, all counted)."""
    plan = row.plan
    shown = {name: record.task_ids[:TASKS_SHOWN] for name, record in row.stages.items()}
    counted = {name: record.task_ids for name, record in row.stages.items()}
    wanted = [t for ids in counted.values() for t in ids]
    fields = await r.fleet.store.fields(wanted, TASK_VIEW)
    stages = []
    for name in plan["order"]:
        stage, record = plan["stages"][name], row.stages[name]
        tasks = []
        for i, task_id in enumerate(shown[name]):
            values = dict(
                zip(TASK_VIEW, fields.get(task_id) or [None] * len(TASK_VIEW), strict=True)
            )
            tasks.append(
                {
                    "task_id": task_id,
                    "item": i if record.items is not None else None,
                    "status": values["status"],
                    "attempts": int(values["attempts"] or 0),
                    "worker_id": values["worker_id"] or values["last_worker_id"] or None,
                    "started_at": float(values["started_at"]) if values["started_at"] else None,
                    "finished_at": float(values["finished_at"]) if values["finished_at"] else None,
                }
            )
        counts = Counter((fields.get(t) or [None])[0] or "missing" for t in counted[name])
        stages.append(
            {
                "name": name,
                "state": record.state.value,
                "reason": record.reason or None,
                "depends_on": stage["deps"],
                "on_upstream_failure": stage["onUpstreamFailure"],
                "for_each": stage["forEach"]
                if isinstance(stage["forEach"], str)
                else (None if stage["forEach"] is None else f"{len(stage['forEach'])} item(s)"),
                "task_type": stage["taskType"],
                "released_at": record.released_at,
                "finished_at": record.finished_at,
                "inputs": record.inputs,
                "task_count": len(record.task_ids),
                "task_states": dict(counts),
                "tasks": tasks,
            }
        )
    end = row.finished_at or time.time()
    return {
        "pipeline_id": row.pipeline_id,
        "name": row.name or None,
        "labels": plan.get("labels") or {},
        "status": row.status.value,
        "params": plan.get("params") or {},
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
        "elapsed_sec": round(end - row.created_at, 3),
        "stages": stages,
    }
