"""The task spec (YAML or JSON), validated with pydantic; errors name the field path.

Field names follow the design contract: camelCase at the spec's top level
(`taskType`, `timeoutSec`, `maxAttempts`), snake_case inside executor sections
(`inference.max_tokens`). Unknown fields are rejected, never silently ignored.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.types import AllowInfNan
from pydantic_core import PydanticCustomError

# Task types the design contract names: the catalogue FlowMesh plans executors for.
# Naming a type here does not make it submittable: the orchestrator accepts a taskType
# only when an executor for it exists (installed where the orchestrator runs, or offered
# by a registered worker), so a task never waits forever for an executor nobody wrote.
# Submitting a catalogue type without one is refused with a hint that it is planned.
CATALOG_TASK_TYPES = (
    "echo",
    "inference",
    "sft",
    "lora_sft",
    "dpo",
    "ppo",
    "rag",
    "agent",
    "vl_grounding",
    "video",
)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
    "p": 10**15,
    "pb": 10**15,
    "pi": 2**50,
    "pib": 2**50,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# The largest size a spec or a setting may name: more than any machine has, small enough
# that every size is an exact integer in a float and in any JSON reader.
MAX_BYTES = 2**50
MAX_BYTES_TEXT = f"1Pi ({MAX_BYTES} bytes)"


def parse_bytes(value: Any) -> Any:
    """'16Gi', '80GB', '512Mi' or a plain number of bytes -> int bytes, at most 1Pi."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16Gi, 80GB or a number of bytes")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a size; use e.g. 16Gi, 80GB or a number of bytes")
    if isinstance(value, int | float):
        size = int(value)  # an int of any length: compared below, never made a float
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not (match and match.group(2).lower() in _UNITS):
            raise ValueError(
                f"cannot read {value!r} as a size; use e.g. 16Gi, 80GB, 512Mi or a number of bytes"
            )
        size = int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        return value
    if size > MAX_BYTES:
        shown = repr(value) if len(repr(value)) <= 40 else f"a {len(str(size))}-digit number"
        raise ValueError(f"{shown} is more than the largest size accepted, {MAX_BYTES_TEXT}")
    return size


Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]


def _no_bool(value: Any) -> Any:
    # Python's bool is an int: without this, `priority: true` would be stored as 1.
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number",
            "Input should be a number, not the boolean {value}",
            {"value": str(value).lower()},
        )
    return value


def _finite(value: Any) -> Any:
    value = _no_bool(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError(
            "finite_number", "Input should be a finite number, not {value}", {"value": value}
        )
    return value


# Numbers as numbers only: no booleans, no numeric strings ("5"), no 2.0 for an integer;
# floats also refuse NaN and Infinity.
Int = Annotated[int, BeforeValidator(_no_bool), Strict()]
Float = Annotated[float, BeforeValidator(_finite), Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]


def _not_yet(what: str) -> PydanticCustomError:
    return PydanticCustomError("not_supported", "not supported yet: {what}", {"what": what})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuRequest(StrictModel):
    count: Int = Field(0, ge=0, le=64)
    type: str | None = Field(None, description="Substring of the GPU name, e.g. H100")
    memory: Bytes | None = Field(None, description="VRAM per GPU, e.g. 40Gi")

    @model_validator(mode="after")
    def _needs_a_count(self) -> GpuRequest:
        # A type or memory with no GPU asked for would be ignored by placement.
        if self.count == 0 and (self.type is not None or self.memory is not None):
            raise ValueError("gpu.type and gpu.memory need gpu.count of 1 or more")
        return self


class HardwareRequest(StrictModel):
    cpu: Float | None = Field(None, ge=0, le=4096, description="CPU cores")
    memory: Bytes | None = Field(None, description="RAM, e.g. 16Gi")
    gpu: GpuRequest = Field(default_factory=GpuRequest)


class Resources(StrictModel):
    replicas: Int = Field(1, ge=1, le=1, description="Only 1 is supported for now")
    hardware: HardwareRequest = Field(default_factory=HardwareRequest)
    tags: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=64
    )


class ModelSource(StrictModel):
    identifier: str = Field(min_length=1, max_length=1024, description="Hub id or local path")
    revision: str | None = Field(None, min_length=1, max_length=255)


