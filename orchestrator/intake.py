"""Intake: from decoded documents to task specs the fleet can run, checked against what
is installed here and what the registered workers offer. The submit route and the
pipeline runner (a stage's spec once its templates are resolved) both go through it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from executors.base import Executor
from executors.registry import entry_points_by_name, load
from flowmesh import workers
from flowmesh.spec import INFERENCE_EXECUTORS, SpecError, TaskSpec, executor_name
from orchestrator.documents import validate
from orchestrator.fleet import Fleet
from orchestrator.merge import MergeKeys, merge_keys

log = logging.getLogger(__name__)
T = TypeVar("T")
VLLM_EXECUTOR = INFERENCE_EXECUTORS["vllm"]


@functools.cache
def executor_class(task_type: str) -> type[Executor] | None:
    """The executor class installed here (for its options model and checks), or None
    when it is a plugin only workers have: then its section is validated on the worker.
    Cached per process, like the entry points it reads."""
    if task_type not in entry_points_by_name():
        return None
    try:
        return load(task_type)
    except Exception as exc:  # a broken plugin: its workers check its sections instead
        log.warning("executor %s: cannot load it here to validate its specs: %s", task_type, exc)
        return None


def available_types(f: Fleet) -> set[str]:
    """The task types a submitted spec may name: an executor installed where the
    orchestrator runs (its `flowmesh.executors` entry points) or offered by a registered
    worker (as the scheduler last read the fleet).

    Why not the catalogue (CATALOG_TASK_TYPES) too: a type no executor exists for would be
    stored and stay PENDING forever, accepted-then-ignored. So `sft` is refused, with a
    hint that it is planned, until its executor ships. A type installed here but offered
    by no worker yet is accepted: a worker with it may join, and meanwhile the task's
    `reason` says that no registered worker can run it."""
    available = set(entry_points_by_name())
    for view in f.scheduler.workers.values():
        available |= view.executors
    return available


def settle_engine(f: Fleet) -> Callable[[TaskSpec], TaskSpec]:
    """`spec.model.engine: auto`, settled into the stored spec: `vllm` when a registered
    worker offers the vLLM executor (it offers it only where vLLM is installed and runs),
    else `transformers`. The stored spec, shown in the task's status, names the engine."""
    offered = any(VLLM_EXECUTOR in view.executors for view in f.scheduler.workers.values())
    engine = "vllm" if offered else "transformers"

    def settle(spec: TaskSpec) -> TaskSpec:
        body = spec.spec
        if body.taskType != "inference" or body.model is None or body.model.engine != "auto":
            return spec
        model = body.model.model_copy(update={"engine": engine})
        return spec.model_copy(update={"spec": body.model_copy(update={"model": model})})

    return settle


async def registered_types(f: Fleet) -> set[str]:
    """The executors offered by the workers whose heartbeat is alive in Redis now, read
    there rather than from the scheduler's view: a worker that registered since placement
    last read the fleet counts too."""
    return {
        name
        for record, pttl, _ in await workers.read_all(f.conn, f.keys)
        if pttl > 0
        for name in record.executors
    }


def checker(
    f: Fleet, max_batch: int, also_offered: frozenset[str] | set[str] = frozenset()
) -> Callable[[list[Any]], list[TaskSpec]]:
    """A check of decoded documents against the fleet as it is now: each document as a
    task spec ready to store (its engine settled), or SpecError. What it needs of the
    fleet is read here, so the check itself may run on another thread. `also_offered`:
    task types to accept beyond those (see `registered_types`)."""
    return functools.partial(
        validate,
        max_batch=max_batch,
        available_types=available_types(f) | also_offered,
        executor_of=executor_class,
        resolve=settle_engine(f),
    )


async def checked(
    f: Fleet,
    max_batch: int,
    attempt: Callable[[Callable[[list[Any]], list[TaskSpec]]], Awaitable[T]],
) -> T:
    """`attempt(check)`; if it raises SpecError, once more with the task types of the
    workers live in Redis now (`registered_types`), since the scheduler's view lags a
    worker that has just registered. The second SpecError is the caller's to report.
    The hot path (a valid spec) reads nothing more than the view."""
    try:
        return await attempt(checker(f, max_batch))
    except SpecError:
        return await attempt(checker(f, max_batch, await registered_types(f)))


def merge_keys_of(specs: list[TaskSpec]) -> list[MergeKeys]:
    return [merge_keys(spec, executor_class(executor_name(spec.spec))) for spec in specs]
