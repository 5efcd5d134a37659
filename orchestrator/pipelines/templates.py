"""`${...}` templates in a stage's spec: what they may name, and their values.

A string that is one template and nothing else takes the value with its type (a list, a
number, a mapping); a template inside a longer string is written into it (a mapping or a
list as compact JSON). `$${` writes a literal `${`.

    ${params.<name>[.<path>]}      the pipeline's parameters (known at submit)
    ${item[.<path>]}  ${index}     in a forEach stage: its item, and the item's position
    ${<stage>.task_id}             the stage's task (its first one, for a forEach stage)
    ${<stage>.task_ids}            every task of the stage, in item order
    ${<stage>.status}              DONE, FAILED, CANCELLED, or SKIPPED
    ${<stage>.result.<path>}       the result of the stage's task (its only one)
    ${<stage>.results}             every task's result, in item order
    ${<stage>.results[*].<path>}   one field of each of them, in item order
    ${<stage>.results[<n>].<path>} one task's
    ${<stage>.outputs_dir}         RESULTS_DIR/<task_id> of the worker that ran it (a path
                                   other workers can read in shared-storage mode only)

A path is `.name` and `[n]` steps (`result.metrics.loss`, `results[*].responses[0].text`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

TEMPLATE = re.compile(r"\$\$\{|\$\{([^{}]*)\}")
_STEP = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\*|[0-9]+)\]")
_HEAD = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)")
STAGE_FIELDS = ("task_id", "task_ids", "status", "result", "results", "outputs_dir")


class TemplateError(ValueError):
    """A template that cannot be read, or whose value does not exist."""


@dataclass(frozen=True)
class Ref:
    """One parsed template. `scope` is 'params', 'item', 'index' or a stage's name;
    `field` (stages only) one of STAGE_FIELDS; `path` the steps after it: str keys, int
    indexes, '*' for every item."""

    text: str
    scope: str
    field: str = ""
    path: tuple[str | int, ...] = ()

    @property
    def stage(self) -> str | None:
        return None if self.scope in ("params", "item", "index") else self.scope

    @property
    def result_key(self) -> str | None:
        """The top-level result field read (`x` of `result.x` and of `results[*].x`)."""
        if self.field == "result":
            key = self.path[0] if self.path else None
        elif self.field == "results":
            key = self.path[1] if len(self.path) > 1 else None
        else:
            return None
        return key if isinstance(key, str) else None


def parse_ref(text: str) -> Ref:
    expr = text.strip()
    head = _HEAD.match(expr)
    if head is None:
        raise TemplateError(f"${{{text}}} is not a template FlowMesh reads: {_GRAMMAR}")
    scope = head.group(1)
    steps: list[str | int] = []
    pos = head.end()
    while pos < len(expr):
        step = _STEP.match(expr, pos)
        if step is None:
            raise TemplateError(
                f"${{{text}}}: cannot read {expr[pos:]!r}; a path is .name and [n] steps"
            )
        if step.group(1) is not None:
            steps.append(step.group(1))
        else:
            steps.append("*" if step.group(2) == "*" else int(step.group(2)))
        pos = step.end()
    if scope in ("params", "item", "index"):
        if scope == "index" and steps:
            raise TemplateError(f"${{{text}}}: ${{index}} is a number and has no fields")
        if scope == "params" and (not steps or not isinstance(steps[0], str)):
            raise TemplateError(f"${{{text}}}: name a parameter, as in ${{params.prompts}}")
        if "*" in steps:
            raise TemplateError(f"${{{text}}}: [*] is for a stage's results only")
        return Ref(text, scope, "", tuple(steps))
    if not steps or steps[0] not in STAGE_FIELDS:
        raise TemplateError(
            f"${{{text}}}: after the stage name comes one of {', '.join(STAGE_FIELDS)}"
        )
    field, path = str(steps[0]), tuple(steps[1:])
    if field == "results":
        if path and path[0] != "*" and not isinstance(path[0], int):
            raise TemplateError(
                f"${{{text}}}: results is a list: results[*].<field> or results[<n>].<field>"
            )
        if "*" in path[1:]:
            raise TemplateError(f"${{{text}}}: [*] only right after results")
    elif "*" in path:
        raise TemplateError(f"${{{text}}}: [*] is for a stage's results only")
    if field in ("task_id", "task_ids", "status", "outputs_dir") and path:
        raise TemplateError(f"${{{text}}}: {field} has no fields")
    return Ref(text, scope, field, path)


_GRAMMAR = (
    "use ${params.<name>}, ${item}, ${index}, or ${<stage>.<field>} with a field of "
    + ", ".join(STAGE_FIELDS)
)


def refs_in(text: str) -> list[Ref]:
    refs = []
    for m in TEMPLATE.finditer(text):
        if m.group(1) is not None:
            refs.append(parse_ref(m.group(1)))
    if "${" in TEMPLATE.sub("", text):
        raise TemplateError(f"{text!r} opens a ${{ it never closes (write $${{ for a literal ${{)")
    return refs


def walk_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, string) for every string in a spec, keys excluded."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk_strings(item, f"{path}[{i}]")


def templated_paths(spec: Any, prefix: str = "") -> dict[str, list[Ref]]:
    """Field path -> the templates in that string, for every string holding one."""
    out: dict[str, list[Ref]] = {}
    for path, text in walk_strings(spec, prefix):
        if "${" in text:
            try:
                refs = refs_in(text)
            except TemplateError as exc:
                raise TemplateError(f"{path}: {exc}") from None
            if refs:
                out[path] = refs
    return out


Lookup = Callable[[Ref], Any]
MISSING = object()
# What a partial lookup returns for a template it leaves for later.
KEEP = object()


def render(value: Any, lookup: Lookup, path: str = "", *, final: bool = True) -> Any:
    """`value` with every template replaced by `lookup(ref)`; raises TemplateError naming
    the field path. `lookup` returns MISSING (or raises TemplateError) for a value that
    does not exist. Not `final`: `lookup` may return KEEP to leave a template as it is,
    and `$${` escapes stay escaped (a later, final render writes them)."""
    if isinstance(value, str):
        return _render_string(value, lookup, path, final)
    if isinstance(value, dict):
        return {
            k: render(v, lookup, f"{path}.{k}" if path else str(k), final=final)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [render(v, lookup, f"{path}[{i}]", final=final) for i, v in enumerate(value)]
    return value


def _parse(text: str, path: str) -> Ref:
    try:
        return parse_ref(text)
    except TemplateError as exc:
        raise TemplateError(f"{path or 'value'}: {exc}") from None


def _value(ref: Ref, lookup: Lookup, path: str) -> Any:
    try:
        value = lookup(ref)
    except TemplateError as exc:
        raise TemplateError(f"{path or 'value'}: ${{{ref.text}}}: {exc}") from None
    if value is MISSING or value is None:
        what = "nothing" if value is MISSING else "null"
        raise TemplateError(f"{path or 'value'}: ${{{ref.text}}} resolved to {what}")
    return value


def _render_string(text: str, lookup: Lookup, path: str, final: bool) -> Any:
    if "$" not in text:
        return text
    matches = list(TEMPLATE.finditer(text))
    if not matches:
        return text
    whole = matches[0].span() == (0, len(text)) and matches[0].group(1) is not None
    if whole:
        value = _value(_parse(matches[0].group(1), path), lookup, path)
        return text if value is KEEP else value
    out: list[str] = []
    last = 0
    for m in matches:
        out.append(text[last : m.start()])
        if m.group(1) is None:
            out.append("${" if final else "$${")
        else:
            value = _value(_parse(m.group(1), path), lookup, path)
            if value is KEEP:
                out.append(m.group(0))
                last = m.end()
                continue
            out.append(
                value
                if isinstance(value, str)
                else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            )
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def escape(value: Any) -> Any:
    """`value` with every `${` in its strings written `$${`: a value put into a spec by a
    partial render (a parameter, at submit) must stay literal in the final render, never
    become a template of its own."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape(v) for v in value]
    return value


