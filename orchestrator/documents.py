"""Turning a request body into validated task specs, or errors that name the field.

A body holds one spec, a list of specs, or several YAML documents separated by
`---`. Every spec is checked before anything is stored, so a batch is accepted
whole or not at all.

Decoding (`decode`) also makes sure the documents are plain JSON data that can be stored
and read back unchanged: no more than MAX_DEPTH levels of nesting, strings that are valid
Unicode (no lone surrogate from a `\ud800` escape), finite numbers only (Python's JSON
reader takes `NaN`/`Infinity`, YAML has `.nan`/`.inf`), string keys given once each, and
none of YAML's other types (dates, binary, sets). Anything else is a 400 naming the path.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import yaml
from fastapi import Request
from fastapi.responses import JSONResponse
from yaml.nodes import MappingNode, ScalarNode

from executors.base import Executor
from flowmesh.spec import (
    CATALOG_TASK_TYPES,
    SpecError,
    TaskSpec,
    executor_name,
    parse_task,
    task_type_of,
)

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
# Levels of lists and mappings a document may nest (the document itself is level 1).
# A task spec needs fewer than ten; the limit keeps every later step (validation,
# storing, an executor reading it) far from Python's recursion limit.
MAX_DEPTH = 64
MAX_PROBLEMS = 20


class BodyError(ValueError):
    """The body cannot be read at all (not YAML/JSON, wrong content type) or holds
    values no spec may hold; HTTP 400/415. `problems` are (field path, message) pairs
    when the problem has a place in a document."""

    def __init__(
        self, message: str, status: int = 400, problems: list[tuple[str, str]] | None = None
    ):
        self.status = status
        self.problems = problems or []
        super().__init__(message)


class _Duplicates(dict[Any, Any]):
    """A JSON object that named a key more than once (the last value is kept)."""

    duplicates: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Duplicates(obj)
    seen: set[str] = set()
    marked.duplicates = []
    for key, _ in pairs:
        if key in seen:
            marked.duplicates.append(key)
        seen.add(key)
    return marked


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors/aliases (an alias bomb would expand to gigabytes downstream),
    without duplicate keys, and no deeper than MAX_DEPTH. PyYAML composes recursively, so
    a deeper collection is refused where it starts, before recursing into it (or scanning
    the rest of it: the scanner slows down with every open bracket)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.text = stream
        self.parts: list[Any] = []  # the path to the collection being composed
        self.depth = 0
        self.documents = 0  # documents composed that are not empty

    def compose_document(self) -> Any:
        node = super().compose_document()
        if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
            self.documents += 1
        return node

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise BodyError(
                f"YAML aliases are not accepted (alias *{event.anchor} at line "
                f"{event.start_mark.line + 1}); write the value out instead"
            )
        if not self.check_event(yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        part = index.value if isinstance(index, ScalarNode) else index
        if parent is not None:
            self.parts.append(part if isinstance(part, int | str) else "?")
        try:
            if self.depth >= MAX_DEPTH:
                raise self._too_deep(self.peek_event().start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
        finally:
            if parent is not None:
                self.parts.pop()

    def _too_deep(self, mark: Any) -> BodyError:
        # Which document: the body is a batch when another one came before or follows.
        index = self.documents
        batch = index > 0 or re.search(r"^---", self.text[mark.index :], re.M) is not None
        path = f"[{index}]" if batch else ""
        for part in self.parts:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{_path_part(part)}" if path else _path_part(part)
        path = _short(path) if path else "body"
        message = _too_deep_message(f" at {path} (line {mark.line + 1}, column {mark.column + 1})")
        return BodyError("body: " + message, problems=[(path, message)])

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: dict[Any, ScalarNode] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node)
                first = seen.setdefault(key, key_node)
                if first is not key_node:
                    mark = key_node.start_mark
                    same = (
                        f" ({first.value!a} and {key_node.value!a} are one key once read)"
                        if first.value != key_node.value
                        else ""
                    )
                    raise BodyError(
                        f"body: duplicate key {_shown(key)} at line {mark.line + 1}, column "
                        f"{mark.column + 1}{same}: give each key once (YAML would keep the last)"
                    )
        return super().construct_mapping(node, deep)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _json_too_deep(text: str) -> str:
    """Where a JSON text first nests deeper than MAX_DEPTH (read only after the JSON
    reader gave up on it: RecursionError)."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                pos = match.start()
                line = text.count("\n", 0, pos) + 1
                return f" at line {line}, column {pos - text.rfind(chr(10), 0, pos)}"
        elif token in ("]", "}"):
            depth -= 1
    return ""


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"
_TOO_DEEP_REST = f"; a spec nests {MAX_DEPTH} levels at most"


