"""Releasing a stage: its templates resolved against the upstream stages' tasks, and the
workers that hold its inputs. Pure functions of what the runner read from Redis."""

from __future__ import annotations

import json
from typing import Any

from flowmesh.pipeline import MAX_ITEMS
from flowmesh.pipeline_store import PipelineRow
from flowmesh.status import TaskStatus
from orchestrator.pipelines.templates import (
    MISSING,
    Ref,
    TemplateError,
    follow,
    render,
    unescape,
    walk_strings,
)

# An input recorded in the stage's record is cut to this many characters of JSON.
INPUT_SHOWN = 2000


def resolve(
    row: PipelineRow,
    stage: dict[str, Any],
    document: dict[str, Any],
    refs: dict[str, list[Ref]],
    values: dict[str, list[dict]],
    outputs_dirs: dict[str, str],
) -> tuple[list[dict[str, Any]], dict[str, Any], list[Any] | None]:
    """The stage's task documents (one per item), its inputs as resolved for the
    record, and its items (None without forEach)."""

    def lookup(ref: Ref, item: Any = MISSING, index: int = 0) -> Any:
        if ref.scope == "item":
            return follow(item, ref.path, "item")
        if ref.scope == "index":
            return index
        stage_name = ref.stage or ""
        record = row.stages[stage_name]
        tasks = values.get(stage_name, [])
        if ref.field == "status":
            return record.state.value.upper()
        if ref.field == "task_ids":
            return list(record.task_ids)
        if not record.task_ids:
            raise TemplateError(f"stage {stage_name} ran no task ({record.state.value})")
        if ref.field == "task_id":
            return record.task_ids[0]
        if ref.field == "outputs_dir":
            if stage_name not in outputs_dirs:
                raise TemplateError(
                    f"the worker that ran stage {stage_name} is no longer registered, "
                    "so where its outputs are is not known"
                )
            return outputs_dirs[stage_name]
        results = [t.get("result") for t in tasks]
        if ref.field == "result":
            if len(results) != 1:
                raise TemplateError(
                    f"stage {stage_name} has {len(results)} tasks: use "
                    f"${{{stage_name}.results[*]...}}"
                )
            if tasks[0].get("status") != TaskStatus.DONE.value:
                raise TemplateError(f"stage {stage_name} has no result: it is {record.state.value}")
            return follow(results[0], ref.path, f"stage {stage_name}'s result")
        if not ref.path:
            return results
        if ref.path[0] == "*":
            return [
                follow(r, ref.path[1:], f"stage {stage_name}'s results[{i}]")
                for i, r in enumerate(results)
            ]
        n = int(ref.path[0])
        if not -len(results) <= n < len(results):
            raise TemplateError(f"stage {stage_name} has {len(results)} result(s)")
        return follow(results[n], ref.path[1:], f"stage {stage_name}'s results[{n}]")

    items = stage["forEach"]
    if isinstance(items, list):
        items = unescape(items)  # as the user gave them: escaped for the partial render
    elif isinstance(items, str):
        items = render(items, lookup, "forEach")
        if not isinstance(items, list):
            raise TemplateError(
                f"forEach: {stage['forEach']} gave {type(items).__name__}, not a list"
            )
        if len(items) > MAX_ITEMS:
            raise TemplateError(f"forEach: {len(items)} items; at most {MAX_ITEMS}")
    if items is None:
        docs = [render(document, lookup)]
        first: tuple[Any, int] | None = (MISSING, 0)
    else:
        docs = [
            render(document, lambda r, it=it, i=i: lookup(r, it, i))  # type: ignore[misc]
            for i, it in enumerate(items)
        ]
        first = (items[0], 0) if items else None
    inputs: dict[str, Any] = {}
    if first is not None:
        for path, text in walk_strings(document):
            if path in refs:
                value = render(text, lambda r: lookup(r, *first), path)
                shown = json.dumps(value, ensure_ascii=False)
                inputs[path] = value if len(shown) <= INPUT_SHOWN else shown[:INPUT_SHOWN] + "…"
    return docs, inputs, items


def locality(stage: dict[str, Any], values: dict[str, list[dict]]) -> tuple[frozenset[str], str]:
    """Workers that ran the stages whose results this one reads (their outputs are
    on those workers' disks and in their download caches), and why."""
    workers: set[str] = set()
    sources = []
    for name in stage.get("sources", ()):
        ran = {t.get("last_worker_id") for t in values.get(name, []) if t.get("last_worker_id")}
        if ran:
            workers |= ran  # type: ignore[arg-type]
            sources.append(name)
    if not workers:
        return frozenset(), ""
    return frozenset(workers), f"holds the outputs of stage {', '.join(sources)}"