def unescape(value: Any) -> Any:
    """The inverse of `escape`, for a value used as it is (a forEach list's items)."""
    if isinstance(value, str):
        return value.replace("$${", "${")
    if isinstance(value, dict):
        return {k: unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape(v) for v in value]
    return value


def follow(value: Any, path: tuple[str | int, ...], what: str) -> Any:
    """The value at `path` inside `value`; MISSING-free: raises TemplateError saying
    what is there instead."""
    for i, step in enumerate(path):
        here = what + "".join(f".{s}" if isinstance(s, str) else f"[{s}]" for s in path[:i])
        if isinstance(step, str):
            if not isinstance(value, dict):
                raise TemplateError(f"{here} is {kind(value)}, not a mapping with {step!r}")
            if step not in value:
                keys = ", ".join(sorted(value)[:20]) or "nothing"
                raise TemplateError(f"{here} has no {step!r} (it has: {keys})")
            value = value[step]
        else:
            if not isinstance(value, list):
                raise TemplateError(f"{here} is {kind(value)}, not a list")
            if not -len(value) <= int(step) < len(value):
                raise TemplateError(f"{here} has {len(value)} item(s); [{step}] is past its end")
            value = value[int(step)]
    return value


def kind(value: Any) -> str:
    """What a value is, for a message: "a list", "a mapping", "a number"..."""
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )
