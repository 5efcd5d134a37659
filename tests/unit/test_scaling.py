"""Elastic scaling's decisions, in memory: which workers are disabled and enabled, when."""

from __future__ import annotations

from dataclasses import replace

from flowmesh.spec import Requirements
from orchestrator.scaling import ElasticScaler, ScalingSettings
from tests.unit.test_scheduler import H100, worker

ECHO = Requirements(executor="echo")
LLM = Requirements(executor="inference", model="tiny-llama")
SETTINGS = ScalingSettings(enabled=True, min_active=1, idle_sec=10, cooldown_sec=30)


def test_idle_workers_beyond_the_minimum_are_disabled_after_the_idle_period():
    s = ElasticScaler(SETTINGS)
    views = [worker("w1", cost=1.0), worker("w2", cost=3.0), worker("w3", cost=2.0)]
    assert s.decide(views, [], now=100.0) == []  # idle from now on
    assert s.decide(views, [], now=109.0) == []  # not yet ten seconds
    changes = s.decide(views, [], now=110.0)
    # Two go, one stays: the most expensive first.
    assert [(c.worker_id, c.enable) for c in changes] == [("w2", False), ("w3", False)]
    assert changes[0].reason == "idle for 10 s"


def test_a_busy_worker_or_one_the_backlog_needs_is_never_disabled():
    s = ElasticScaler(SETTINGS)
    busy = replace(worker("w1"), running=1)
    gpu = worker("w2", executors=("inference",), gpus=(H100,))
    spare = worker("w3")
    gpu_task = Requirements(executor="inference", gpu_count=1)
    s.decide([busy, gpu, spare], [gpu_task], now=0.0)
    changes = s.decide([busy, gpu, spare], [gpu_task], now=60.0)
    assert [c.worker_id for c in changes] == ["w3"]  # w1 runs a task, w2 could run the backlog


def test_a_backlog_enables_a_disabled_worker_at_once_warm_model_first():
    s = ElasticScaler(SETTINGS)
    active = replace(worker("w1", executors=("inference",)), running=4)
    cold_cheap = replace(worker("w2", executors=("inference",), cost=0.5), disabled=True)
    warm = replace(
        worker("w3", executors=("inference",), cost=2.0, models=("tiny-llama",)), disabled=True
    )
    changes = s.decide([active, cold_cheap, warm], [LLM], now=5.0)
    assert [(c.worker_id, c.enable) for c in changes] == [("w3", True)]
    assert "model tiny-llama warm there" in changes[0].reason
    # A worker that cannot run the task is never enabled for it.
    s2 = ElasticScaler(SETTINGS)
    echo_only = replace(worker("w4"), disabled=True)
    assert s2.decide([active, echo_only], [LLM], now=5.0) == []


def test_no_disable_within_the_cooldown_after_an_enable():
    s = ElasticScaler(SETTINGS)
    w1, w2 = worker("w1"), replace(worker("w2"), disabled=True)
    s.decide([w1, w2], [], now=0.0)
    assert [c.enable for c in s.decide([w1, w2], [ECHO], now=1.0)] == [True]
    w2 = replace(w2, disabled=False)
    assert s.decide([w1, w2], [], now=25.0) == []  # idle long enough, but within the cooldown
    assert len(s.decide([w1, w2], [], now=31.0)) == 1  # one of the two, the other stays


def test_min_active_zero_may_disable_every_idle_worker_and_dead_workers_are_ignored():
    s = ElasticScaler(replace(SETTINGS, min_active=0))
    views = [worker("w1"), worker("w2", alive=False), worker("w3", status="draining")]
    s.decide(views, [], now=0.0)
    assert [c.worker_id for c in s.decide(views, [], now=10.0)] == ["w1"]
