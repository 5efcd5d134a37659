"""The executor interface through a real fleet: third-party options validated at submit,
an async executor that batches concurrent tasks and aborts one of them alone, a fresh
process per task, executor states, and the files an attempt leaves."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_until

# A third-party package, as a user would write it (the options model and the executor
# together are under 30 lines: Greet), plus test executors.
PLUGIN = """
import asyncio, os
from pydantic import BaseModel, Field
from executors.base import Executor


class GreetOptions(BaseModel):
    name: str = Field(min_length=1)
    times: int = Field(1, ge=1, le=3)


class Greet(Executor):
    name = "greet"
    options = GreetOptions

    def run(self, task):
        text = " ".join([f"hello {task.options.name}"] * task.options.times)
        task.artifacts_dir.mkdir(parents=True)
        (task.artifacts_dir / "greeting.txt").write_text(text)
        task.log.info("greeted %s", task.options.name)
        return {"greeting": text, "artifacts": ["greeting.txt"]}


class BatchOptions(BaseModel):
    value: int
    holdSec: float = 0.0


class Batcher(Executor):
    '''Collects the requests that arrive within 0.5 s into one batch, "generates" for
    holdSec, and answers every request still waiting, as an engine with continuous
    batching would; a cancelled request is aborted alone.'''

    name = "batcher"
    options = BatchOptions
    max_concurrency = 64

    def setup(self, config):
        self.pending, self.batches, self.flusher = [], 0, None

    async def arun(self, task):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((task.options, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._batch())
        try:
            return {**await future, "pid": os.getpid()}
        except asyncio.CancelledError:
            task.log.info("request aborted")
            raise

    async def _batch(self):
        await asyncio.sleep(0.5)
        batch, self.pending = self.pending, []
        self.batches += 1
        await asyncio.sleep(max(o.holdSec for o, _ in batch))
        live = [f for _, f in batch if not f.done()]
        for options, future in batch:
            if not future.done():
                future.set_result(
                    {"batch": self.batches, "size": len(batch), "aborted": len(batch) - len(live)}
                )


class Isolated(Executor):
    name = "isolated"
    isolation = "task"

    def run(self, task):
        return {"pid": os.getpid()}


class Flaky(Executor):
    name = "flaky"

    def run(self, task):
        task.log.info("attempt %d", task.attempt)
        if task.attempt == 1:
            raise RuntimeError("transient failure")
        task.artifacts_dir.mkdir(parents=True)
        (task.artifacts_dir / "out.txt").write_text("second time lucky")
        return {"attempt": task.attempt}


class Serial(Executor):
    '''One task at a time; the others wait their turn inside the process.'''

    name = "serial"
    options = BatchOptions

    def run(self, task):
        task.cancelled.wait(task.options.holdSec)
        return {"pid": os.getpid(), "value": task.options.value}


class Broken(Executor):
    name = "broken"

    def setup(self, config):
        raise RuntimeError("licence server unreachable")

    def run(self, task):
        return {}
"""


@pytest.fixture
def plugin(install_plugin) -> str:
    return install_plugin(
        "fm_execplugin",
        PLUGIN,
        {
            "greet": "Greet",
            "batcher": "Batcher",
            "isolated": "Isolated",
            "flaky": "Flaky",
            "serial": "Serial",
            "broken": "Broken",
        },
    )


def errors(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {e["loc"]: e["msg"] for e in response.json()["errors"]}


def test_third_party_options_are_validated_at_submit_and_reach_the_executor(
    start_orchestrator, start_worker, plugin, results_dir, rdb
):
    orchestrator = start_orchestrator(PYTHONPATH=plugin)
    start_worker("w1", WORKER_EXECUTORS="echo,greet", PYTHONPATH=plugin)
    bad = orchestrator.http.post(
        "/api/v1/tasks",
        json=[
            {"spec": {"taskType": "greet", "greet": {"name": "", "times": 9}}},
            {"spec": {"taskType": "greet", "greet": {"name": "x", "louder": True}}},
            {"spec": {"taskType": "greet", "echo": {"message": "hi"}}},
            {"spec": {"taskType": "echo", "echo": {"delaySec": "soon"}, "training": {}}},
        ],
    )
    problems = errors(bad)
    assert set(problems) == {
        "[0].spec.greet.name",
        "[0].spec.greet.times",
        "[1].spec.greet.louder",
        "[2].spec.echo",
        "[2].spec.greet.name",  # required, and its section is missing
        "[3].spec.echo.delaySec",
        "[3].spec.training",
    }
    assert "spec.greet" in problems["[2].spec.echo"]
    assert rdb.zcard("tasks:all") == 0  # nothing of a refused batch is stored

    (task_id,) = orchestrator.submit({"spec": {"taskType": "greet", "greet": {"name": "ada"}}})
    task = orchestrator.wait(task_id)
    assert task["status"] == "DONE", task
    assert task["result"]["greeting"] == "hello ada"
    task_dir = results_dir / task_id
    assert (task_dir / "artifacts" / "greeting.txt").read_text() == "hello ada"
    assert "greeted ada" in (task_dir / "logs" / "executor.log").read_text()
    manifest = json.loads((task_dir / "manifest.json").read_text())
    assert manifest["attempt"] == 1
    assert {f["path"] for f in manifest["files"]} == {
        "responses.json",
        "artifacts/greeting.txt",
        "logs/executor.log",
    }


def test_async_executor_gets_concurrent_tasks_as_one_batch_and_aborts_one_alone(
    orchestrator, start_worker, plugin, results_dir
):
    worker = start_worker("w1", WORKER_EXECUTORS="batcher", WORKER_SLOTS="8", PYTHONPATH=plugin)
    ids = orchestrator.submit(
        *(
            {"spec": {"taskType": "batcher", "batcher": {"value": i, "holdSec": 3}}}
            for i in range(6)
        )
    )
    for task_id in ids:
        orchestrator.wait(task_id, ("RUNNING",))
    victim = ids[2]
    assert orchestrator.http.post(f"/api/v1/tasks/{victim}/cancel").status_code == 200
    assert orchestrator.wait(victim)["status"] == "CANCELLED"

    results = [orchestrator.wait(t) for t in ids if t != victim]
    assert all(r["status"] == "DONE" for r in results), results
    # One batch for all six, one of them aborted inside the engine, the rest answered.
    assert {(r["result"]["batch"], r["result"]["size"]) for r in results} == {(1, 6)}
    assert {r["result"]["aborted"] for r in results} == {1}
    pids = {r["result"]["pid"] for r in results}
    assert len(pids) == 1
    # The child was neither killed nor restarted: the next task runs in the same process.
    (after,) = orchestrator.submit({"spec": {"taskType": "batcher", "batcher": {"value": 7}}})
    assert orchestrator.wait(after)["result"]["pid"] in pids
    assert "killed on purpose" not in worker.log()
    # The cancelled attempt's files are kept beside, never on top.
    victim_dir = results_dir / victim
    assert not (victim_dir / "responses.json").exists()
    kept = json.loads((victim_dir / "attempts" / "1" / "responses.json").read_text())
    assert kept["error"]["kind"] == "cancelled"
    assert (
        "request aborted" in (victim_dir / "attempts" / "1" / "logs" / "executor.log").read_text()
    )


def test_task_isolation_runs_each_task_in_a_fresh_process_that_exits(
    orchestrator, start_worker, plugin
):
    start_worker("w1", WORKER_EXECUTORS="isolated", PYTHONPATH=plugin)
    pids = []
    for _ in range(2):
        (task_id,) = orchestrator.submit({"spec": {"taskType": "isolated"}})
        task = orchestrator.wait(task_id)
        assert task["status"] == "DONE", task
        pids.append(task["result"]["pid"])
    assert pids[0] != pids[1]
    wait_until(
        lambda: not any(psutil.pid_exists(p) for p in pids),
        what="each task's process to exit (its memory returned)",
    )


def test_executor_states_show_in_the_api_and_a_failed_executor_holds_only_its_tasks(
    orchestrator, start_worker, plugin
):
    start_worker("w1", WORKER_EXECUTORS="echo,broken", PYTHONPATH=plugin, wait=False)

    def states():
        workers = orchestrator.http.get("/api/v1/workers").json()["workers"]
        return workers[0]["executor_states"] if workers else {}

    failed = wait_until(
        lambda: (s := states()).get("broken", {}).get("state") == "failed" and s,
        what="the broken executor to be reported failed",
    )
    assert "licence server unreachable" in failed["broken"]["reason"]
    wait_until(lambda: states()["echo"]["state"] == "ready", what="echo to be ready")
    stuck, fine = orchestrator.submit(
        {"spec": {"taskType": "broken"}}, {"spec": {"taskType": "echo"}}
    )
    assert orchestrator.wait(fine)["status"] == "DONE"
    task = wait_until(
        lambda: "licence" in ((t := orchestrator.task(stuck)).get("reason") or "") and t,
        what="the pending task to say why it waits",
    )
    assert task["status"] == "PENDING"
    assert task["attempts"] == 0


def test_the_attempt_that_counts_is_on_top_and_the_failed_one_is_kept_beside_it(
    orchestrator, start_worker, plugin, results_dir
):
    start_worker("w1", WORKER_EXECUTORS="flaky", PYTHONPATH=plugin)
    (task_id,) = orchestrator.submit({"spec": {"taskType": "flaky", "retryBackoffSec": 0}})
    task = orchestrator.wait(task_id)
    assert task["status"] == "DONE" and task["attempts"] == 2, task
    top = results_dir / task_id
    assert json.loads((top / "responses.json").read_text())["attempt"] == 2
    manifest = json.loads((top / "manifest.json").read_text())
    assert (manifest["attempt"], manifest["earlier_attempts"]) == (2, [1])
    assert (top / "artifacts" / "out.txt").read_text() == "second time lucky"
    assert "attempt 2" in (top / "logs" / "executor.log").read_text()
    first = top / "attempts" / "1"
    failed = json.loads((first / "responses.json").read_text())
    assert failed["error"]["message"] == "transient failure"
    assert "attempt 1" in (first / "logs" / "executor.log").read_text()


def test_the_orchestrator_validates_options_without_loading_torch(start_orchestrator):
    orchestrator = start_orchestrator()
    r = orchestrator.http.post(
        "/api/v1/tasks",
        json={
            "spec": {
                "taskType": "inference",
                "model": {"source": {"identifier": "org/model"}},
                "data": {"items": ["hi"]},
                "inference": {"temperature": 99},
            }
        },
    )
    assert errors(r) == {"spec.inference.temperature": "Input should be less than or equal to 10"}
    maps = Path(f"/proc/{orchestrator.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps


def test_cancelling_a_task_that_waits_its_turn_in_the_process_kills_nothing(
    orchestrator, start_worker, plugin
):
    worker = start_worker(
        "w1",
        WORKER_EXECUTORS="serial",
        WORKER_SLOTS="3",
        WORKER_CANCEL_GRACE_SEC="1",
        PYTHONPATH=plugin,
    )
    first, waiting = orchestrator.submit(
        {"spec": {"taskType": "serial", "serial": {"value": 1, "holdSec": 4}}},
        {"spec": {"taskType": "serial", "serial": {"value": 2, "holdSec": 4}}},
    )
    orchestrator.wait(waiting, ("RUNNING",))  # placed and sent to the busy process
    assert orchestrator.http.post(f"/api/v1/tasks/{waiting}/cancel").status_code == 200
    assert orchestrator.wait(waiting)["status"] == "CANCELLED"
    done = orchestrator.wait(first)
    assert done["status"] == "DONE" and done["attempts"] == 1, done
    assert "killed on purpose" not in worker.log()


def test_a_tasks_timeout_counts_from_when_its_process_begins_it_not_while_it_waits_its_turn(
    orchestrator, start_worker, plugin
):
    """Three tasks reach a one-at-a-time executor together. Each may run 3 s; the second
    waits ~2 s for the first, then runs 2 s: it must not time out. The third overruns its
    own 3 s once begun and does."""
    start_worker("w1", WORKER_EXECUTORS="serial", WORKER_SLOTS="3", PYTHONPATH=plugin)

    def serial(value: int, hold: float) -> dict:
        return {
            "spec": {
                "taskType": "serial",
                "serial": {"value": value, "holdSec": hold},
                "timeoutSec": 3,
                "maxAttempts": 1,
            }
        }

    first, second, third = orchestrator.submit(serial(1, 2), serial(2, 2), serial(3, 30))
    for task_id in (first, second, third):
        orchestrator.wait(task_id, ("RUNNING", "DONE", "FAILED"))  # all three in the process
    assert orchestrator.wait(first)["status"] == "DONE"
    done = orchestrator.wait(second)
    assert done["status"] == "DONE", done
    assert done["result"]["value"] == 2
    assert done["finished_at"] - done["started_at"] > 3  # it did wait its turn
    overran = orchestrator.wait(third, timeout=40)
    assert overran["status"] == "FAILED" and overran["error"]["kind"] == "timeout", overran
    assert overran["finished_at"] - overran["started_at"] > 4  # its clock began after second


def test_the_api_shows_a_traceback_without_the_workers_paths_and_the_log_has_it_whole(
    orchestrator, start_worker, plugin
):
    worker = start_worker("w1", WORKER_EXECUTORS="flaky", PYTHONPATH=plugin)
    (task_id,) = orchestrator.submit({"spec": {"taskType": "flaky", "maxAttempts": 1}})
    task = orchestrator.wait(task_id)
    assert task["status"] == "FAILED"
    shown = task["error"]["traceback"]
    assert "RuntimeError: transient failure" in shown
    assert plugin not in shown and '"plugin-fm_execplugin/fm_execplugin.py"' in shown
    wait_until(lambda: f"{plugin}/fm_execplugin.py" in worker.log(), what="the whole traceback")
