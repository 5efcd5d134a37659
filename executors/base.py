"""The executor interface: what a third party implements to add a kind of work.

An executor is a class with a handful of methods: `setup(config)` once per process,
`run(task)` (a thread per task) or `async arun(task)` (awaited side by side on the
child's event loop, so an engine such as vLLM batches concurrent tasks itself),
`health()` and `close()`. It declares, as class attributes:

- `options`: a pydantic model for its own part of the spec, `spec.<section>` (the
  section is `name` unless `section` says otherwise). The orchestrator validates a
  submitted spec against it, so importing the executor's module must stay light:
  heavy imports go inside methods.
- `isolation`: `"shared"` (one warm child process serves every task, models stay loaded)
  or `"task"` (a fresh process per task, whose memory goes back to the system after it).
- `max_concurrency`: tasks one child runs at once (threads for `run`, coroutines for
  `arun`).

A minimal plugin, registered in its package's pyproject under
`[project.entry-points."flowmesh.executors"]`:

    class ShoutOptions(BaseModel):
        text: str

    class Shout(Executor):
        name = "shout"
        options = ShoutOptions
        def run(self, task):
            return {"text": task.options.text.upper()}

Executors get their settings in `setup(config)` and read no environment.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, ValidationError

from flowmesh.spec import TaskBody, TaskSpec, field_path

Isolation = Literal["shared", "task"]


# Result fields the worker adds to any executor's: `executed_by`, on the result of a task
# that an identical one ran for (task merge).
WORKER_RESULT_FIELDS = frozenset({"executed_by"})
# What an `inference` engine's result has, on either engine (`lora`: with an adapter;
# `engine`, `timings`: vLLM's).
INFERENCE_RESULT_FIELDS = frozenset(
    {
        "model",
        "engine",
        "device",
        "dtype",
        "responses",
        "usage",
        "elapsed_sec",
        "load_sec",
        "warm",
        "cancelled",
        "timings",
        "lora",
    }
)
# What publishing a run's final_model/ or final_lora/ adds (worker/artifacts/publish.py).
ARTIFACT_RESULT_FIELDS = frozenset(
    f"{final}_{suffix}"
    for final in ("final_model", "final_lora")
    for suffix in ("path", "archive_path", "archive_sha256", "archive_size", "archive_url")
) | {"archives"}


class ExecutorError(Exception):
    """A task failed inside its executor. `kind` is recorded with the failure."""

    kind: ClassVar[str] = "executor_error"
    retryable: ClassVar[bool] = True


class RetryableError(ExecutorError):
    """Worth another attempt (a transient resource or network problem)."""


class PermanentError(ExecutorError):
    """Can never succeed as specified (a model path that does not exist, bad data)."""

    kind = "permanent"
    retryable = False


class MissingExtra(ExecutorError):
    """The executor's optional dependencies are not installed; names the extra to install."""

    kind = "missing_extra"
    retryable = False

    def __init__(self, executor: str, modules: list[str], extra: str | None):
        hint = f"uv sync --extra {extra}" if extra else "install " + ", ".join(modules)
        super().__init__(
            f"executor {executor!r} needs {', '.join(modules)} (not installed): run `{hint}`"
        )


@dataclass(frozen=True)
class ExecutorConfig:
    """What the worker tells an executor's process once, at `setup`.

    `devices`: the CUDA ordinals this process may use (its CUDA_VISIBLE_DEVICES is set to
    the GPUs they stand for before the executor is imported); empty on a CPU-only worker.
    """

    worker_id: str
    devices: tuple[int, ...] = ()
    max_warm_models: int = 2