class LoraSource(StrictModel):
    """A LoRA adapter served on top of `spec.model` by the same engine."""

    identifier: str = Field(
        min_length=1, max_length=2048, description="Local adapter directory, or an http(s) URL"
    )
    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")


ENGINES = ("auto", "transformers", "vllm")


class ModelSpec(StrictModel):
    source: ModelSource
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: Bool = False
    # Which engine runs an `inference` task. `auto` is settled at submit, into the stored
    # spec: vllm when some registered worker offers it, else transformers.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    # vLLM engine arguments (max_model_len, gpu_memory_utilization, ...): checked at
    # submit by the vLLM executor's own model; refused by the other engines.
    vllm: dict[str, Any] = Field(default_factory=dict, description="vLLM engine options")
    lora: LoraSource | None = None


SHA256 = r"^[0-9a-f]{64}$"


def _http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("expected an http:// or https:// URL")
    return value


class DataSpec(StrictModel):
    """A task's data: `items` inline (`type: list`), a local JSONL or Parquet file, a local
    dataset directory (`datasets.save_to_disk`, or files `load_dataset` reads), or a URL of
    such a file or of a .tar.gz archive (from the orchestrator or an allowed host)."""

    type: Literal["list", "jsonl", "parquet", "dataset", "url"] = "list"
    items: list[Any] = Field(default_factory=list, max_length=100_000)
    path: str | None = Field(None, min_length=1, max_length=4096)
    url: str | None = Field(None, min_length=1, max_length=2048)
    sha256: str | None = Field(None, pattern=SHA256, description="Checked after download")

    _url = field_validator("url")(_http_url)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        wants = {"list": "items", "url": "url"}.get(self.type, "path")
        given = [n for n in ("items", "path", "url") if getattr(self, n)]
        if self.type != "list" and wants not in given:
            raise ValueError(f"data.type {self.type!r} needs data.{wants}")
        extra = [n for n in given if n != wants]
        if extra:
            raise ValueError(
                f"data.type {self.type!r} reads data.{wants} only; remove data.{extra[0]}"
            )
        if self.sha256 is not None and self.type != "url":
            raise ValueError("data.sha256 checks a download: it needs data.type 'url'")
        return self


class OutputDestination(StrictModel):
    """Where a task's archives go. `local`: they stay on the worker under
    RESULTS_DIR/<task_id>/artifacts/ (on a shared mount, the result's absolute paths are
    readable everywhere). `http`: the worker also uploads them to the orchestrator at
    ORCHESTRATOR_BASE_URL, and the result carries their download URLs."""

    type: Literal["local", "http"] = "local"
    path: str | None = None
    url: str | None = None

    @field_validator("path", "url")
    @classmethod
    def _no_target(cls, value: str | None) -> str | None:
        if value is not None:
            raise _not_yet(
                "an upload goes to the orchestrator the worker is configured with "
                "(ORCHESTRATOR_BASE_URL), never to a URL or path a spec names; "
                "use type: http or type: local"
            )
        return value


class OutputSpec(StrictModel):
    destination: OutputDestination = Field(default_factory=OutputDestination)
    artifacts: list[str] = Field(
        default_factory=list, description="Reserved for choosing artifacts; must be empty now"
    )

    @field_validator("artifacts")
    @classmethod
    def _no_selection(cls, value: list[str]) -> list[str]:
        if value:
            raise _not_yet(
                "every file an executor writes under its artifacts directory is kept, and "
                "final_model/ and final_lora/ are archived"
            )
        return value


class CheckpointLoad(StrictModel):
    """Weights to start from: a model or LoRA directory, or a .tar.gz archive of one (a
    path, or a URL such as an earlier task's `final_lora_archive_url`)."""

    identifier: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(None, pattern=SHA256, description="Checked after download")


class CheckpointSpec(StrictModel):
    load: CheckpointLoad