def _too_deep_message(where: str) -> str:
    return f"{_TOO_DEEP}{where}{_TOO_DEEP_REST}"


def _unreadable_value(exc: ValueError) -> BodyError:
    if "integer string conversion" in str(exc):
        limit = sys.get_int_max_str_digits()
        return BodyError(f"body: a number has more than {limit} digits; no spec needs one")
    return BodyError(f"body: a value cannot be read: {exc}")


def decode(body: bytes, content_type: str) -> list[Any]:
    """The documents in the body; raises BodyError for unreadable input and for values
    no spec may hold (see the module's docstring), naming where they are."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media not in JSON_TYPES + YAML_TYPES:
        raise BodyError(
            f"unsupported Content-Type {media!r}; use application/json or application/yaml",
            status=415,
        )
    try:
        # A byte-order mark (Windows editors add one) is not part of the document.
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise BodyError("body is empty: send a task spec")
    if media in JSON_TYPES:
        try:
            docs: list[Any] = [json.loads(text, object_pairs_hook=_json_object)]
        except json.JSONDecodeError as exc:
            raise BodyError(
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        except RecursionError:
            raise BodyError("body: " + _too_deep_message(_json_too_deep(text))) from None
        except ValueError as exc:
            raise _unreadable_value(exc) from None
    else:
        try:
            docs = [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise BodyError(f"malformed YAML{where}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise BodyError(f"malformed YAML: {exc}") from None
        except BodyError:  # an alias, a duplicate key
            raise
        except RecursionError:  # not expected past _NoAliasLoader's depth limit
            raise BodyError("body: " + _too_deep_message("")) from None
        except ValueError as exc:  # a date such as 2024-02-30, a 5000-digit number
            raise _unreadable_value(exc) from None
        except OverflowError as exc:
            raise BodyError(f"body: a value cannot be read: {exc}") from None
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            # PyYAML's constructors raise these for some explicitly tagged values
            # (`!!bool x`, `!!int ''`, `!!timestamp x`).
            raise BodyError(
                f"body: a tagged YAML value cannot be read ({type(exc).__name__}: {exc}); "
                "write it plainly, without a !!tag"
            ) from None
    # Only an escape puts a surrogate into a string read from UTF-8 text; JSON has one
    # spelling of it, YAML several (every YAML body is checked).
    strings = media not in JSON_TYPES or _SURROGATE_ESCAPE.search(text) is not None
    if len(docs) == 1 and isinstance(docs[0], list):
        # The list's items are the documents, one level down in the body.
        docs = list(docs[0])
        check_documents(docs, start_depth=2, strings=strings)
    else:
        check_documents(docs, strings=strings)
    return docs


def _shown(key: Any) -> str:
    """A key or string as it may appear in a message: quoted, surrogates escaped."""
    return ascii(key) if isinstance(key, str) else repr(key)


def _short(path: str) -> str:
    # Whole, unless keys of pathological length make it unreadable anyway.
    return path if len(path) <= 1000 else path[:1000] + "…"


def _path_part(key: str) -> str:
    # A key may hold anything; the path must still be readable and valid UTF-8.
    if re.fullmatch(r"[A-Za-z0-9_\-]+", key):
        return key
    return ascii(key)


def _unicode(text: str) -> str | int:
    """`text` as valid Unicode, or the code of its first lone surrogate. A surrogate pair
    spelt as two escapes (`\\ud83d\\ude00`, which YAML reads as two characters) is joined
    into its one character, as a JSON reader would."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        pass
    i = 0
    while i < len(text):
        code = ord(text[i])
        if 0xD800 <= code <= 0xDBFF and i + 1 < len(text) and 0xDC00 <= ord(text[i + 1]) <= 0xDFFF:
            i += 2
        elif 0xD800 <= code <= 0xDFFF:
            return code
        else:
            i += 1
    raise AssertionError("unreachable: the text did not encode")  # pragma: no cover


