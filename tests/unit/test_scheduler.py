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
    prefetch=0,
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
        prefetch=prefetch,
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


def test_a_task_that_uploads_goes_only_to_a_worker_that_can():
    plain = worker("plain", executors=("lora_sft",))
    uploader = worker("uploader", executors=("lora_sft",))
    uploader.uploads = True
    s = sched(plain, uploader)
    req = Requirements(executor="lora_sft", uploads=True)
    assert [w.worker_id for w in s.candidates(req)] == ["uploader"]
    assert {w.worker_id for w in s.candidates(Requirements(executor="lora_sft"))} == {
        "plain",
        "uploader",
    }
    alone = sched(worker("plain", executors=("lora_sft",)))
    assert "no ORCHESTRATOR_BASE_URL to upload to" in alone.explain(req)


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


def test_prefetch_queues_tasks_that_reserve_nothing_beyond_the_slots():
    s = sched(worker("w", slots=2, prefetch=2, cpu=8.0))
    echo = Requirements(executor="echo")
    heavy = Requirements(executor="echo", cpu=1.0)
    for i in range(6):
        add(s, f"e{i}", echo, i)
    plan, blocked = s.plan(10, 0.0)
    # Two to run and two waiting in the inbox: a freed slot is refilled from there.
    assert [p.task_id for p in plan] == ["e0", "e1", "e2", "e3"]
    assert blocked == [echo]
    # A task that holds a CPU is placed only where it can start: never queued behind others.
    s2 = sched(worker("w", slots=2, prefetch=2, cpu=8.0))
    for i in range(4):
        add(s2, f"h{i}", heavy, i)
    plan, _ = s2.plan(10, 0.0)
    assert [p.task_id for p in plan] == ["h0", "h1"]


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


def _drain_alternating(s: Scheduler, tasks: int) -> tuple[set[tuple[str, str]], int]:
    """Submit `tasks` tasks alternating between two models, then place and finish them in
    rounds; returns the (worker, model) pairs that ever got a task (each pair is a model
    load on that worker) and the number of rounds."""
    reqs = [Requirements(executor="vllm", model=m) for m in ("model-a", "model-b")]
    for i in range(tasks):
        add(s, f"t{i}", reqs[i % 2], float(i))
    loads: set[tuple[str, str]] = set()
    rounds = 0
    while s.pending:
        rounds += 1
        placed, _ = s.plan(1000, now=0.0)
        assert placed, "nothing placed while tasks wait"
        for p in placed:
            loads.add((p.worker_id, p.entry.requirements.model or ""))
        for p in placed:
            s.release(p.task_id)
    return loads, rounds


def test_warm_routing_loads_each_model_once_across_the_fleet():
    # The figure: 2 workers, 2 models, 200 tasks alternating between the models.
    s = sched(
        worker("w1", executors=("vllm",), slots=64), worker("w2", executors=("vllm",), slots=64)
    )
    loads, _ = _drain_alternating(s, 200)
    assert len(loads) == 2
    assert {w for w, _ in loads} == {"w1", "w2"}  # one model each, both workers busy


def test_routing_by_load_alone_loads_every_model_everywhere():
    s = sched(
        worker("w1", executors=("vllm",), slots=64), worker("w2", executors=("vllm",), slots=64)
    )
    s.warm_routing = False
    loads, _ = _drain_alternating(s, 200)
    assert len(loads) == 4


def test_a_deep_backlog_spills_a_warm_model_onto_a_cold_worker():
    # 400 tasks of one model, two workers of 64 slots: waiting for the warm worker would
    # take over SPILL_ROUNDS rounds, so the second worker loads the model too.
    s = sched(
        worker("w1", executors=("vllm",), slots=64), worker("w2", executors=("vllm",), slots=64)
    )
    req = Requirements(executor="vllm", model="m")
    for i in range(400):
        add(s, f"t{i}", req, float(i))
    placed, _ = s.plan(1000, now=0.0)
    assert {p.worker_id for p in placed} == {"w1", "w2"}


def test_a_worker_reporting_a_model_loaded_gets_its_tasks():
    s = sched(worker("w1", executors=("vllm",)), worker("w2", executors=("vllm",), models=("m",)))
    add(s, "t", Requirements(executor="vllm", model="m"), 1.0)
    [p], _ = s.plan(10, now=0.0)
    assert p.worker_id == "w2"