class Checkpoints:
    """A task's training checkpoints across attempts (`TaskContext.checkpoints`).

    The worker gives an executor one that finds the newest checkpoint an earlier attempt
    left (on this worker's disk, or uploaded to the orchestrator when the task's output
    goes there over HTTP) and uploads each new one in the background. This default keeps
    nothing: every attempt starts from step 0.
    """

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory an earlier attempt left, made local
        (downloaded and extracted when it was uploaded); None when there is none."""
        return None

    def saved(self, path: Path) -> None:
        """A checkpoint directory was just written completely: keep it for a later attempt
        (archive and upload it in the background when the destination is HTTP)."""

    def flush(self) -> None:
        """Wait for the uploads `saved` started (the run succeeded)."""

    def discard(self) -> None:
        """The run failed or was stopped: drop the uploads not yet started, wait for none."""


def source_error(exc: BaseException, what: str) -> ExecutorError:
    """A source that could not be had (`TaskContext.resolve` raised): worth another attempt
    when the cause was the network or a server error (`exc.retryable`), else never (a host
    not allowed, a wrong sha256, an unsafe archive, nothing there)."""
    error = RetryableError if getattr(exc, "retryable", False) else PermanentError
    return error(f"{what}: {exc}")


def _local_source(source: str, sha256: str | None = None) -> Path:
    return Path(source)


def _no_report(fields: dict[str, Any]) -> None:
    return None


@dataclass
class TaskContext:
    """What an executor gets for one attempt of one task.

    `work_dir` is this attempt's own directory: files the executor writes under
    `artifacts_dir` become the task's `artifacts/` when the attempt is the one that counts.
    `devices` are the CUDA ordinals (in this process) assigned to the task; nobody else
    holds them while it runs, unless its executor shares devices between its tasks.
    """

    task_id: str
    attempt: int
    spec: TaskSpec
    work_dir: Path
    options: Any = None
    devices: tuple[int, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.getLogger("executors")
    )
    # Live progress for the task's status (step, total, loss, ...): `progress(**fields)`.
    report: Callable[[dict[str, Any]], None] = _no_report
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    # A model, adapter or data source as a local path: a directory or file as given, or an
    # archive (path or URL from an allowed host) downloaded, checked and extracted safely
    # into the worker's cache. `resolve(source, sha256=None) -> Path`.
    resolve: Callable[..., Path] = _local_source

    def progress(self, **fields: Any) -> None:
        """Report progress (JSON values); the worker shows the latest in the task's status."""
        self.report(fields)

    @property
    def checkpoints_dir(self) -> Path:
        """Where this attempt writes checkpoints (kept beside, not in, its artifacts)."""
        return self.work_dir / "checkpoints"

    @property
    def body(self) -> TaskBody:
        return self.spec.spec

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir / "artifacts"


