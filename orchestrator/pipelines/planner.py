"""Submit-time checks of a pipeline, and the plan stored with it.

Everything that can be known at submit is checked here, so that a pipeline that would
fail for a typo fails before anything is stored (422, naming the stage and field path):
the graph (names, `dependsOn`, cycles), every template (its grammar, the stage it names,
`${params.*}` given, `${item}` only under forEach, and a result field the named stage's
executor can produce), and each stage's task spec, deep-merged over the base with the
parameters written in (and a forEach's first known item), validated like a submitted
task. A field that still holds an upstream template can only be checked when it
resolves: the runner validates the resolved spec again at release.

The plan (JSON, stored in the pipeline hash) holds per stage: its dependencies (the
explicit ones and the stages its templates read), policy, deadline, forEach, and the
task document with the parameters written in and the upstream templates left in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from executors.base import WORKER_RESULT_FIELDS
from flowmesh.pipeline import (
    MAX_ITEMS,
    deep_merge,
    find_cycle,
    parse_pipeline,
    topological,
)
from flowmesh.spec import SpecError, TaskSpec
from orchestrator.pipelines.templates import (
    KEEP,
    Ref,
    TemplateError,
    escape,
    follow,
    render,
    templated_paths,
    unescape,
)

Check = Callable[[list[Any]], list[TaskSpec]]
ResultFields = Callable[[str], frozenset[str] | None]


def plan_pipeline(document: Any, *, check: Check, result_fields: ResultFields) -> dict[str, Any]:
    """The plan of a pipeline document, or SpecError naming every problem found."""
    pipeline = parse_pipeline(document)
    params = pipeline.params
    problems: list[tuple[str, str]] = []
    names = [s.name for s in pipeline.stages]
    index = {name: i for i, name in enumerate(names)}
    deps = {name: list(d) for name, d in pipeline.deps.items()}
    docs: dict[str, dict[str, Any]] = {}
    for_each: dict[str, Any] = {}
    refs_of: dict[str, dict[str, list[Ref]]] = {}

    def params_only(ref: Ref) -> Any:
        if ref.scope != "params":
            return KEEP
        name = str(ref.path[0])
        if name not in params:
            given = ", ".join(sorted(params)) or "none"
            raise TemplateError(f"no parameter {name!r} (given: {given})")
        return escape(follow(params[name], ref.path[1:], f"params.{name}"))

    for i, stage in enumerate(pipeline.stages):
        where = pipeline.stage_path(i)
        metadata = stage.metadata.model_dump(exclude_none=True)
        metadata.setdefault("name", f"{pipeline.name or 'pipeline'}.{stage.name}")
        doc = {
            "apiVersion": "flowmesh/v1",
            "kind": "Task",
            "metadata": metadata,
            "spec": deep_merge(pipeline.base, stage.spec),
        }
        try:
            doc = render(doc, params_only, final=False)
            items = render(stage.forEach, params_only, "forEach", final=False)
            refs = templated_paths(doc)
            if isinstance(items, str):
                refs["forEach"] = templated_paths(items, "forEach").get("forEach", [])
        except TemplateError as exc:
            problems.append((where, f"stage {stage.name!r}: {exc}"))
            continue
        if isinstance(items, str) and not (
            refs["forEach"] and items.startswith("${") and items.endswith("}")
        ):
            problems.append(
                (
                    f"{where}.forEach",
                    f"stage {stage.name!r}: forEach is a list, or one template giving a list "
                    f"(${{params.x}}, ${{stage.result.x}}); got {items!r}",
                )
            )
            continue
        if isinstance(items, list) and len(items) > MAX_ITEMS:
            problems.append(
                (
                    f"{where}.forEach",
                    f"stage {stage.name!r}: forEach has {len(items)} items; at most {MAX_ITEMS}",
                )
            )
            continue
        docs[stage.name], for_each[stage.name], refs_of[stage.name] = doc, items, refs
        for path, refs_here in refs.items():
            for ref in refs_here:
                problem = _check_ref(ref, stage.name, stage.forEach is not None, path, index)
                if problem:
                    problems.append((f"{where}.{path}", f"stage {stage.name!r}: {problem}"))
                elif ref.stage and ref.stage not in deps[stage.name]:
                    deps[stage.name].append(ref.stage)  # a stage whose output it reads
    if problems:
        raise SpecError(problems)
    cycle = find_cycle(deps)
    if cycle:
        at = index[cycle[0]]
        raise SpecError(
            [
                (
                    f"{pipeline.stage_path(at)}.dependsOn",
                    "the stages depend on each other in a cycle: "
                    + " -> ".join(cycle)
                    + " (each waits for the next; templates count as dependencies)",
                )
            ]
        )
    stages: dict[str, Any] = {}
    for i, stage in enumerate(pipeline.stages):
        name = stage.name
        doc, refs = docs[name], refs_of[name]
        problems += _check_fields(refs, docs, name, pipeline.stage_path(i), result_fields)
        problems += _check_spec(doc, refs, for_each[name], check, name, pipeline.stage_path(i))
        sources = sorted(
            {r.stage for rs in refs.values() for r in rs if r.stage and _reads_files(r)},
            key=index.__getitem__,
        )
        stages[name] = {
            "index": i,
            "deps": sorted(deps[name], key=index.__getitem__),
            "forEach": for_each[name],
            "onUpstreamFailure": stage.onUpstreamFailure,
            "waitTimeoutSec": stage.waitTimeoutSec or pipeline.wait_sec,
            "document": doc,
            "templated": bool(refs),
            "sources": sources,
        }
    if problems:
        raise SpecError(problems)
    return {
        "name": pipeline.name,
        "labels": pipeline.doc.metadata.labels,
        "params": params,
        "order": topological(deps, names),
        "stages": stages,
    }


def _reads_files(ref: Ref) -> bool:
    """Whether a template reads where a stage's files are (an archive's URL or path, its
    outputs directory): the worker that ran that stage has them on its disk."""
    if ref.field == "outputs_dir":
        return True
    if ref.field == "result":
        key = ref.path[0] if ref.path else None
    elif ref.field == "results":
        key = ref.path[1] if len(ref.path) > 1 else None
    else:
        return False
    return isinstance(key, str) and key.endswith(("_url", "_path", "_dir"))


def _check_ref(
    ref: Ref, stage: str, has_items: bool, path: str, index: dict[str, int]
) -> str | None:
    if ref.scope in ("item", "index"):
        if not has_items:
            return f"{path}: ${{{ref.text}}} is only defined in a stage with forEach"
        if path == "forEach":
            return f"forEach: ${{{ref.text}}} cannot give the items it is defined by"
        return None
    if ref.stage is None:
        return None
    if ref.stage not in index:
        return (
            f"{path}: ${{{ref.text}}} names stage {ref.stage!r}, which is not a stage of this "
            f"pipeline (stages: {', '.join(index)})"
        )
    if ref.stage == stage:
        return f"{path}: ${{{ref.text}}}: a stage cannot read its own outputs"
    return None


def _check_fields(
    refs: dict[str, list[Ref]],
    docs: dict[str, dict[str, Any]],
    stage: str,
    where: str,
    result_fields: ResultFields,
) -> list[tuple[str, str]]:
    """A result field the named stage's executor never produces: refused now."""
    problems = []
    for path, refs_here in refs.items():
        for ref in refs_here:
            if not (ref.stage and ref.needs_result):
                continue
            if ref.field == "result":
                key = ref.path[0] if ref.path else None
            else:
                key = ref.path[1] if len(ref.path) > 1 else None
            task_type = docs[ref.stage]["spec"].get("taskType")
            if not isinstance(key, str) or not isinstance(task_type, str):
                continue
            fields = result_fields(task_type)
            if fields is None or key in fields or key in WORKER_RESULT_FIELDS:
                continue
            problems.append(
                (
                    f"{where}.{path}",
                    f"stage {stage!r}: ${{{ref.text}}}: a {task_type} task's result has no "
                    f"field {key!r} (it has: {', '.join(sorted(fields))})",
                )
            )
    return problems