def test_tasks_with_one_merge_key_share_a_delivery_up_to_the_free_slots():
    s = sched(worker("w1", slots=5))
    req = Requirements(executor="echo")
    for i in range(8):
        s.add_pending(QueueEntry(f"t{i}", req, float(i), merge_key="k"), 0.0)
    s.add_pending(QueueEntry("other", req, 2.5, merge_key="z"), 0.0)
    placed, _ = s.plan(100, now=0.0)
    # t0 leads; t1..t4 join it (5 slots); the other key waits for a slot.
    assert [(p.task_id, p.parent) for p in placed] == [(f"t{i}", "t0") for i in range(5)]
    for p in placed:
        s.release(p.task_id)
    placed, _ = s.plan(100, now=0.0)
    assert [(p.task_id, p.parent) for p in placed][:2] == [("other", "other"), ("t5", "t5")]


def test_an_identical_task_goes_where_its_twin_runs():
    s = sched(worker("w1", slots=4), worker("w2", slots=4))
    req = Requirements(executor="echo")
    s.add_pending(QueueEntry("a", req, 1.0, merge_key="k", identity="i"), 0.0)
    [first], _ = s.plan(10, now=0.0)
    # Load now favours the other worker; the twin still goes to the first one's.
    s.add_pending(QueueEntry("b", req, 2.0, merge_key="k", identity="i"), 0.0)
    [second], _ = s.plan(10, now=0.0)
    assert second.worker_id == first.worker_id
    s.release("a")
    s.release("b")
    s.add_pending(QueueEntry("c", req, 3.0, merge_key="k", identity="i"), 0.0)
    [third], _ = s.plan(10, now=0.0)  # nothing of it runs any more: placed by load
    assert third.task_id == "c"


def test_identical_twins_travel_together_so_a_delivery_runs_fewer_times():
    s = sched(worker("w1", slots=4))
    req = Requirements(executor="echo")
    for i in range(8):  # prompts a, b, a, b, ...: twins are not adjacent in the queue
        s.add_pending(QueueEntry(f"t{i}", req, float(i), merge_key="k", identity="ab"[i % 2]), 0)
    placed, _ = s.plan(100, now=0.0)
    assert [p.task_id for p in placed] == ["t0", "t2", "t4", "t6"]
    assert {p.entry.identity for p in placed} == {"a"}


def test_an_ended_task_leaves_no_identity_behind():
    s = sched(worker("w1"), worker("w2"))
    req = Requirements(executor="echo")
    s.add_pending(QueueEntry("a", req, 1.0, merge_key="k", identity="i"), 0.0)
    s.plan(10, now=0.0)
    s.active.pop("a")  # the refresh saw it gone before its event came
    s.forget_identity("a")
    s.release("a")
    assert not s._identity_at and not s._identity_of


def test_a_warm_worker_kept_full_holds_its_model_for_a_while_only(monkeypatch):
    import orchestrator.scheduler as scheduler

    # w1 has the model but its GPU is taken by other work; w2 is idle and cold.
    w1 = worker("w1", executors=("vllm",), gpus=(H100,), models=("m",))
    s = sched(w1, worker("w2", executors=("vllm",), gpus=(H100,)))
    s.add_pending(QueueEntry("other", Requirements(executor="vllm", gpu_count=1), 0.0), 0.0)
    [first], _ = s.plan(10, now=0.0)
    assert first.worker_id == "w1"
    req = Requirements(executor="vllm", model="m", gpu_count=1)
    add(s, "t", req, 1.0)
    placed, blocked = s.plan(10, now=0.0)
    assert placed == [] and blocked == [req]
    assert "loaded to free a slot" in s.explain(req)
    monkeypatch.setattr(scheduler, "WARM_WAIT_SEC", 0.0)
    [p], _ = s.plan(10, now=0.0)
    assert p.worker_id == "w2"