class TaskBody(BaseModel):
    """The fields every task has. Each executor owns one more section, `spec.<section>`
    (`spec.echo`, `spec.inference`, `spec.training`, ...), declared by its options model:
    such a section passes this model as an extra field and is validated against the
    executor's model at submit (`orchestrator.documents`); any other unknown field is an
    error there."""

    model_config = ConfigDict(extra="allow", frozen=True)

    taskType: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$")
    resources: Resources = Field(default_factory=Resources)
    model: ModelSpec | None = None
    data: DataSpec | None = None
    output: OutputSpec | None = None
    checkpoint: CheckpointSpec | None = None
    priority: Int = Field(0, ge=-1000, le=1000)
    timeoutSec: Float | None = Field(None, gt=0, le=7 * 86_400)
    maxAttempts: Int = Field(3, ge=1, le=100, description="Real failures allowed before FAILED")
    retryBackoffSec: Float = Field(
        1.0, ge=0, le=3600, description="First retry delay; doubles per failure, capped at 300 s"
    )
    merge: Bool | None = Field(
        None,
        description="Run with compatible pending tasks in one delivery, identical ones once "
        "(default: on for executors that merge, such as inference; false opts out)",
    )


class Metadata(StrictModel):
    name: str | None = Field(None, max_length=253)
    # Kubernetes' limits: keys up to 63 characters (253 with a prefix), values up to 63.
    labels: dict[
        Annotated[str, Field(min_length=1, max_length=253)],
        Annotated[str, Field(max_length=63)],
    ] = Field(default_factory=dict, max_length=64)


class TaskSpec(StrictModel):
    apiVersion: Literal["flowmesh/v1"] = "flowmesh/v1"
    kind: Literal["Task"] = "Task"
    metadata: Metadata = Field(default_factory=Metadata)
    spec: TaskBody


class SpecError(ValueError):
    """A spec that cannot be accepted; `problems` are (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" if path else msg for path, msg in problems))


def field_path(loc: tuple[Any, ...], prefix: str) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_task(document: Any, prefix: str = "") -> TaskSpec:
    """Validate one decoded YAML/JSON document; raise SpecError naming each bad field."""
    if not isinstance(document, dict):
        where = prefix or "body"
        raise SpecError([(where, f"expected a task spec object, got {type(document).__name__}")])
    try:
        return TaskSpec.model_validate(document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            problems.append((field_path(loc, prefix), err["msg"]))
        raise SpecError(problems) from None


# -- what the scheduler needs of a spec -------------------------------------------------

# The executor that runs `taskType: inference` on each engine.
INFERENCE_EXECUTORS = {"transformers": "inference", "vllm": "vllm", "auto": "inference"}


def task_type_of(executor: str) -> str:
    """The taskType an executor serves: its name, but `inference` for an engine's."""
    return "inference" if executor in INFERENCE_EXECUTORS.values() else executor


def executor_name(body: TaskBody) -> str:
    """The executor a task needs: its taskType, but for `inference` the one of its engine
    (`auto` is settled at submit; a stored spec names its engine)."""
    if body.taskType == "inference" and body.model is not None:
        return INFERENCE_EXECUTORS[body.model.engine]
    return body.taskType


class Requirements(BaseModel):
    """The placement-relevant part of a spec; hashable, so equal needs share one queue."""

    model_config = ConfigDict(frozen=True)

    executor: str
    cpu: float = 0.0
    memory: int = 0
    gpu_count: int = 0
    gpu_type: str | None = None
    gpu_memory: int = 0
    tags: tuple[str, ...] = ()
    model: str | None = None
    # Its archives go to the orchestrator (output.destination.type: http): only a worker
    # with ORCHESTRATOR_BASE_URL can run it.
    uploads: bool = False

    @property
    def reserves_nothing(self) -> bool:
        """No CPU, RAM or GPU held while it runs: it may wait in a worker's inbox (prefetch)
        without holding anything another task needs."""
        return not (self.cpu or self.memory or self.gpu_count)

    @classmethod
    def of(cls, body: TaskBody) -> Requirements:
        hw = body.resources.hardware
        return cls(
            executor=executor_name(body),
            cpu=hw.cpu or 0.0,
            memory=hw.memory or 0,
            gpu_count=hw.gpu.count,
            gpu_type=hw.gpu.type,
            gpu_memory=hw.gpu.memory or 0,
            tags=tuple(sorted(set(body.resources.tags))),
            model=body.model.source.identifier if body.model else None,
            uploads=body.output is not None and body.output.destination.type == "http",
        )
