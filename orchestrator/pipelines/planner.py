"""Submit-time checks of a pipeline, and the plan stored with it.

Everything that can be known at submit is checked here, so that a pipeline that would
fail for a typo fails before anything is stored (422, naming the stage and field path):
the graph (names, `dependsOn`, cycles), every template (its grammar, the stage it names,
`${params.*}` given, `${item}` only under forEach, and a result field the named stage's
executor can produce), and each stage's task spec, deep-merged over the base with the
parameters written in (and a forEach's first known item), validated like a submitted
task. A field that still holds an upstream template can only be checked when it
resolves: the runner validates the resolved spec again at release.

The plan (JSON, stored in the pipeline hash) holds the parameters, the base spec (once),
the stages in an order that puts each after its dependencies, and per stage: its
dependencies (those it names and those its templates read), policy, deadline, forEach,
taskType, metadata and its own spec, with the parameters written in and upstream
templates left in place; `stage_document` merges a stage's task document at release.
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
    TEMPLATE,
    Ref,
    TemplateError,
    escape,
    follow,
    kind,
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
    specs: dict[str, dict[str, Any]] = {}  # each stage's own spec, parameters written in
    metadata: dict[str, dict[str, Any]] = {}
    for_each: dict[str, Any] = {}
    refs_of: dict[str, dict[str, list[Ref]]] = {}
    task_types: dict[str, Any] = {}

    def params_only(ref: Ref) -> Any:
        if ref.scope != "params":
            return KEEP
        name = str(ref.path[0])
        if name not in params:
            given = ", ".join(sorted(params)) or "none"
            raise TemplateError(f"no parameter {name!r} (given: {given})")
        return escape(follow(params[name], ref.path[1:], f"params.{name}"))

    try:
        base = render(pipeline.base, params_only, "spec", final=False)
    except TemplateError as exc:
        raise SpecError([("spec", str(exc))]) from None
    for i, stage in enumerate(pipeline.stages):
        where = pipeline.stage_path(i)
        meta = stage.metadata.model_dump(exclude_none=True)
        meta.setdefault("name", escape(f"{pipeline.name or 'pipeline'}.{stage.name}"))
        try:
            own = render(stage.spec, params_only, "spec", final=False)
            meta = render(meta, params_only, "metadata", final=False)
            items = render(stage.forEach, params_only, "forEach", final=False)
            doc = _document(meta, base, own)
            refs = templated_paths(doc)
            if isinstance(items, str):
                refs["forEach"] = templated_paths(items, "forEach").get("forEach", [])
        except TemplateError as exc:
            problems.append((where, f"stage {stage.name!r}: {exc}"))
            continue
        problem = _for_each_problem(items, refs.get("forEach"))
        if problem:
            problems.append((f"{where}.forEach", f"stage {stage.name!r}: {problem}"))
            continue
        task_type = doc["spec"].get("taskType")
        if isinstance(task_type, str) and "${" in task_type:
            problems.append(
                (
                    f"{where}.spec.taskType",
                    f"stage {stage.name!r}: taskType cannot be a template: the executor "
                    "that runs a stage is known at submit",
                )
            )
            continue
        specs[stage.name], metadata[stage.name] = own, meta
        for_each[stage.name], refs_of[stage.name] = items, refs
        task_types[stage.name] = task_type
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
        refs, where = refs_of[name], pipeline.stage_path(i)
        problems += _check_fields(refs, task_types, name, where, result_fields)
        doc = _document(metadata[name], base, specs[name])
        problems += _check_spec(doc, refs, for_each[name], check, name, where)
        sources = sorted(
            {r.stage for rs in refs.values() for r in rs if r.stage and _reads_files(r)},
            key=index.__getitem__,
        )
        stages[name] = {
            "deps": sorted(deps[name], key=index.__getitem__),
            "forEach": for_each[name],
            "onUpstreamFailure": stage.onUpstreamFailure,
            "waitTimeoutSec": stage.waitTimeoutSec or pipeline.wait_sec,
            "metadata": metadata[name],
            "spec": specs[name],
            "taskType": task_types[name],
            "sources": sources,
        }
    if problems:
        raise SpecError(problems)
    return {
        "name": pipeline.name,
        "labels": pipeline.doc.metadata.labels,
        "params": params,
        "base": base,
        "order": topological(deps, names),
        "stages": stages,
    }


def stage_document(plan: dict[str, Any], name: str) -> dict[str, Any]:
    """A stage's task document as planned: its own spec deep-merged over the base (kept
    once in the plan, however many stages), upstream templates still in."""
    stage = plan["stages"][name]
    return _document(stage["metadata"], plan["base"], stage["spec"])


def _document(
    metadata: dict[str, Any], base: dict[str, Any], own: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "flowmesh/v1",
        "kind": "Task",
        "metadata": metadata,
        "spec": deep_merge(base, own),
    }


def _for_each_problem(items: Any, refs: list[Ref] | None) -> str | None:
    if items is None:
        return None
    if isinstance(items, str):
        if refs and len(refs) == 1 and items.startswith("${") and items.endswith("}"):
            return None
        return (
            "forEach is a list, or one template giving a list (${params.x}, "
            f"${{stage.result.x}}); got {items!r}"
        )
    if not isinstance(items, list):
        return f"forEach is a list, or one template giving a list; got {kind(items)}"
    if len(items) > MAX_ITEMS:
        return f"forEach has {len(items)} items; at most {MAX_ITEMS}"
    inside = templated_paths(items, "forEach")
    if inside:
        path, found = next(iter(inside.items()))
        return (
            f"{path}: ${{{found[0].text}}}: a forEach list's items are used as they are; only "
            "${params.*} is written into them (write $${ for a literal ${)"
        )
    return None


def _reads_files(ref: Ref) -> bool:
    """Whether a template reads where a stage's files are (an archive's URL or path, its
    outputs directory): the worker that ran that stage has them on its disk."""
    if ref.field == "outputs_dir":
        return True
    key = ref.result_key
    return key is not None and key.endswith(("_url", "_path", "_dir"))


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
    task_types: dict[str, Any],
    stage: str,
    where: str,
    result_fields: ResultFields,
) -> list[tuple[str, str]]:
    """A result field the named stage's executor never produces: refused now."""
    problems = []
    for path, refs_here in refs.items():
        for ref in refs_here:
            key = ref.result_key
            task_type = task_types.get(ref.stage or "")
            if key is None or not isinstance(task_type, str):
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
    """The stage's task spec validated now, with its first item when the items are known.
    A field that holds an upstream template (or an item not known yet) is checked at
    release: one that is nothing but the template is left out of this check (a list or a
    number cannot be a template string, and its error would hide every other check), and
    problems found at such fields are not reported."""
    known = isinstance(items, list) and bool(items)
    if known:
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
    later = {
        path
        for path, found in refs.items()
        if path != "forEach" and any(r.stage or not known for r in found)
    }
    try:
        check([_without(doc, later)])
    except SpecError as exc:
        return [
            (f"{where} ({stage})" if not path else f"{where}.{path}", f"stage {stage!r}: {msg}")
            for path, msg in exc.problems
            if not any(_related(path, p) for p in later)
        ]
    return []


def _without(value: Any, paths: set[str], path: str = "") -> Any:
    """`value` without the mapping entries at `paths` that hold a template and nothing else
    (in lists of mappings too)."""
    if isinstance(value, list):
        return [_without(v, paths, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        here = f"{path}.{key}" if path else str(key)
        if here in paths and isinstance(item, str) and TEMPLATE.fullmatch(item):
            continue
        out[key] = _without(item, paths, here)
    return out


def _related(problem: str, templated: str) -> bool:
    """Whether a problem's path is a templated field, inside one, or one's parent."""
    for a, b in ((problem, templated), (templated, problem)):
        if a == b or b.startswith(a + ".") or b.startswith(a + "["):
            return True
    return False
