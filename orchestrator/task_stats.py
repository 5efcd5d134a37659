"""What this orchestrator saw tasks do, for `GET /metrics`: queue waits and run times,
attempts and their failures by kind, and what task merge saved.

Counted from the events it consumes (`task.finished`, `task.retry` and `task.cancelled`,
whose fields settle.lua and cancel.lua fill in: `executor`, `outcome`, `wait_sec`,
`run_sec`, `executed_by`) and from its own placements (merged deliveries), so the task
path pays nothing beyond a few fields on an event it writes anyway.

The figures are this process's own, as Prometheus counters and histograms usually are:
they start at zero when the orchestrator starts (Prometheus's `rate()` and `increase()`
take the reset in their stride), and with several orchestrator replicas each counts the
events it read from the shared consumer group, so sum them across replicas.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

# Queue wait: from a millisecond to four hours.
WAIT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400
)  # fmt: skip
# Run time: from ten milliseconds to a day.
RUN_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400
)  # fmt: skip


class Histogram:
    """Observations per label value, in fixed buckets (upper bounds, inclusive)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[str, list[int]] = {}  # per label: per bucket, then +Inf
        self._sums: dict[str, float] = {}

    def observe(self, label: str, value: float) -> None:
        counts = self._counts.get(label)
        if counts is None:
            counts = self._counts[label] = [0] * (len(self.buckets) + 1)
        counts[bisect_left(self.buckets, value)] += 1
        self._sums[label] = self._sums.get(label, 0.0) + value

    def family(self, name: str, documentation: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label])
        for value, counts in sorted(self._counts.items()):
            cumulative, total = [], 0
            for bound, n in zip((*map(_bound, self.buckets), "+Inf"), counts, strict=True):
                total += n
                cumulative.append((bound, total))
            family.add_metric([value], cumulative, sum_value=self._sums[value])
        return family


def _bound(b: float) -> str:
    return repr(float(b))


def _seconds(raw: str | None) -> float | None:
    try:
        return max(float(raw), 0.0) if raw else None
    except ValueError:
        return None


class TaskStats:
    """Counters and histograms over the attempts this orchestrator saw end."""

    def __init__(self) -> None:
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.run = Histogram(RUN_BUCKETS)
        self.attempts: Counter[str] = Counter()  # executor -> attempts ended
        self.failures: Counter[tuple[str, str]] = Counter()  # (executor, kind)
        self.merged: Counter[str] = Counter()  # executor -> tasks in another's delivery
        self.runs_saved: Counter[str] = Counter()  # executor -> tasks an identical run served
        self.saved_seconds: dict[str, float] = {}

    def attempt_ended(self, fields: Mapping[str, str]) -> None:
        """Count an attempt's end from its event; events that end no attempt (a pending
        task's cancel, a dead letter's requeue, one written by an older settle script)
        carry no `outcome` and count for nothing."""
        outcome = fields.get("outcome")
        if outcome is None:
            return
        executor = fields.get("executor") or "unknown"
        self.attempts[executor] += 1
        if outcome != "done":
            self.failures[(executor, outcome or "unknown")] += 1
        wait, run = _seconds(fields.get("wait_sec")), _seconds(fields.get("run_sec"))
        if wait is not None:
            self.queue_wait.observe(executor, wait)
        if run is not None:
            self.run.observe(executor, run)
        if outcome == "done" and fields.get("executed_by"):
            self.runs_saved[executor] += 1
            self.saved_seconds[executor] = self.saved_seconds.get(executor, 0.0) + (run or 0.0)

    def placed_merged(self, executor: str, n: int = 1) -> None:
        """`n` tasks were placed in another task's delivery (task merge)."""
        self.merged[executor] += n

    def collect(self) -> Iterable[Metric]:
        yield self.queue_wait.family(
            "flowmesh_task_queue_wait_seconds",
            "Per attempt that started: seconds from when its task was ready to run (submitted, "
            "or back from a retry's backoff) to the attempt's start, by executor. Counted by "
            "this orchestrator process since it started",
            "executor",
        )
        yield self.run.family(
            "flowmesh_task_run_seconds",
            "Per attempt that started: seconds from its start to its end (done, failed, "
            "retried or cancelled), by executor. Counted by this orchestrator process since "
            "it started",
            "executor",
        )
        yield _counter(
            "flowmesh_task_attempts_ended",
            "Task attempts that ended (done, failed, retried or cancelled), by executor",
            ["executor"],
            {(e,): n for e, n in self.attempts.items()},
        )
        yield _counter(
            "flowmesh_task_failures",
            "Task attempts that ended in a failure, retried ones included, by executor and "
            "failure kind (flowmesh.failures.FailureKind, or an executor's own)",
            ["executor", "kind"],
            {key: float(n) for key, n in self.failures.items()},
        )
        yield _counter(
            "flowmesh_merged_tasks",
            "Tasks placed in another task's delivery (task merge): deliveries saved",
            ["executor"],
            {(e,): n for e, n in self.merged.items()},
        )
        yield _counter(
            "flowmesh_merge_runs_saved",
            "Tasks DONE with the result of an identical task's run (task merge): executor "
            "runs saved",
            ["executor"],
            {(e,): n for e, n in self.runs_saved.items()},
        )
        yield _counter(
            "flowmesh_merge_saved_seconds",
            "Run seconds of the tasks an identical task's run served (the time each waited "
            "on that run): a lower bound on the executor time saved",
            ["executor"],
            {(e,): n for e, n in self.saved_seconds.items()},
        )


def _counter(
    name: str, documentation: str, labels: list[str], values: Mapping[tuple[str, ...], float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family
