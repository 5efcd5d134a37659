"""The pipeline document: stages (or a graph of nodes) over a base task spec.

```yaml
apiVersion: flowmesh/v1
kind: Pipeline
metadata: {name: lora-then-serve}
spec:
  params: {base_model: /models/tiny}      # defaults; `${params.base_model}` in any stage
  waitTimeoutSec: 86400                   # default deadline for a stage's upstream stages
  model: {source: {identifier: "${params.base_model}"}}   # the base spec, under every stage
  stages:                                 # each depends on the previous one, unless
    - name: train                         #   it says `dependsOn` (or: spec.graph.nodes)
      spec: {taskType: lora_sft, ...}
    - name: serve
      spec:
        taskType: inference
        model: {lora: {identifier: "${train.result.final_lora_archive_url}"}}
```

This module checks the document's own fields (names, dependencies, policies) and
nothing of the stages' task specs: those are deep-merged over the base and validated as
task specs by the orchestrator (`orchestrator.pipelines.planner`), which also reads the
templates.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from flowmesh.spec import Float, Metadata, SpecError, StrictModel, field_path

# Stage names appear in templates (`${train.result.x}`) and in task names.
STAGE_NAME = r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$"
MAX_STAGES = 1000
# Tasks one forEach stage may become.
MAX_ITEMS = 10_000
DEFAULT_WAIT_SEC = 7 * 86_400.0

StageName = Annotated[str, Field(pattern=STAGE_NAME)]


def _one_or_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# Names templates read as something else (`${params.x}`, `${item}`, `${index}`).
RESERVED_NAMES = frozenset({"params", "item", "index"})


def _not_reserved(name: str) -> str:
    if name in RESERVED_NAMES:
        raise ValueError(
            f"{name!r} cannot name a stage: ${{{name}...}} means something else in templates"
        )
    return name


class Stage(StrictModel):
    name: Annotated[StageName, AfterValidator(_not_reserved)]
    dependsOn: Annotated[list[StageName] | None, BeforeValidator(_one_or_list)] = Field(
        None,
        max_length=MAX_STAGES,
        description="Stages this one waits for; default: the previous stage in `stages` "
        "(none in `graph.nodes`). Stages its templates read are waited for too.",
    )
    forEach: list[Any] | str | None = Field(
        None,
        description="One task per item: a list, or a template giving one "
        "(`${params.prompts}`, `${split.result.items}`); `${item}` and `${index}` in the spec",
    )
    onUpstreamFailure: Literal["fail", "skip", "run"] = Field(
        "fail",
        description="When an upstream stage failed: fail this one too (default), skip it, "
        "or run it anyway",
    )
    waitTimeoutSec: Float | None = Field(
        None, gt=0, le=30 * 86_400, description="Deadline for the upstream stages, from submit"
    )
    metadata: Metadata = Field(default_factory=Metadata)
    spec: dict[str, Any] = Field(default_factory=dict, description="Deep-merged over the base")


class Graph(StrictModel):
    nodes: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)


class PipelineBody(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    stages: list[Stage] | None = Field(None, min_length=1, max_length=MAX_STAGES)
    graph: Graph | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    waitTimeoutSec: Float = Field(DEFAULT_WAIT_SEC, gt=0, le=30 * 86_400)


class PipelineDoc(StrictModel):
    apiVersion: Literal["flowmesh/v1"] = "flowmesh/v1"
    kind: Literal["Pipeline"] = "Pipeline"
    metadata: Metadata = Field(default_factory=Metadata)
    spec: PipelineBody


def is_pipeline(document: Any) -> bool:
    """A document is a pipeline when it says `kind: Pipeline` or has stages or a graph."""
    if not isinstance(document, dict):
        return False
    spec = document.get("spec")
    return document.get("kind") == "Pipeline" or (
        isinstance(spec, dict) and ("stages" in spec or "graph" in spec)
    )


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`: mappings merge key by key, anything else
    (lists included) in `over` replaces what `base` has."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Pipeline:
    """A parsed pipeline: its stages in submission order, each with its dependencies
    made explicit, and the base spec."""

    def __init__(self, doc: PipelineDoc):
        self.doc = doc
        body = doc.spec
        self.name = doc.metadata.name or ""
        self.params = dict(body.params)
        self.base = {k: v for k, v in (body.model_extra or {}).items()}
        self.wait_sec = body.waitTimeoutSec
        chain = body.stages is not None
        nodes = body.stages if body.stages is not None else body.graph.nodes if body.graph else []
        self.stages: list[Stage] = list(nodes)
        self.where = "spec.stages" if chain else "spec.graph.nodes"
        self.deps: dict[str, list[str]] = {}
        for i, stage in enumerate(self.stages):
            if stage.dependsOn is not None:
                self.deps[stage.name] = list(dict.fromkeys(stage.dependsOn))
            else:
                self.deps[stage.name] = [self.stages[i - 1].name] if chain and i else []

    def stage_path(self, index: int) -> str:
        return f"{self.where}[{index}]"


def parse_pipeline(document: Any) -> Pipeline:
    """Validate a pipeline's own fields and its graph: stage names unique, every
    `dependsOn` known, no cycle, exactly one of `stages` or `graph`. Raises SpecError
    naming the field path."""
    try:
        doc = PipelineDoc.model_validate(document)
    except ValidationError as exc:
        raise SpecError(
            [
                (
                    field_path(
                        tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p)), ""
                    ),
                    e["msg"],
                )
                for e in exc.errors(include_url=False)
            ]
        ) from None
    body = doc.spec
    if (body.stages is None) == (body.graph is None):
        raise SpecError([("spec", "a pipeline has either spec.stages or spec.graph.nodes")])
    pipeline = Pipeline(doc)
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, stage in enumerate(pipeline.stages):
        if stage.name in seen:
            problems.append(
                (
                    f"{pipeline.stage_path(i)}.name",
                    f"stage name {stage.name!r} is used twice "
                    f"(also {pipeline.stage_path(seen[stage.name])})",
                )
            )
        seen.setdefault(stage.name, i)
    for i, stage in enumerate(pipeline.stages):
        for dep in pipeline.deps[stage.name]:
            if dep not in seen:
                problems.append(
                    (
                        f"{pipeline.stage_path(i)}.dependsOn",
                        f"stage {stage.name!r} depends on {dep!r}, which is not a stage of this "
                        f"pipeline (stages: {', '.join(seen)})",
                    )
                )
            elif dep == stage.name:
                problems.append(
                    (
                        f"{pipeline.stage_path(i)}.dependsOn",
                        f"stage {stage.name!r} depends on itself",
                    )
                )
    if problems:
        raise SpecError(problems)
    return pipeline


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A cycle in the dependency graph, as the stages along it (first repeated last),
    or None. Iterative: a chain of MAX_STAGES stages must not meet Python's recursion limit."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    for root in deps:
        if root in state:
            continue
        path: list[str] = [root]
        todo: list[list[str]] = [list(deps.get(root, ()))]
        state[root] = 1
        while path:
            if not todo[-1]:
                state[path.pop()] = 2
                todo.pop()
                continue
            dep = todo[-1].pop()
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                state[dep] = 1
                path.append(dep)
                todo.append(list(deps.get(dep, ())))
    return None


def topological(deps: dict[str, list[str]], order: list[str]) -> list[str]:
    """The stages ordered so that each comes after its dependencies (ties: `order`)."""
    out: list[str] = []
    placed: set[str] = set()
    remaining = list(order)
    while remaining:
        progress = False
        for name in list(remaining):
            if all(d in placed for d in deps.get(name, ())):
                out.append(name)
                placed.add(name)
                remaining.remove(name)
                progress = True
        if not progress:  # a cycle; find_cycle reports it first
            return out + remaining
    return out