_YAML_TYPE_NAMES = {
    bytes: "binary value (!!binary)",
    set: "set (!!set)",
    tuple: "pair (!!omap or !!pairs)",
    datetime.datetime: "timestamp",
    datetime.date: "date",
}
_LEAVES = (bool, int, type(None))
# A chain is a value's place: (the chain of its container, its key or index); None above
# the documents. Paths are spelt out only for problems.
Chain = tuple[Any, Any] | None


def _path(chain: Chain, batch: bool) -> str:
    parts: list[Any] = []
    while chain is not None:
        chain, key = chain
        parts.append(key)
    parts.reverse()
    out = f"[{parts[0]}]" if batch and parts else ""
    for part in parts[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{_path_part(part)}" if out else _path_part(part)
    return _short(out) if out else "body"


def check_documents(documents: list[Any], start_depth: int = 1, strings: bool = True) -> None:
    """One walk over the decoded documents: depth, strings, keys, numbers and types.

    Raises BodyError naming every problem's path (at most MAX_PROBLEMS of them). Fixes in
    place only what has one meaning: a surrogate pair written as two escapes. `strings`
    False skips the string check, for a JSON text with no `\\uD800`-`\\uDFFF` escape
    (only an escape can put a surrogate in a string decoded from UTF-8)."""
    batch = len(documents) > 1
    problems: list[tuple[str, str]] = []

    def report(chain: Chain, what: str, rest: str = "") -> None:
        where = _path(chain, batch)
        problems.append((where, f"{what} at {where}{rest}"))

    def leaf(value: Any, chain: Chain) -> Any:
        """A replacement for a scalar `value`, or None; reports a bad one."""
        if isinstance(value, str):
            if strings and not value.isascii():
                fixed = _unicode(value)
                if isinstance(fixed, int):
                    report(chain, "string", _lone(fixed))
                elif fixed is not value:
                    return fixed
        elif isinstance(value, float):
            if not math.isfinite(value):
                report(
                    chain,
                    "number",
                    f" is {value}: NaN and Infinity are not accepted "
                    "(nor numbers too large for a 64-bit float)",
                )
        elif not isinstance(value, _LEAVES):
            kind = next(
                (name for t, name in _YAML_TYPE_NAMES.items() if isinstance(value, t)),
                type(value).__name__,
            )
            report(
                chain,
                "value",
                f" is a YAML {kind}; a spec holds strings, numbers, booleans, null, "
                "lists and mappings only (quote it to send a string)",
            )
        return None

    # (container, its chain, its depth); the documents sit in a list above level 1.
    stack: list[tuple[Any, Chain, int]] = [(documents, None, start_depth - 1)]
    while stack and len(problems) < MAX_PROBLEMS:
        container, chain, depth = stack.pop()
        deeper = depth + 1 > MAX_DEPTH
        if isinstance(container, dict):
            if isinstance(container, _Duplicates):
                for key in container.duplicates:
                    report(
                        chain,
                        f"duplicate key {_shown(key)}",
                        ": give each key once (JSON would keep the last)",
                    )
            renames: list[tuple[Any, str]] = []
            for key, value in container.items():
                if not isinstance(key, str):
                    report(
                        chain,
                        f"key {key!r}",
                        f" is of type {type(key).__name__}; keys must be strings "
                        "(quote it in YAML)",
                    )
                    continue
                if strings and not key.isascii():
                    fixed = _unicode(key)
                    if isinstance(fixed, int):
                        report((chain, key), "key", _lone(fixed))
                    elif fixed is not key:
                        renames.append((key, fixed))
                if isinstance(value, dict | list):
                    if deeper:
                        report((chain, key), _TOO_DEEP, _TOO_DEEP_REST)
                    else:
                        stack.append((value, (chain, key), depth + 1))
                elif (fixed_value := leaf(value, (chain, key))) is not None:
                    container[key] = fixed_value
            if renames:
                for _, new in renames:
                    if new in container:
                        report(chain, f"duplicate key {_shown(new)}")
                # Rebuilt in the order the keys were given.
                new_keys = dict(renames)
                items = [(new_keys.get(k, k), v) for k, v in container.items()]
                container.clear()
                container.update(items)
        else:
            inner: list[tuple[Any, Chain, int]] = []
            for i, value in enumerate(container):
                if isinstance(value, dict | list):
                    if deeper:
                        report((chain, i), _TOO_DEEP, _TOO_DEEP_REST)
                    else:
                        inner.append((value, (chain, i), depth + 1))
                elif (fixed_value := leaf(value, (chain, i))) is not None:
                    container[i] = fixed_value
            stack.extend(reversed(inner))  # the first item is looked at first
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"; and {more} more problem(s) like these" if more else ""
        raise BodyError("body: " + "; ".join(msg for _, msg in shown) + tail, problems=shown)


def _lone(code: int) -> str:
    return f" holds a lone surrogate (\\u{code:04x}), not valid Unicode"


def _no_executor(task_type: str, available: list[str]) -> str:
    msg = (
        f"no executor {task_type!r} is installed here or offered by any registered worker; "
        f"available: {', '.join(available) or 'none'}"
    )
    if task_type in CATALOG_TASK_TYPES:
        msg += (
            f" ({task_type!r} is a planned catalogue type: it can be submitted once its "
            "executor is installed here or a worker offers it)"
        )
    return msg


def validate(
    documents: list[Any],
    *,
    max_batch: int,
    available_types: Iterable[str],
    executor_of: Callable[[str], type[Executor] | None],
    resolve: Callable[[TaskSpec], TaskSpec] | None = None,
) -> list[TaskSpec]:
    """Every document as a TaskSpec, or SpecError listing every problem with its path.

    `available_types`: the executors installed here or offered by a worker (see
    `submit_tasks`); a taskType none of them serves is refused, catalogue types included,
    so no task waits for an executor that does not exist. `resolve` settles what a spec
    leaves to the fleet (the engine of `engine: auto`) before the executor that will run
    it checks it."""
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
    executors = set(available_types)
    allowed = sorted({task_type_of(name) for name in executors})
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
            problems.append((f"{where}.taskType", _no_executor(task_type, allowed)))
            continue
        if resolve is not None:
            spec = resolve(spec)
        name = executor_name(spec.spec)
        if name not in executors:
            problems.append((f"{where}.model.engine", _no_executor(name, sorted(executors))))
            continue
        cls = executor_of(name)
        if cls is not None:
            problems.extend(cls.check_options(spec.spec, where))
            try:
                checked = cls.validate_spec(spec.spec)
            except Exception as exc:  # a plugin's check must not turn a bad spec into a 500
                checked = [("spec", f"executor {name!r} rejected it: {exc}")]
            for path, msg in checked:
                problems.append((f"{prefix}.{path}" if prefix else path, msg))
        specs.append(spec)
    if problems:
        raise SpecError(problems[:100])
    return specs


def spec_error(exc: SpecError) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={
            "detail": str(exc),
            "errors": [{"loc": path, "msg": msg} for path, msg in exc.problems],
        },
    )


