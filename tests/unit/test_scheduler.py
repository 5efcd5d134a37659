"""Placement rules, in memory: the scheduler without Redis or processes."""

from __future__ import annotations

from flowmesh.spec import Requirements
from flowmesh.store import QueueEntry
from orchestrator.scheduler import GpuView, Scheduler, WorkerView


def add(
    s: Scheduler,
    task_id: str,
    req: Requirements,
    score: float,
    *,
    not_before: float = 0.0,
    avoid: tuple[str, ...] = (),
    now: float = 0.0,
) -> None:
    s.add_pending(QueueEntry(task_id, req, score, not_before, frozenset(avoid)), now)


def worker(
    wid: str,
    *,
    executors=("echo",),
    tags=(),
    cpu=8.0,
    memory=32 * 2**30,
    gpus=(),
    slots=4,
    alive=True,
    status="idle",
    cost=1.0,
    models=(),
) -> WorkerView:
    return WorkerView(
        worker_id=wid,
        inbox=f"tasks:inbox:{wid}",
        executors=frozenset(executors),
        tags=frozenset(tags),
        cpu=cpu,
        memory=memory,
        gpus=tuple(gpus),
        slots=slots,
        status=status,
        alive=alive,
        cost_per_hour=cost,
        loaded_models=frozenset(models),
    )


def sched(*workers: WorkerView) -> Scheduler:
    s = Scheduler()
    s.set_workers(list(workers), {})
    return s


H100 = GpuView("NVIDIA H100 80GB HBM3", 80 * 2**30)
A10 = GpuView("NVIDIA A10G", 24 * 2**30)


def test_priority_then_age_order():
    s = sched(worker("w", slots=10))
    echo = Requirements(executor="echo")
    add(s, "old-low", echo, (1000 - 0) * 1e12 + 1)
    add(s, "new-high", echo, (1000 - 5) * 1e12 + 3)
    add(s, "new-low", echo, (1000 - 0) * 1e12 + 2)
    plan, _ = s.plan(10, 0.0)
    assert [p.task_id for p in plan] == ["new-high", "old-low", "new-low"]


def test_gpu_type_and_memory_filter():
    s = sched(worker("a10", gpus=[A10, A10]), worker("h100", gpus=[H100]))
    req = Requirements(executor="echo", gpu_count=1, gpu_type="h100")
    assert [w.worker_id for w in s.candidates(req)] == ["h100"]
    big = Requirements(executor="echo", gpu_count=1, gpu_memory=40 * 2**30)
    assert [w.worker_id for w in s.candidates(big)] == ["h100"]
    two = Requirements(executor="echo", gpu_count=2)
    assert [w.worker_id for w in s.candidates(two)] == ["a10"]
    assert "fewer than 3 GPU(s)" in s.explain(Requirements(executor="echo", gpu_count=3))


def test_gpus_are_not_shared_between_tasks():
    s = sched(worker("h", gpus=[H100], slots=4))
    req = Requirements(executor="echo", gpu_count=1)
    add(s, "t1", req, 1)
    add(s, "t2", req, 2)
    plan, blocked = s.plan(10, 0.0)
    assert [p.task_id for p in plan] == ["t1"]
    assert blocked == [req]
    s.release("t1")
    plan, _ = s.plan(10, 0.0)
    assert [p.task_id for p in plan] == ["t2"]


def test_warm_model_wins_then_load_then_cost():
    s = sched(
        worker("cheap", executors=("inference",), cost=0.5),
        worker("warm", executors=("inference",), cost=3.0, models=("llama",)),
    )
    warm = Requirements(executor="inference", model="llama")
    cold = Requirements(executor="inference", model="other")
    add(s, "a", warm, 1)
    add(s, "b", cold, 2)
    plan, _ = s.plan(10, 0.0)
    assert {p.task_id: p.worker_id for p in plan} == {"a": "warm", "b": "cheap"}


def test_dead_draining_or_full_workers_get_nothing():
    s = sched(
        worker("dead", alive=False), worker("drain", status="draining"), worker("full", slots=1)
    )
    echo = Requirements(executor="echo")
    for i in range(3):
        add(s, f"t{i}", echo, i)
    plan, blocked = s.plan(10, 0.0)
    assert [(p.task_id, p.worker_id) for p in plan] == [("t0", "full")]
    assert blocked == [echo]
    assert "waiting for a free slot" in s.explain(echo)


def test_blocked_kind_does_not_hold_up_others():
    s = sched(worker("cpu"))
    gpu = Requirements(executor="echo", gpu_count=1)
    echo = Requirements(executor="echo")
    add(s, "gpu-first", gpu, 1)
    add(s, "echo-second", echo, 2)
    plan, blocked = s.plan(10, 0.0)
    assert [p.task_id for p in plan] == ["echo-second"]
    assert blocked == [gpu]
    assert s.explain(gpu).startswith("no registered worker can run it")


def test_refused_placement_is_requeued_in_order():
    s = sched(worker("w", slots=1))
    echo = Requirements(executor="echo")
    add(s, "t", echo, 5)
    (p,), _ = s.plan(10, 0.0)
    s.undo(p, requeue=True)
    assert s.pending["t"].score == 5
    (again,), _ = s.plan(10, 0.0)
    assert again.task_id == "t"


def test_no_workers_reason():
    assert sched().explain(Requirements(executor="echo")) == "no worker is registered"


def test_backoff_delays_a_task_until_its_time():
    s = sched(worker("w"))
    echo = Requirements(executor="echo")
    add(s, "later", echo, 1, not_before=100.0, now=50.0)
    add(s, "now", echo, 2, now=50.0)
    plan, _ = s.plan(10, 50.0)
    assert [p.task_id for p in plan] == ["now"]
    assert s.next_due() == 100.0
    plan, _ = s.plan(10, 100.0)
    assert [p.task_id for p in plan] == ["later"]
    assert s.next_due() is None


def test_failed_worker_is_avoided_when_another_fits_and_used_when_none_does():
    s = sched(worker("bad"), worker("good", cost=5.0))
    echo = Requirements(executor="echo")
    add(s, "t", echo, 1, avoid=("bad",))
    (p,), _ = s.plan(10, 0.0)
    assert p.worker_id == "good"
    only = sched(worker("bad"))
    add(only, "t", echo, 1, avoid=("bad",))
    (p,), _ = only.plan(10, 0.0)
    assert p.worker_id == "bad"
