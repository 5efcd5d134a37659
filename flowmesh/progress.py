"""Live terminal tables until the work ends: tasks (`flowmesh submit --wait`, the demo) and
a pipeline's stages (`flowmesh submit pipeline.yaml --wait`)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from flowmesh.client import Client
from flowmesh.status import TaskStatus

STYLE = {
    "PENDING": "yellow",
    "DISPATCHED": "cyan",
    "RUNNING": "blue",
    "DONE": "green",
    "FAILED": "red",
    "CANCELLED": "magenta",
}


def _table(tasks: list[dict[str, Any]], elapsed: float) -> Table:
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    summary = "  ".join(f"[{STYLE[s]}]{s} {n}[/]" for s, n in sorted(counts.items()))
    table = Table(title=f"{len(tasks)} task(s), {elapsed:.1f}s   {summary}", title_justify="left")
    for col in ("task", "name", "type", "status", "attempts", "worker", "note"):
        table.add_column(col)
    shown = tasks if len(tasks) <= 30 else [t for t in tasks if t["status"] != "DONE"][:30]
    for t in shown:
        note = ""
        if t["status"] == "PENDING" and t.get("reason"):
            note = t["reason"]
        elif t.get("error"):
            note = f"{t['error'].get('kind')}: {t['error'].get('message')}"[:80]
        table.add_row(
            t["task_id"][:12],
            escape(t.get("name") or ""),
            t.get("task_type") or "",
            f"[{STYLE.get(t['status'], '')}]{t['status']}[/]",
            str(t.get("attempts", 0)),
            t.get("worker_id") or "",
            escape(note),  # an error message may hold "[...]"
        )
    return table


def watch(
    client: Client,
    task_ids: list[str],
    console: Console,
    timeout: float | None = None,
    interval: float = 0.3,
) -> list[dict[str, Any]]:
    """Poll until every task is DONE, FAILED or CANCELLED (or the timeout); return them."""
    start = time.monotonic()
    tasks = [client.task(t) for t in task_ids]
    with Live(
        _table(tasks, 0.0), console=console, refresh_per_second=8, transient=not console.is_terminal
    ) as live:
        while True:
            elapsed = time.monotonic() - start
            tasks = [
                t if TaskStatus(t["status"]).terminal else client.task(t["task_id"]) for t in tasks
            ]
            live.update(_table(tasks, elapsed))
            if all(TaskStatus(t["status"]).terminal for t in tasks):
                break
            if timeout is not None and elapsed > timeout:
                break
            time.sleep(interval)
    if not console.is_terminal:
        console.print(_table(tasks, time.monotonic() - start))
    return tasks


STAGE_STYLE = {
    "waiting": "yellow",
    "running": "blue",
    "done": "green",
    "failed": "red",
    "skipped": "dim",
    "cancelled": "magenta",
}


def pipeline_table(view: dict[str, Any]) -> Table:
    """A pipeline's stages: state, tasks by status, where they ran, and why."""
    status = view["status"]
    title = (
        f"pipeline {view['pipeline_id'][:12]} {escape(view.get('name') or '')}  "
        f"[{STYLE.get(status, '')}]{status}[/]  {view['elapsed_sec']:.1f}s"
    )
    table = Table(title=title, title_justify="left")
    for col in ("stage", "state", "tasks", "worker", "note"):
        table.add_column(col)
    for stage in view["stages"]:
        counts = "  ".join(f"{s} {n}" for s, n in sorted(stage["task_states"].items()))
        workers = sorted({t["worker_id"] for t in stage["tasks"] if t.get("worker_id")})
        note = stage.get("reason") or ""
        if not note and stage.get("inputs"):
            path, value = next(iter(stage["inputs"].items()))
            note = f"{path} = {value}"
        table.add_row(
            stage["name"],
            f"[{STAGE_STYLE.get(stage['state'], '')}]{stage['state']}[/]",
            counts or "-",
            escape(",".join(workers[:3]) + ("…" if len(workers) > 3 else "")),
            escape(note[:100]),  # user data: a "[/]" in it is not markup
        )
    return table


def watch_pipeline(
    client: Client,
    pipeline_id: str,
    console: Console,
    timeout: float | None = None,
    interval: float = 0.3,
) -> dict[str, Any]:
    """Poll until the pipeline has ended (or the timeout); return its last view."""
    start = time.monotonic()
    view = client.pipeline(pipeline_id)
    with Live(
        pipeline_table(view),
        console=console,
        refresh_per_second=8,
        transient=not console.is_terminal,
    ) as live:
        while view["status"] == "RUNNING":
            if timeout is not None and time.monotonic() - start > timeout:
                break
            time.sleep(interval)
            view = client.pipeline(pipeline_id)
            live.update(pipeline_table(view))
    if not console.is_terminal:
        console.print(pipeline_table(view))
    return view