# Bodies larger than this are decoded and validated on a worker thread (read_documents).
OFFLOAD_BYTES = 1 << 20
OFFLOAD_YAML_BYTES = 32 << 10
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
Run = Callable[..., Awaitable[Any]]


async def read_documents(request: Request) -> tuple[list[Any], str | None, Run] | JSONResponse:
    """A submit request's documents and Idempotency-Key, and how to run the checks that
    follow (`await run(fn, *args)`), or the error reply.

    Reading and checking megabytes of specs takes long enough to run off the event loop,
    so the scheduler and other requests carry on meanwhile. A smaller body is checked in
    place: in a thread it would hold the GIL against the loop's many short steps (each then
    waits up to the 5 ms switch interval), which cost 15 % of throughput at 500 specs per
    request. YAML is read by a pure-Python parser (~80 us per spec): any YAML body of some
    size goes to a thread."""
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    yaml_body = "json" not in content_type
    offload = len(body) > (OFFLOAD_YAML_BYTES if yaml_body else OFFLOAD_BYTES)

    async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if offload:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    try:
        docs = await run(decode, body, content_type)
    except BodyError as exc:
        content: dict[str, Any] = {"detail": str(exc)}
        if exc.problems:
            content["errors"] = [{"loc": path, "msg": msg} for path, msg in exc.problems]
        return JSONResponse(status_code=exc.status, content=content)
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        return JSONResponse(
            status_code=422,
            content={"detail": "Idempotency-Key header: 1-200 letters, digits and -_.: only"},
        )
    return docs, key, run