def test_no_merged_delivery_for_a_worker_that_cannot_read_one():
    old = worker("w1", slots=8)
    old.takes_merged = False
    s = sched(old)
    for i in range(3):
        s.add_pending(
            QueueEntry(f"t{i}", Requirements(executor="echo"), float(i), merge_key="k"), 0
        )
    placed, _ = s.plan(10, now=0.0)
    assert [p.parent for p in placed] == ["t0", "t1", "t2"]


def test_a_worker_holding_the_input_wins_over_a_less_loaded_one():
    busy = worker("busy", slots=4)
    busy.running = 2
    s = sched(busy, worker("idle", slots=4))
    req = Requirements(executor="echo")
    why = "input final_lora.tar.gz of stage train is on this worker"
    s.add_pending(QueueEntry("t", req, 1.0, prefer=frozenset({"busy"}), prefer_why=why), 0.0)
    [p], _ = s.plan(10, now=0.0)
    assert (p.worker_id, p.why) == ("busy", why)
    add(s, "u", req, 2.0)  # no preference: placed by load
    [p], _ = s.plan(10, now=0.0)
    assert (p.worker_id, p.why) == ("idle", "")


def test_a_warm_model_beats_holding_the_input():
    s = sched(
        worker("local", executors=("vllm",)),
        worker("warm", executors=("vllm",), models=("m",), cost=3.0),
    )
    req = Requirements(executor="vllm", model="m")
    s.add_pending(QueueEntry("t", req, 1.0, prefer=frozenset({"local"}), prefer_why="x"), 0.0)
    [p], _ = s.plan(10, now=0.0)
    assert (p.worker_id, p.why) == ("warm", "")
    # Both warm: the one holding the input wins, however its load compares.
    local = worker("local", executors=("vllm",), models=("m",))
    local.running = 3
    both = sched(local, worker("warm", executors=("vllm",), models=("m",)))
    both.add_pending(QueueEntry("u", req, 2.0, prefer=frozenset({"local"}), prefer_why="x"), 0.0)
    [p], _ = both.plan(10, now=0.0)
    assert (p.worker_id, p.why) == ("local", "x")


def test_a_preferred_worker_that_cannot_run_the_task_now_is_passed_over():
    full = worker("full", slots=1)
    full.running = 1
    s = sched(
        full,
        worker("no-gpu"),
        worker("no-executor", executors=("other",), gpus=(H100,)),
        worker("free", gpus=(H100,), cost=9.0),
    )
    req = Requirements(executor="echo", gpu_count=1)
    prefer = frozenset({"full", "no-gpu", "no-executor", "gone"})
    s.add_pending(QueueEntry("t", req, 1.0, prefer=prefer, prefer_why="x"), 0.0)
    [p], _ = s.plan(10, now=0.0)
    assert (p.worker_id, p.why) == ("free", "")


def test_a_retry_avoids_the_worker_holding_its_input_where_it_failed():
    s = sched(worker("local"), worker("a", cost=5.0), worker("b", cost=2.0))
    req = Requirements(executor="echo")
    s.add_pending(
        QueueEntry("t", req, 1.0, avoid=frozenset({"local"}), prefer=frozenset({"local", "a"})),
        0.0,
    )
    [p], _ = s.plan(10, now=0.0)
    assert p.worker_id == "a"  # preferred and not avoided beats the cheaper one
    only = sched(worker("local"))
    only.add_pending(
        QueueEntry("t", req, 1.0, avoid=frozenset({"local"}), prefer=frozenset({"local"})), 0.0
    )
    [p], _ = only.plan(10, now=0.0)
    assert p.worker_id == "local"  # no other worker could ever run it


def test_a_cold_worker_holding_the_input_still_waits_for_a_full_warm_one():
    w1 = worker("w1", executors=("vllm",), gpus=(H100,), models=("m",))
    s = sched(w1, worker("w2", executors=("vllm",), gpus=(H100,)))
    s.add_pending(QueueEntry("other", Requirements(executor="vllm", gpu_count=1), 0.0), 0.0)
    [first], _ = s.plan(10, now=0.0)
    assert first.worker_id == "w1"
    req = Requirements(executor="vllm", model="m", gpu_count=1)
    s.add_pending(QueueEntry("t", req, 1.0, prefer=frozenset({"w2"})), 0.0)
    placed, blocked = s.plan(10, now=0.0)
    assert placed == [] and blocked == [req]
