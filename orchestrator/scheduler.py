"""Placement: which worker runs which pending task. Pure, in memory, no I/O.

Hard filters: the worker offers the executor, has the tags, has the hardware
(GPU count/type/VRAM, CPU, RAM), is alive and taking work, its executor for the
task is ready (not starting, not failed), and it has a free slot.
Soft score among those: model already loaded (warm) > holds the task's input (a
pipeline stage's upstream artifact, `QueueEntry.prefer`) > lower load > lower cost.
Queue order: priority, then age. Tasks with equal requirements share one queue,
so one check decides for all of them and a blocked kind never holds up another.

Warm routing: a worker counts as warm for a model it reports loaded or loading, or
that the scheduler sent it in the last ASSIGNED_TTL seconds (its heartbeat may not say
so yet). While some worker is warm for a task's model but full, the task waits for it
rather than load a second copy elsewhere, unless the backlog for that model exceeds
SPILL_ROUNDS times the warm workers' slots: then a cold worker loads it too.

Task merge (orchestrator.merge): when a task with a merge key is placed, queued tasks
with the same key and requirements join it, up to MERGE_MAX and the worker's free
slots, as one delivery (`Placement.parent`). A task identical to one already placed
goes to the worker running it, which runs it once for both.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flowmesh.spec import Requirements
from flowmesh.status import ExecutorState, WorkerStatus
from flowmesh.store import QueueEntry
from flowmesh.workers import MERGE_PROTOCOL, ExecutorStatus, WorkerRecord

TAKING_WORK = frozenset({WorkerStatus.IDLE.value, WorkerStatus.BUSY.value})
# Children of one merged delivery, at most.
MERGE_MAX = 64
# A model placed on a worker counts as warm there this long, heartbeat or not.
ASSIGNED_TTL = 60.0
# Backlog per warm slot beyond which a cold worker loads a model that is warm elsewhere.
SPILL_ROUNDS = 2
# Longest a task waits for a warm worker that stays full while a cold one could start it.
WARM_WAIT_SEC = 30.0

# A worker's soft score (WorkerView.rank): warm, local, load, cost, id; lower is better.
Rank = tuple[int, int, float, float, str]


@dataclass(frozen=True)
class GpuView:
    name: str
    memory_total: int


@dataclass
class WorkerView:
    worker_id: str
    inbox: str
    executors: frozenset[str]
    tags: frozenset[str]
    cpu: float
    memory: int
    gpus: tuple[GpuView, ...]
    slots: int
    status: str
    alive: bool
    # Beyond its slots, tasks that reserve nothing may wait in its inbox this far: a freed
    # slot is refilled from there without a round trip through the orchestrator.
    prefetch: int = 0
    cost_per_hour: float = 1.0
    loaded_models: frozenset[str] = frozenset()
    loading_models: frozenset[str] = frozenset()
    # Models the scheduler sent here lately (see ASSIGNED_TTL), which it may be loading.
    assigned_models: set[str] = field(default_factory=set)
    heartbeat_interval: float = 30.0
    # Executors tasks may be placed for now; None: every executor offered.
    ready: frozenset[str] | None = None
    executor_states: dict[str, ExecutorStatus] = field(default_factory=dict)
    running: int = 0
    used_cpu: float = 0.0
    used_memory: int = 0
    used_gpus: int = 0
    # Bumped on every change of load, so heap entries made before it can be told stale.
    version: int = 0
    # Reads merged deliveries (`merge_children`); a worker of an older version does not.
    takes_merged: bool = True
    # Can upload archives to the orchestrator (it has ORCHESTRATOR_BASE_URL).
    uploads: bool = False
    # Taken out of placement by the orchestrator (API, elastic scaling): registered, warm,
    # beating, and given no task until enabled.
    disabled: bool = False

    @classmethod
    def from_record(cls, record: WorkerRecord, alive: bool) -> WorkerView:
        hw: dict[str, Any] = record.hardware
        return cls(
            worker_id=record.worker_id,
            inbox=record.inbox,
            executors=frozenset(record.executors),
            tags=frozenset(record.tags),
            cpu=float(hw.get("cpu_count", 0)),
            memory=int(hw.get("memory_total", 0)),
            gpus=tuple(GpuView(g["name"], int(g["memory_total"])) for g in hw.get("gpus", [])),
            slots=record.slots,
            prefetch=record.prefetch,
            status=record.status,
            alive=alive,
            cost_per_hour=record.cost_per_hour,
            loaded_models=frozenset(record.loaded_models),
            loading_models=frozenset(record.loading_models),
            heartbeat_interval=record.heartbeat_interval,
            ready=record.ready_executors,
            executor_states=record.executor_states,
            takes_merged=record.protocol >= MERGE_PROTOCOL,
            uploads=bool(record.artifacts.get("orchestrator")),
            disabled=record.disabled,
        )

    def executor_ready(self, name: str) -> bool:
        return self.ready is None or name in self.ready

    def executor_failed(self, name: str) -> bool:
        status = self.executor_states.get(name)
        return status is not None and status.state is ExecutorState.FAILED

    def matching_gpus(self, req: Requirements) -> int:
        kind = (req.gpu_type or "").lower()
        return sum(
            1 for g in self.gpus if kind in g.name.lower() and g.memory_total >= req.gpu_memory
        )

    def why_never(self, req: Requirements) -> str | None:
        """Why this worker can never run `req` (whatever its load), or None."""
        if req.executor not in self.executors:
            return f"lacks executor {req.executor!r}"
        missing = [t for t in req.tags if t not in self.tags]
        if missing:
            return f"lacks tag(s) {', '.join(missing)}"
        if req.uploads and not self.uploads:
            return "has no ORCHESTRATOR_BASE_URL to upload to (output.destination.type http)"
        if req.gpu_count and self.matching_gpus(req) < req.gpu_count:
            what = f"{req.gpu_count} GPU(s)"
            if req.gpu_type:
                what += f" of type {req.gpu_type}"
            if req.gpu_memory:
                what += f" with {req.gpu_memory / 2**30:.0f} GiB"
            return f"has fewer than {what}"
        if req.cpu > self.cpu:
            return f"has {self.cpu:g} CPUs < {req.cpu:g}"
        if req.memory > self.memory:
            return f"has {self.memory / 2**30:.1f} GiB RAM < {req.memory / 2**30:.1f} GiB"
        return None

    @property
    def taking_work(self) -> bool:
        return self.alive and self.status in TAKING_WORK and not self.disabled

    def fits_now(self, req: Requirements) -> bool:
        return (
            self.taking_work
            and self.executor_ready(req.executor)
            and self.running < self.slots + (self.prefetch if req.reserves_nothing else 0)
            and self.used_cpu + req.cpu <= self.cpu
            and self.used_memory + req.memory <= self.memory
            and self.used_gpus + req.gpu_count <= self.matching_gpus(req)
        )

    def warm(self, model: str | None) -> bool:
        return bool(model) and (
            model in self.loaded_models
            or model in self.loading_models
            or model in self.assigned_models
        )

    def rank(
        self, req: Requirements, warm_routing: bool = True, prefer: frozenset[str] = frozenset()
    ) -> Rank:
        """Soft score, lower is better: warm model, then holds the task's input (is in
        `prefer`), then load, then cost."""
        warm = 0 if warm_routing and self.warm(req.model) else 1
        local = 0 if self.worker_id in prefer else 1
        return (warm, local, self.running / self.slots, self.cost_per_hour, self.worker_id)

    def take(self, req: Requirements) -> None:
        self.version += 1
        self.running += 1
        self.used_cpu += req.cpu
        self.used_memory += req.memory
        self.used_gpus += req.gpu_count

    def give_back(self, req: Requirements) -> None:
        self.version += 1
        self.running = max(0, self.running - 1)
        self.used_cpu = max(0.0, self.used_cpu - req.cpu)
        self.used_memory = max(0, self.used_memory - req.memory)
        self.used_gpus = max(0, self.used_gpus - req.gpu_count)


@dataclass(frozen=True)
class Placement:
    task_id: str
    worker_id: str
    inbox: str
    entry: QueueEntry
    # The task whose delivery carries this one (merged); itself when it is not merged.
    parent: str = ""
    # Why this worker was preferred (`QueueEntry.prefer_why`) when it holds the task's
    # input; "" when it was chosen on other merits.
    why: str = ""


@dataclass
class Scheduler:
    workers: dict[str, WorkerView] = field(default_factory=dict)
    # pending task -> its queue entry; the heaps may hold stale entries, skipped when met
    pending: dict[str, QueueEntry] = field(default_factory=dict)
    queues: dict[Requirements, list[tuple[float, str]]] = field(default_factory=dict)
    # tasks waiting out a retry backoff: (not before, task id)
    delayed: list[tuple[float, str]] = field(default_factory=list)
    # placed task -> (worker, requirements): what each worker's resources are used by
    active: dict[str, tuple[str, Requirements]] = field(default_factory=dict)
    _candidates: dict[Requirements, list[WorkerView]] = field(default_factory=dict)
    # Per requirements: a heap of (rank, version, worker) over its candidates, and the
    # candidates parked because they had no room; a worker that frees room is un-parked.
    _heaps: dict[Requirements, list[tuple[Rank, int, str]]] = field(default_factory=dict)
    _parked: dict[Requirements, set[str]] = field(default_factory=dict)
    _groups_of: dict[str, set[Requirements]] = field(default_factory=dict)
    # Warm routing on (WARM_ROUTING); off ranks workers by load and cost alone.
    warm_routing: bool = True
    # Queued tasks with a merge key, in arrival order, per (requirements, merge key).
    _mergeable: dict[tuple[Requirements, str], dict[str, None]] = field(default_factory=dict)
    _queued: Counter[Requirements] = field(default_factory=Counter)
    # Queued tasks per identity, so that twins travel in one delivery and run once.
    _twins: dict[str, dict[str, None]] = field(default_factory=dict)
    # Placed tasks with an identity: where each identity runs, to send its twins there.
    _identity_of: dict[str, tuple[str, str]] = field(default_factory=dict)  # task: (id, worker)
    _identity_at: dict[str, Counter[str]] = field(default_factory=dict)
    # worker -> model -> when the scheduler last placed a task for it there (monotonic).
    _assigned: dict[str, dict[str, float]] = field(default_factory=dict)
    # requirements -> since when its tasks wait for a full warm worker (monotonic).
    _warm_wait: dict[Requirements, float] = field(default_factory=dict)

    # -- workers -----------------------------------------------------------------
    def set_workers(self, views: list[WorkerView], running: dict[str, int]) -> None:
        """Replace the fleet snapshot; usage is recomputed from the active tasks."""
        self.workers = {v.worker_id: v for v in views}
        horizon = time.monotonic() - ASSIGNED_TTL
        for worker_id in list(self._assigned):
            view = self.workers.get(worker_id)
            if view is None:
                del self._assigned[worker_id]
                continue
            view.assigned_models = {
                m for m, at in self._assigned[worker_id].items() if at > horizon
            }
        for _task_id, (worker_id, req) in self.active.items():
            view = self.workers.get(worker_id)
            if view is not None:
                view.take(req)
        for view in views:
            view.running = max(view.running, running.get(view.worker_id, 0))
        self._candidates.clear()
        self._heaps.clear()
        self._parked.clear()
        self._groups_of.clear()

    def candidates(self, req: Requirements) -> list[WorkerView]:
        found = self._candidates.get(req)
        if found is None:
            found = [w for w in self.workers.values() if w.why_never(req) is None]
            self._candidates[req] = found
            heap = [(w.rank(req, self.warm_routing), w.version, w.worker_id) for w in found]
            heapq.heapify(heap)
            self._heaps[req] = heap
            self._parked[req] = set()
            for w in found:
                self._groups_of.setdefault(w.worker_id, set()).add(req)
        return found

    def explain(self, req: Requirements) -> str:
        """Why tasks with these requirements are still pending."""
        if not self.workers:
            return "no worker is registered"
        eligible = self.candidates(req)
        if not eligible:
            reasons = Counter(w.why_never(req) for w in self.workers.values())
            parts = [f"{n} worker(s) {why}" for why, n in reasons.most_common()]
            return "no registered worker can run it: " + "; ".join(parts)
        live = [w for w in eligible if w.taking_work]
        if not live:
            disabled = sum(1 for w in eligible if w.disabled)
            if disabled:
                return (
                    f"all {len(eligible)} eligible worker(s) are disabled, stopped, draining or "
                    f"unreachable ({disabled} disabled: elastic scaling enables one for this "
                    "backlog, or POST /api/v1/workers/<id>/enable)"
                )
            return f"all {len(eligible)} eligible worker(s) are stopped, draining or unreachable"
        ready = [w for w in live if w.executor_ready(req.executor)]
        if ready and req in self._warm_wait:
            return (
                f"waiting for a worker with model {req.model!r} loaded to free a slot, rather "
                "than load a second copy (SCHEDULER_WARM_ROUTING)"
            )
        if not ready:
            return f"waiting for executor {req.executor!r} to be ready: " + "; ".join(
                _executor_state(w, req.executor) for w in live[:5]
            )
        return f"waiting for a free slot or resources on {len(ready)} eligible worker(s)"

    # -- tasks -------------------------------------------------------------------
    def add_pending(self, entry: QueueEntry, now: float) -> None:
        old = self.pending.get(entry.task_id)
        if old is not None:
            self._unqueue(old)
        self.pending[entry.task_id] = entry
        self._queued[entry.requirements] += 1
        if entry.not_before > now:
            heapq.heappush(self.delayed, (entry.not_before, entry.task_id))
        else:
            self._enqueue(entry)

    def _enqueue(self, entry: QueueEntry) -> None:
        heapq.heappush(self.queues.setdefault(entry.requirements, []), (entry.score, entry.task_id))
        if entry.merge_key:
            group = self._mergeable.setdefault((entry.requirements, entry.merge_key), {})
            group[entry.task_id] = None
        if entry.identity:
            self._twins.setdefault(entry.identity, {})[entry.task_id] = None

    def _unqueue(self, entry: QueueEntry) -> None:
        """Forget a task that leaves the pending set (its heap entries go stale)."""
        count = self._queued[entry.requirements] - 1
        if count > 0:
            self._queued[entry.requirements] = count
        else:
            self._queued.pop(entry.requirements, None)
        if entry.merge_key:
            key = (entry.requirements, entry.merge_key)
            group = self._mergeable.get(key)
            if group is not None:
                group.pop(entry.task_id, None)
                if not group:
                    del self._mergeable[key]
        if entry.identity:
            twins = self._twins.get(entry.identity)
            if twins is not None:
                twins.pop(entry.task_id, None)
                if not twins:
                    del self._twins[entry.identity]

    def promote_due(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            not_before, task_id = heapq.heappop(self.delayed)
            entry = self.pending.get(task_id)
            if entry is not None and entry.not_before == not_before:
                self._enqueue(entry)

    def next_due(self) -> float | None:
        """When the earliest backoff ends, if any task waits on one."""
        while self.delayed:
            not_before, task_id = self.delayed[0]
            entry = self.pending.get(task_id)
            if entry is not None and entry.not_before == not_before:
                return not_before
            heapq.heappop(self.delayed)
        return None

    def discard_pending(self, task_id: str) -> None:
        entry = self.pending.pop(task_id, None)  # its heap entry is skipped when it surfaces
        if entry is not None:
            self._unqueue(entry)

    def release(self, task_id: str, worker_id: str | None = None) -> None:
        """A placed task ended or left its worker: free what it used. With `worker_id`,
        only if it is still placed there (a late event must not free a newer placement)."""
        entry = self.active.get(task_id)
        if entry is not None and worker_id is not None and entry[0] != worker_id:
            return
        entry = self.active.pop(task_id, None)
        self.forget_identity(task_id)
        if entry is not None:
            view = self.workers.get(entry[0])
            if view is not None:
                view.give_back(entry[1])
                self._unpark(view)

    def forget_identity(self, task_id: str) -> None:
        """The task no longer runs anywhere: its twins are placed on their own merits."""
        placed = self._identity_of.pop(task_id, None)
        if placed is None:
            return
        identity, worker_id = placed
        at = self._identity_at.get(identity)
        if at is not None:
            at[worker_id] -= 1
            if at[worker_id] <= 0:
                del at[worker_id]
            if not at:
                del self._identity_at[identity]

    def _unpark(self, view: WorkerView) -> None:
        for req in self._groups_of.get(view.worker_id, ()):
            parked = self._parked.get(req)
            if parked is not None and view.worker_id in parked:
                parked.discard(view.worker_id)
                rank = view.rank(req, self.warm_routing)
                heapq.heappush(self._heaps[req], (rank, view.version, view.worker_id))

    def _head(self, req: Requirements) -> tuple[float, str] | None:
        queue = self.queues.get(req)
        while queue:
            score, task_id = queue[0]
            current = self.pending.get(task_id)
            if current is not None and current.requirements == req and current.score == score:
                return queue[0]
            heapq.heappop(queue)
        self.queues.pop(req, None)
        return None

    def choose(
        self,
        req: Requirements,
        avoid: frozenset[str] = frozenset(),
        identity: str = "",
        prefer: frozenset[str] = frozenset(),
    ) -> WorkerView | None:
        """The best worker for `req` now; workers in `avoid` (where an earlier attempt
        failed) only when no other worker could ever run it; workers in `prefer` (they
        hold the task's input) first among equally warm ones. A task identical to one
        placed goes where that one is, when it has room."""
        if identity:
            for worker_id in self._identity_at.get(identity, ()):
                w = self.workers.get(worker_id)
                if w is not None and worker_id not in avoid and w.fits_now(req):
                    return w
        if avoid:
            return self._choose_scan(req, avoid, prefer)
        best = self._best_fit(req)
        if best is None:
            return None
        if prefer:
            best = self._prefer_local(req, best, prefer)
        return None if self._wait_for_warm(req, best) else best

    def _best_fit(self, req: Requirements) -> WorkerView | None:
        """The best worker for `req` that fits now, by rank without locality (the heap)."""
        self.candidates(req)
        heap, parked = self._heaps[req], self._parked[req]
        while heap:
            _, version, worker_id = heap[0]
            w = self.workers.get(worker_id)
            if w is None:
                heapq.heappop(heap)
            elif version != w.version:  # its load changed since: re-rank it
                heapq.heapreplace(heap, (w.rank(req, self.warm_routing), w.version, worker_id))
            elif not w.fits_now(req):
                heapq.heappop(heap)
                parked.add(worker_id)
            else:
                return w
        return None

    def _prefer_local(
        self, req: Requirements, best: WorkerView, prefer: frozenset[str]
    ) -> WorkerView:
        """`best`, or a worker in `prefer` that fits now and ranks better with locality
        counted: `best` ranks first without it, so only those few need a look."""
        local = [
            w
            for worker_id in prefer
            if (w := self.workers.get(worker_id)) is not None
            and w.why_never(req) is None
            and w.fits_now(req)
        ]
        return min([best, *local], key=lambda w: w.rank(req, self.warm_routing, prefer))

    def _wait_for_warm(self, req: Requirements, best: WorkerView) -> bool:
        """Whether a task should wait for a full worker that has its model warm rather
        than have `best`, which has not, load a second copy: yes while the backlog for the
        model is within SPILL_ROUNDS rounds of the warm workers' slots, for up to
        WARM_WAIT_SEC (a warm worker kept full by other work must not hold it for ever)."""
        if not self.warm_routing or not req.model or best.warm(req.model):
            self._warm_wait.pop(req, None)
            return False
        warm_slots = sum(
            w.slots
            for w in self.candidates(req)
            if w.taking_work and w.executor_ready(req.executor) and w.warm(req.model)
        )
        if warm_slots == 0 or self._queued[req] > SPILL_ROUNDS * warm_slots:
            self._warm_wait.pop(req, None)
            return False
        now = time.monotonic()
        since = self._warm_wait.setdefault(req, now)
        if now - since > WARM_WAIT_SEC:
            del self._warm_wait[req]
            return False
        return True

    def _choose_scan(
        self, req: Requirements, avoid: frozenset[str], prefer: frozenset[str] = frozenset()
    ) -> WorkerView | None:
        """choose() for a retry: a linear pass, since `avoid` differs task by task."""
        # Workers not avoided whose executor has not failed; else anyone who can run it
        # (an avoided worker beats waiting for one whose executor may never come back).
        candidates = [
            w
            for w in self.candidates(req)
            if w.worker_id not in avoid and not w.executor_failed(req.executor)
        ]
        candidates = candidates or self.candidates(req)
        best: WorkerView | None = None
        best_key: Rank | None = None
        for w in candidates:
            if not w.fits_now(req):
                continue
            key = w.rank(req, self.warm_routing, prefer)
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def plan(self, limit: int, now: float) -> tuple[list[Placement], list[Requirements]]:
        """Up to `limit` placements in queue order, and the requirements left blocked."""
        self.promote_due(now)
        tie = itertools.count()
        heads: list[tuple[float, int, Requirements]] = []
        for req in list(self.queues):
            head = self._head(req)
            if head is not None:
                heads.append((head[0], next(tie), req))
        heapq.heapify(heads)
        out: list[Placement] = []
        blocked: list[Requirements] = []
        while heads and len(out) < limit:
            _, _, req = heapq.heappop(heads)
            head = self._head(req)
            assert head is not None
            first = self.pending[head[1]]
            worker = self.choose(req, first.avoid, first.identity, first.prefer)
            if worker is None:
                blocked.append(req)
                continue
            _, task_id = heapq.heappop(self.queues[req])
            entry = self._take(task_id, worker)
            out.append(
                Placement(
                    task_id, worker.worker_id, worker.inbox, entry, task_id, _why(entry, worker)
                )
            )
            if entry.merge_key and worker.takes_merged:
                self._merge_into(out, entry, worker, limit, now)
            head = self._head(req)
            if head is not None:
                heapq.heappush(heads, (head[0], next(tie), req))
        return out, blocked

    def _take(self, task_id: str, worker: WorkerView) -> QueueEntry:
        """Move a pending task onto `worker`'s account."""
        entry = self.pending.pop(task_id)
        self._unqueue(entry)
        req = entry.requirements
        worker.take(req)
        self.active[task_id] = (worker.worker_id, req)
        if entry.identity:
            self.forget_identity(task_id)
            self._identity_of[task_id] = (entry.identity, worker.worker_id)
            self._identity_at.setdefault(entry.identity, Counter())[worker.worker_id] += 1
        if req.model:
            worker.assigned_models.add(req.model)
            self._assigned.setdefault(worker.worker_id, {})[req.model] = time.monotonic()
        return entry

    def _merge_into(
        self, out: list[Placement], lead: QueueEntry, worker: WorkerView, limit: int, now: float
    ) -> None:
        """Add the queued tasks that share `lead`'s merge key to its delivery, while the
        worker has room: each task's identical twins right after it (they run once, so a
        delivery of 64 with 4 twins each is 16 runs), then the next in arrival order.
        Retries that avoid this worker, and backoffs not yet over, wait for their own turn
        (they stay indexed; a bounded look-ahead keeps a deep queue cheap)."""
        req = lead.requirements
        size = 1
        for task_id in self._merge_candidates(lead):
            if size >= MERGE_MAX or len(out) >= limit or not worker.fits_now(req):
                return
            entry = self.pending.get(task_id)  # None once placed (a twin met twice, say)
            if (
                entry is None
                or entry.requirements != req
                or entry.merge_key != lead.merge_key
                or entry.not_before > now
                or worker.worker_id in entry.avoid
            ):
                continue
            self._take(task_id, worker)
            out.append(
                Placement(
                    task_id,
                    worker.worker_id,
                    worker.inbox,
                    entry,
                    lead.task_id,
                    _why(entry, worker),
                )
            )
            size += 1

    def _merge_candidates(self, lead: QueueEntry) -> Iterator[str]:
        """Queued tasks that may join `lead`'s delivery, in the order they should."""
        look = 4 * MERGE_MAX
        if lead.identity:
            yield from list(itertools.islice(self._twins.get(lead.identity, ()), look))
        group = self._mergeable.get((lead.requirements, lead.merge_key), {})
        for task_id in list(itertools.islice(group, look)):
            entry = self.pending.get(task_id)
            yield task_id
            if entry is not None and entry.identity:
                yield from list(itertools.islice(self._twins.get(entry.identity, ()), look))

    def undo(self, placement: Placement, *, requeue: bool) -> None:
        """A placement Redis refused: give the resources back, and requeue the task."""
        self.release(placement.task_id)
        if requeue:
            self.add_pending(placement.entry, now=0.0)

    def blocked_tasks(self, req: Requirements) -> list[str]:
        return [task_id for task_id, e in self.pending.items() if e.requirements == req]


def _why(entry: QueueEntry, worker: WorkerView) -> str:
    return entry.prefer_why if worker.worker_id in entry.prefer else ""


def _executor_state(w: WorkerView, name: str) -> str:
    status = w.executor_states.get(name)
    if status is None:
        return f"{w.worker_id}: not reported yet"
    if status.state is ExecutorState.FAILED:
        return f"{w.worker_id}: failed ({status.reason})"
    return f"{w.worker_id}: {status.state.value}"
