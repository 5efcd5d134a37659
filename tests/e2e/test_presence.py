"""Presence is independent of work: a worker whose executors take long to start, on a
machine whose cores are all busy, keeps beating and is never declared lost.

The scenario of the issue: HEARTBEAT_INTERVAL_SEC=1, two workers whose executor takes
20 s to start (mostly waiting, some CPU, like importing torch), every core kept busy by
other processes for the whole run, tasks submitted before any executor is ready. Before
presence had its own thread, both workers were declared lost ~4 s after registering and
their tasks ran twice.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import wait_until

INTERVAL = 1.0
LEASE = 2 * INTERVAL + 1.0  # the orchestrator's: 2 intervals + 1 s of silence
SETUP_SEC = 20.0
BUSY_SEC = 2.0
TASKS = 40
WORKERS = ("w1", "w2")

PLUGIN = f"""
import time

from pydantic import BaseModel

from executors.base import Executor


class SlowStartOptions(BaseModel):
    delaySec: float = 0.2


class SlowStart(Executor):
    name = "slow_start"
    options = SlowStartOptions

    def setup(self, config):
        # Like importing torch and loading a model: some CPU, mostly waiting.
        t0 = time.monotonic()
        spins = 0
        while time.monotonic() - t0 < {BUSY_SEC}:
            spins += 1
        time.sleep(max(0.0, {SETUP_SEC} - (time.monotonic() - t0)))

    def run(self, task):
        time.sleep(task.options.delaySec)
        return {{"slept": task.options.delaySec}}
"""


@pytest.fixture
def slow_plugin(install_plugin) -> str:
    """An executor plugin whose setup takes SETUP_SEC, installed through its entry point."""
    return install_plugin("fm_slowstart", PLUGIN, {"slow_start": "SlowStart"})


@pytest.fixture
def cpu_burners() -> Iterator[list[subprocess.Popen[bytes]]]:
    """One busy loop per core (at least 2), running until the test's teardown."""
    count = max(2, os.cpu_count() or 2)
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class Observer:
    """Samples, until stopped: each worker's heartbeat key every ~100 ms (its value is the
    worker's wall-clock time of the beat), and every ~0.5 s the executor states the API
    serves and the reason of a pending task. Two threads, so that a slow API reply on the
    loaded machine never delays a heartbeat sample (which would merge two gaps into one)."""

    def __init__(self, redis_url: str, orch_url: str):
        self.redis_url = redis_url
        self.orch_url = orch_url
        self.probe_task: str | None = None
        self.halt = threading.Event()
        self.beats: dict[str, list[float]] = {w: [] for w in WORKERS}
        self.states: dict[str, list[str]] = {w: [] for w in WORKERS}
        self.reasons: list[str] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._beat_loop, daemon=True),
            threading.Thread(target=self._api_loop, daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.halt.set()
        for t in self._threads:
            t.join(timeout=10)

    def _beat_loop(self) -> None:
        r = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)
        keys = [f"worker:{w}:heartbeat" for w in WORKERS]
        try:
            while not self.halt.is_set():
                try:
                    values = r.mget(keys)
                except redis.RedisError as exc:
                    self.errors.append(repr(exc))  # the machine is loaded: try again
                    values = [None] * len(WORKERS)
                for wid, value in zip(WORKERS, values, strict=True):
                    seen = self.beats[wid]
                    if value is not None and (not seen or float(value) != seen[-1]):
                        seen.append(float(value))
                self.halt.wait(0.1)
        finally:
            r.close()

    def _api_loop(self) -> None:
        http = httpx.Client(base_url=self.orch_url, timeout=10)
        try:
            while not self.halt.is_set():
                try:
                    self._sample_api(http)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    self.errors.append(repr(exc))
                self.halt.wait(0.5)
        finally:
            http.close()

    def _sample_api(self, http: httpx.Client) -> None:
        for w in http.get("/api/v1/workers").json()["workers"]:
            state = w.get("executor_states", {}).get("slow_start", {}).get("state")
            seen = self.states.get(w["worker_id"])
            if state and seen is not None and (not seen or seen[-1] != state):
                seen.append(state)
        if self.probe_task:
            task = http.get(f"/api/v1/tasks/{self.probe_task}").json()
            reason = task.get("reason")
            if task.get("status") == "PENDING" and reason and reason not in self.reasons:
                self.reasons.append(reason)

    def gaps(self, wid: str) -> list[float]:
        b = self.beats[wid]
        return [later - earlier for earlier, later in itertools.pairwise(b)]


