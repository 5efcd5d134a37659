"""Turning a request body into validated task specs, or errors that name the field.

A body holds one spec, a list of specs, or several YAML documents separated by
`---`. Every spec is checked before anything is stored, so a batch is accepted
whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import yaml

from executors.base import Executor
from flowmesh.spec import SpecError, TaskSpec, parse_task

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class BodyError(ValueError):
    """The body cannot be read at all (not YAML/JSON, wrong content type); HTTP 400/415."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors/aliases: an alias bomb would expand to gigabytes downstream."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise BodyError(
                f"YAML aliases are not accepted (alias *{event.anchor} at line "
                f"{event.start_mark.line + 1}); write the value out instead"
            )
        return super().compose_node(parent, index)


def decode(body: bytes, content_type: str) -> list[Any]:
    """The documents in the body; raises BodyError for unreadable input."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media not in JSON_TYPES + YAML_TYPES:
        raise BodyError(
            f"unsupported Content-Type {media!r}; use application/json or application/yaml",
            status=415,
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise BodyError("body is empty: send a task spec")
    if media in JSON_TYPES:
        try:
            docs: list[Any] = [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise BodyError(
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
    else:
        try:
            docs = [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise BodyError(f"malformed YAML{where}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise BodyError(f"malformed YAML: {exc}") from None
    if len(docs) == 1 and isinstance(docs[0], list):
        return list(docs[0])
    return docs


def validate(
    documents: list[Any],
    *,
    max_batch: int,
    known_types: Iterable[str],
    executor_of: Callable[[str], type[Executor] | None],
) -> list[TaskSpec]:
    """Every document as a TaskSpec, or SpecError listing every problem with its path."""
    if not documents:
        raise SpecError([("body", "no task spec found")])
    if len(documents) > max_batch:
        raise SpecError(
            [
                (
                    "body",
                    f"batch of {len(documents)} specs exceeds the limit of "
                    f"{max_batch} (FLOWMESH_MAX_BATCH)",
                )
            ]
        )
    allowed = sorted(set(known_types))
    batch = len(documents) > 1
    specs: list[TaskSpec] = []
    problems: list[tuple[str, str]] = []
    for i, doc in enumerate(documents):
        prefix = f"[{i}]" if batch else ""
        try:
            spec = parse_task(doc, prefix)
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        task_type = spec.spec.taskType
        where = f"{prefix}.spec" if prefix else "spec"
        if task_type not in allowed:
            problems.append(
                (
                    f"{where}.taskType",
                    f"unknown task type {task_type!r}; allowed: {', '.join(allowed)}",
                )
            )
            continue
        cls = executor_of(task_type)
        if cls is not None:
            problems.extend(cls.check_options(spec.spec, where))
            try:
                checked = cls.validate_spec(spec.spec)
            except Exception as exc:  # a plugin's check must not turn a bad spec into a 500
                checked = [("spec", f"executor {task_type!r} rejected it: {exc}")]
            for path, msg in checked:
                problems.append((f"{prefix}.{path}" if prefix else path, msg))
        specs.append(spec)
    if problems:
        raise SpecError(problems[:100])
    return specs