def _check_spec(
    doc: dict[str, Any],
    refs: dict[str, list[Ref]],
    items: Any,
    check: Check,
    stage: str,
    where: str,
) -> list[tuple[str, str]]:
    """The stage's task spec validated now, with its first item when the items are known;
    problems at fields that hold an upstream template are left for release."""
    if isinstance(items, list) and items:
        first = unescape(items[0])

        def first_item(ref: Ref) -> Any:
            if ref.scope == "item":
                return escape(follow(first, ref.path, "item"))
            if ref.scope == "index":
                return 0
            return KEEP

        try:
            doc = render(doc, first_item, final=False)
        except TemplateError as exc:
            return [(where, f"stage {stage!r} (item 0): {exc}")]
    task_type = doc["spec"].get("taskType")
    if isinstance(task_type, str) and "${" in task_type:
        return [(f"{where}.spec.taskType", f"stage {stage!r}: taskType cannot be a template")]
    later = [p for p in refs if p != "forEach"]
    try:
        check([doc])
    except SpecError as exc:
        return [
            (f"{where} ({stage})" if not path else f"{where}.{path}", f"stage {stage!r}: {msg}")
            for path, msg in exc.problems
            if not any(_related(path, p) for p in later)
        ]
    return []


def _related(problem: str, templated: str) -> bool:
    """Whether a problem's path is a templated field, inside one, or one's parent."""
    for a, b in ((problem, templated), (templated, problem)):
        if a == b or b.startswith(a + ".") or b.startswith(a + "["):
            return True
    return False