def _lost_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History entries of an attempt ended by the worker being declared lost."""
    out = []
    for entry in history:
        error = entry.get("error")
        kind = error.get("kind") if isinstance(error, dict) else None
        if (
            entry.get("outcome") == "worker_lost"
            or kind == "worker_lost"
            or "stopped heartbeating" in json.dumps(error)
        ):
            out.append(entry)
    return out


@pytest.mark.timeout(180)
def test_slow_executor_start_on_busy_cores_loses_no_worker_and_runs_each_task_once(
    start_orchestrator, start_worker, rdb, redis_url, slow_plugin, cpu_burners
):
    # The burners run from before the fleet starts to after it has drained.
    orchestrator = start_orchestrator(PYTHONPATH=str(slow_plugin))
    observer = Observer(redis_url, orchestrator.url)
    observer.start()  # before the workers: their registration is the first beat seen
    workers = [
        start_worker(
            wid,
            wait=False,
            HEARTBEAT_INTERVAL_SEC=str(INTERVAL),
            WORKER_EXECUTORS="slow_start",
            PYTHONPATH=str(slow_plugin),
        )
        for wid in WORKERS
    ]
    ids = orchestrator.submit(
        *[{"spec": {"taskType": "slow_start", "slow_start": {"delaySec": 0.2}}}] * TASKS
    )
    assert len(set(ids)) == TASKS
    observer.probe_task = ids[0]
    try:

        def drained() -> bool:
            for w in workers:
                if not w.alive():
                    raise AssertionError(f"worker {w.name} exited:\n{w.log()}")
            failed = rdb.zrange("tasks:status:FAILED", 0, -1)
            if failed:
                raise AssertionError(f"tasks failed: {[orchestrator.task(t) for t in failed]}")
            return rdb.zcard("tasks:status:DONE") == TASKS

        wait_until(drained, timeout=140, interval=0.5, what=f"{TASKS} tasks to be DONE")
    finally:
        observer.stop()

    assert all(p.poll() is None for p in cpu_burners), "the CPU burners ran the whole time"
    tasks = [orchestrator.task(t) for t in ids]
    assert [t["status"] for t in tasks] == ["DONE"] * TASKS
    assert [t["attempts"] for t in tasks] == [1] * TASKS, [
        (t["task_id"], t["attempts"], t["history"]) for t in tasks if t["attempts"] != 1
    ]
    lost = {t["task_id"]: _lost_entries(t["history"]) for t in tasks}
    assert not any(lost.values()), {k: v for k, v in lost.items() if v}

    orch_log = orchestrator.log()
    assert "lost" not in orch_log, [line for line in orch_log.splitlines() if "lost" in line]
    for w in workers:
        assert "registering again" not in w.log(), w.log()

    # Placement waited for the executors: each was seen starting, then ready, and a task
    # submitted meanwhile said what it was waiting for.
    for wid in WORKERS:
        states = observer.states[wid]
        assert "starting" in states and "ready" in states, (wid, states)
        assert states.index("starting") < states.index("ready"), (wid, states)
    assert any("slow_start" in reason and "ready" in reason for reason in observer.reasons), (
        observer.reasons
    )

    # The behaviour under test: no silence as long as the lease, with every core busy.
    gaps = {wid: observer.gaps(wid) for wid in WORKERS}
    for wid, g in gaps.items():
        # Beats from registration until the drain: at least the executor's start time.
        assert len(g) >= SETUP_SEC / INTERVAL / 2, (wid, len(g), observer.errors)
    worst = max(max(g) for g in gaps.values())
    every = sorted(x for g in gaps.values() for x in g)
    print(  # shown with -s or -rP: the figures the issue asks for
        f"{len(every)} heartbeat gaps: p50 {every[len(every) // 2]:.3f}s, "
        f"p99 {every[round(0.99 * (len(every) - 1))]:.3f}s, max {worst:.3f}s"
    )
    assert worst < LEASE, {wid: sorted(g)[-5:] for wid, g in gaps.items()}
