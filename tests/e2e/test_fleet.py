"""A fleet end to end: real Redis, a real orchestrator process, real worker processes."""

from __future__ import annotations

import hashlib
import json
import signal
from collections import Counter

import httpx
import pytest

from tests.conftest import Orchestrator, wait_until


def echo(message: object = "hi", delay: float = 0.0, **spec: object) -> dict:
    return {"spec": {"taskType": "echo", "echo": {"message": message, "delaySec": delay}, **spec}}


def test_echo_task_from_yaml_runs_and_writes_its_outputs(orchestrator, start_worker, results_dir):
    start_worker("w1")
    yaml_spec = """
apiVersion: flowmesh/v1
kind: Task
metadata: {name: hello}
spec:
  taskType: echo
  echo: {message: "hello fleet"}
  data: {type: list, items: [1, 2, 3]}
"""
    r = orchestrator.http.post(
        "/api/v1/tasks", content=yaml_spec, headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 201, r.text
    (created,) = r.json()["tasks"]
    assert created["status"] == "PENDING"

    task = orchestrator.wait(created["task_id"])
    assert task["status"] == "DONE", task
    assert task["attempts"] == 1
    assert task["worker_id"] == "w1"
    assert task["error"] is None
    assert task["result"] == {"message": "hello fleet", "items": [1, 2, 3], "delaySec": 0.0}
    assert task["name"] == "hello"
    assert task["created_at"] <= task["dispatched_at"] <= task["started_at"] <= task["finished_at"]

    r = orchestrator.http.get(f"/api/v1/tasks/{created['task_id']}/result")
    assert r.status_code == 200
    assert r.json()["result"]["message"] == "hello fleet"

    out = results_dir / created["task_id"]
    responses = json.loads((out / "responses.json").read_text())
    assert responses["status"] == "DONE"
    assert responses["result"] == task["result"]
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"]
    assert entry["path"] == "responses.json"
    data = (out / "responses.json").read_bytes()
    assert entry["size"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_500_tasks_two_workers_all_done_once_each_worker_shares(orchestrator, start_worker, rdb):
    start_worker("w1")
    start_worker("w2")
    ids: list[str] = []
    for start in range(0, 500, 100):  # 5 HTTP requests of 100 specs each
        ids += orchestrator.submit(*[echo(i) for i in range(start, start + 100)])
    assert len(set(ids)) == 500

    wait_until(
        lambda: rdb.zcard("tasks:status:DONE") == 500, timeout=90, what="500 tasks to be DONE"
    )
    tasks, cursor = [], None
    while True:
        page = orchestrator.http.get(
            "/api/v1/tasks", params={"limit": 200, **({"cursor": cursor} if cursor else {})}
        ).json()
        tasks += page["tasks"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(t["task_id"] for t in tasks) == sorted(ids)
    assert all(t["status"] == "DONE" and t["attempts"] == 1 for t in tasks)
    per_worker = Counter(t["worker_id"] for t in tasks)
    assert set(per_worker) == {"w1", "w2"}, per_worker
    assert min(per_worker.values()) > 0


def test_worker_runs_several_tasks_at_once(orchestrator, start_worker):
    start_worker("w1", WORKER_SLOTS="4")
    ids = orchestrator.submit(*[echo(i, delay=1.0) for i in range(4)])
    tasks = [orchestrator.wait(t) for t in ids]
    assert all(t["status"] == "DONE" for t in tasks)
    # All four were running at the same moment: each started before any finished.
    assert max(t["started_at"] for t in tasks) < min(t["finished_at"] for t in tasks)


def test_task_placed_while_worker_is_not_reading_still_reaches_it(orchestrator, start_worker):
    worker = start_worker("w1")
    worker.signal(signal.SIGSTOP)  # alive (heartbeat key still set) but reading nothing
    try:
        (task_id,) = orchestrator.submit(echo("late reader"))
        assert orchestrator.wait(task_id, ("DISPATCHED",))["worker_id"] == "w1"
    finally:
        worker.signal(signal.SIGCONT)
    task = orchestrator.wait(task_id)
    assert task["status"] == "DONE"
    assert task["attempts"] == 1


def test_orchestrator_killed_and_restarted_continues_from_redis(
    start_orchestrator, start_worker, rdb
):
    first: Orchestrator = start_orchestrator()
    ids = first.submit(*[echo(i) for i in range(20)])
    assert first.task(ids[0])["reason"] == "no worker is registered"
    first.signal(signal.SIGKILL)
    first.proc.wait()

    second: Orchestrator = start_orchestrator()
    start_worker("w1")
    tasks = [second.wait(t) for t in ids]
    assert [t["status"] for t in tasks] == ["DONE"] * 20
    assert all(t["attempts"] == 1 for t in tasks)


def test_workers_endpoint_lists_hardware_tags_executors_and_heartbeat(orchestrator, start_worker):
    start_worker("gpu-less", WORKER_TAGS="blue,fast", WORKER_COST_PER_HOUR="2.5")
    (w,) = orchestrator.http.get("/api/v1/workers").json()["workers"]
    assert w["worker_id"] == "gpu-less"
    assert w["alive"] is True
    assert w["status"] in ("idle", "busy")
    assert w["tags"] == ["blue", "fast"]
    assert w["executors"] == ["echo"]
    assert w["hardware"]["cpu_count"] >= 1
    assert w["hardware"]["memory_total"] > 0
    assert w["hardware"]["gpus"] == []  # no NVIDIA GPU here, and no error either
    assert w["cost_per_hour"] == 2.5
    assert w["seconds_since_heartbeat"] < 5
    wait_until(
        lambda: orchestrator.http.get("/api/v1/workers").json()["workers"][0]["cost_accrued"] > 0,
        what="accrued cost to be reported",
    )


PLUGIN = """
import os
from pydantic import BaseModel
from executors.base import Executor, PermanentError


class Crash(Executor):
    name = "crash"

    def run(self, task):
        os._exit(3)


class Boom(Executor):
    name = "boom"

    def run(self, task):
        raise PermanentError("model path /nowhere does not exist")


class ShoutOptions(BaseModel):
    text: str


class Shout(Executor):
    name = "shout"
    options = ShoutOptions

    def run(self, task):
        return {"text": task.options.text.upper()}
"""


@pytest.fixture
def plugin_path(install_plugin) -> str:
    """A third-party executor package, found through the entry-point group like any install."""
    return install_plugin(
        "fm_testplugin", PLUGIN, {"crash": "Crash", "boom": "Boom", "shout": "Shout"}
    )


def test_third_party_executor_and_crashing_executor_do_not_kill_the_worker(
    orchestrator, start_worker, plugin_path
):
    worker = start_worker(
        "w1", WORKER_EXECUTORS="echo,crash,boom,shout", PYTHONPATH=str(plugin_path)
    )
    wait_until(
        lambda: (
            "shout" in orchestrator.http.get("/api/v1/workers").json()["workers"][0]["executors"]
        ),
        what="plugin executors to be advertised",
    )
    crash, boom, shout = orchestrator.submit(
        {"spec": {"taskType": "crash", "maxAttempts": 1}},
        {"spec": {"taskType": "boom"}},
        {"spec": {"taskType": "shout", "shout": {"text": "quiet"}}},
    )
    crashed = orchestrator.wait(crash)
    assert crashed["status"] == "FAILED"
    assert crashed["error"]["kind"] == "crash"
    assert "exited with code 3" in crashed["error"]["message"]

    failed = orchestrator.wait(boom)
    assert failed["status"] == "FAILED"
    assert failed["error"]["kind"] == "permanent"
    assert "/nowhere" in failed["error"]["message"]

    assert orchestrator.wait(shout)["result"] == {"text": "QUIET"}
    assert worker.alive()
    # The crashed child is replaced: the same executor runs the next task.
    (after,) = orchestrator.submit(echo("still here"))
    assert orchestrator.wait(after)["status"] == "DONE"


def test_graceful_sigterm_finishes_running_task_and_deregisters(orchestrator, start_worker, rdb):
    worker = start_worker("w1")
    (task_id,) = orchestrator.submit(echo("slow", delay=1.5))
    orchestrator.wait(task_id, ("RUNNING",))
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0
    assert orchestrator.task(task_id)["status"] == "DONE"
    assert not rdb.sismember("workers:ids", "w1")
    assert rdb.hget("worker:w1", "status") == "stopped"
    assert not rdb.exists("worker:w1:heartbeat")
    workers = orchestrator.http.get("/api/v1/workers").json()["workers"]
    assert workers == []


def test_health_is_open_and_reports_redis(orchestrator):
    r = httpx.get(f"{orchestrator.url}/healthz")
    assert r.status_code == 200
    assert r.json()["redis"] == "ok"


def test_signal_to_the_whole_process_group_still_drains(orchestrator, start_worker):
    """`timeout`, systemd (KillMode=control-group) and container runtimes SIGTERM every
    process of the group, executor children too: the worker must still drain."""
    import os

    worker = start_worker("w1")
    (task_id,) = orchestrator.submit(echo("finish me", delay=1.5))
    orchestrator.wait(task_id, ("RUNNING",))
    os.killpg(os.getpgid(worker.proc.pid), signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0
    task = orchestrator.task(task_id)
    assert task["status"] == "DONE", task
    assert task["attempts"] == 1


def test_unicode_and_odd_characters_survive_submit_dispatch_and_settle(
    orchestrator, start_worker, results_dir
):
    start_worker("w1")
    message = {"text": 'héllo 😀 中文 "quoted" \\ back\nslash \u0000 nul', "n": 1.5e300}
    (task_id,) = orchestrator.submit(
        {"metadata": {"name": "naïve-ünïcode"}, **echo(message, maxAttempts=2)}
    )
    task = orchestrator.wait(task_id)
    assert task["status"] == "DONE", task
    assert task["result"]["message"] == message
    assert task["name"] == "naïve-ünïcode"
    assert task["spec"]["spec"]["echo"]["message"] == message
    responses = json.loads((results_dir / task_id / "responses.json").read_text())
    assert responses["result"]["message"] == message