class Executor(ABC):
    name: ClassVar[str]
    # Import names the executor needs beyond FlowMesh's own dependencies, and the
    # extra that installs them; checked before the executor is offered to the fleet.
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    # The model of `spec.<section>`; None: the executor takes no options of its own.
    options: ClassVar[type[BaseModel] | None] = None
    section: ClassVar[str | None] = None
    isolation: ClassVar[Isolation] = "shared"
    # How many tasks one child process runs at once.
    max_concurrency: ClassVar[int] = 1
    # Tasks of this executor may share the GPUs they were given (a batching engine that
    # holds one model for all of them); otherwise every GPU is given whole to one task.
    shares_devices: ClassVar[bool] = False
    # Task merge (docs/architecture.md): pending tasks whose specs differ only in their
    # `data` are sent to one worker in one delivery, and identical requests run once, their
    # result given to every requester. On by default for an executor that sets `merges`
    # (a batching engine gains from it); `spec.merge` decides per task.
    merges: ClassVar[bool] = False
    # Whether it reads `spec.model`; one that does not refuses a spec that sets it (the
    # scheduler would also prefer workers with that model warm, for nothing).
    takes_model: ClassVar[bool] = True
    # Whether it reads `spec.checkpoint.load` (weights to start from); one that does not
    # refuses a spec that sets it.
    takes_checkpoint: ClassVar[bool] = False
    # The top-level fields of the result `run` returns, for pipelines to check a template
    # such as `${train.result.final_lora_archive_url}` at submit; None: not declared (a
    # plugin's), so templates reading its result are checked only when they resolve.
    result_fields: ClassVar[frozenset[str] | None] = None

    @classmethod
    def options_section(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def is_async(cls) -> bool:
        return cls.arun is not Executor.arun

    @classmethod
    def missing(cls) -> MissingExtra | None:
        """Why this executor cannot run here, or None when it can."""
        absent = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        return MissingExtra(cls.name, absent, cls.extra) if absent else None

    @classmethod
    def check_options(cls, body: TaskBody, where: str = "spec") -> list[tuple[str, str]]:
        """The executor's own section against its options model, and any field the core
        spec does not know as an error naming the section the executor does take."""
        return cls._options(body, where)[1]

    @classmethod
    def parse_options(cls, body: TaskBody) -> Any:
        """`spec.<section>` as the executor's options model (None without a model);
        PermanentError naming every bad field."""
        options, problems = cls._options(body, "spec")
        if problems:
            raise PermanentError("; ".join(f"{path}: {msg}" for path, msg in problems))
        return options

    @classmethod
    def _options(cls, body: TaskBody, where: str) -> tuple[Any, list[tuple[str, str]]]:
        """The parsed options (validated once) and every problem with the spec's sections."""
        problems: list[tuple[str, str]] = []
        section = cls.options_section() if cls.options is not None else None
        extra = body.model_extra or {}
        for key in extra:
            if key != section:
                hint = (
                    f"executor {cls.name!r} takes its options under {where}.{section}"
                    if section
                    else f"executor {cls.name!r} takes no options section"
                )
                problems.append((f"{where}.{key}", f"Extra inputs are not permitted: {hint}"))
        if body.model is not None and not cls.takes_model:
            problems.append((f"{where}.model", f"executor {cls.name!r} takes no model"))
        if body.checkpoint is not None and not cls.takes_checkpoint:
            problems.append((f"{where}.checkpoint", f"executor {cls.name!r} loads no checkpoint"))
        if section is None or cls.options is None:
            return None, problems
        raw = extra.get(section)
        here = f"{where}.{section}"
        options = None
        try:
            options = cls.options.model_validate(raw if raw is not None else {})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                problems.append((field_path(err["loc"], here), err["msg"]))
        except Exception as exc:  # a plugin's own validator raising something else
            problems.append((here, f"{type(exc).__name__}: {exc}"))
        if raw is not None:
            # pydantic ignores unknown keys by default, at every level; a spec's never are.
            seen = {path for path, _ in problems}
            problems += [p for p in unknown_fields(cls.options, raw, here) if p[0] not in seen]
        return options, problems

    @classmethod
    def validate_spec(cls, body: TaskBody) -> list[tuple[str, str]]:
        """Problems with a spec this executor would get beyond its options model, as
        (field path, message): rules that span sections (a model and prompts both given).

        Runs in the orchestrator at submit time, without the executor's heavy
        dependencies, so a spec that can never run is rejected before it is stored.
        """
        return []

    @classmethod
    def deterministic(cls, body: TaskBody, options: Any) -> bool:
        """Whether two tasks with this spec give the same result, so that identical ones may
        be run once (greedy decoding or a fixed seed, say). Only asked of a task with merge
        on; the default, False, merges such tasks into one delivery but runs each."""
        return False

    def setup(self, config: ExecutorConfig) -> None:
        """Called once in the child process before the first task."""

    def run(self, task: TaskContext) -> dict[str, Any]:
        """Do the work; return a JSON-serialisable result. Raise ExecutorError to fail."""
        raise NotImplementedError(f"executor {self.name!r} implements neither run nor arun")

    async def arun(self, task: TaskContext) -> dict[str, Any]:
        """`run` for executors that await: concurrent tasks are awaited side by side on
        the child's event loop. Cancelling the task (cancel, timeout) cancels this
        coroutine; the executor aborts just that task and stays loaded."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        """Reported with heartbeats; `loaded_models` is used by the scheduler, and
        `model_loads` (how many models this instance has loaded, a count that only grows)
        becomes the orchestrator's `flowmesh_model_loads_total`."""
        return {}

    def close(self) -> None:
        """Release what `setup` and `run` acquired."""


def unknown_fields(model: type[BaseModel], raw: Any, path: str) -> list[tuple[str, str]]:
    """Keys of `raw` that `model` (and the models nested in it) would silently ignore.
    Models that forbid extra keys report them themselves; models that allow them, allow."""
    extra_rule = model.model_config.get("extra")
    if not isinstance(raw, dict) or extra_rule == "allow":
        return []
    names, nested = _field_names(model), _nested_fields(model)
    problems: list[tuple[str, str]] = []
    for key, value in raw.items():
        if key in nested:
            problems += _nested_unknown(nested[key], value, f"{path}.{key}")
        elif key not in names and extra_rule != "forbid":
            problems.append((f"{path}.{key}", "Extra inputs are not permitted"))
    return problems


@functools.cache
def _field_names(model: type[BaseModel]) -> dict[str, Any]:
    """Every key `model` takes (names and validation aliases), with its annotation."""
    names: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        names[name] = info.annotation
        aliases: list[Any] = [info.alias, info.validation_alias]
        if isinstance(info.validation_alias, AliasChoices):
            aliases += info.validation_alias.choices
        names.update({a: info.annotation for a in aliases if isinstance(a, str)})
    return names


@functools.cache
def _nested_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The keys of `model` whose values may hold a model to look into: the walk skips the
    rest (a spec is checked again in the child, per task, so this is on the hot path)."""
    return {key: ann for key, ann in _field_names(model).items() if _holds_model(ann)}


def _holds_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(a) for a in get_args(annotation))


def _nested_unknown(annotation: Any, value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_fields(annotation, value, path)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set, frozenset) and isinstance(value, list | tuple) and args:
        return [p for i, v in enumerate(value) for p in _nested_unknown(args[0], v, f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [p for k, v in value.items() for p in _nested_unknown(args[1], v, f"{path}.{k}")]
    if origin in (Union, UnionType):
        options = [a for a in args if a is not type(None)]
        models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1 and isinstance(value, dict):
            return unknown_fields(models[0], value, path)
        if len(options) == 1:
            return _nested_unknown(options[0], value, path)
    return []
