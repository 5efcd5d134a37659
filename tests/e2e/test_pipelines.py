"""Pipelines on a real fleet: stages, DAGs, templates, fan-out/fan-in, failures, cancel,
and the orchestrator killed mid-pipeline."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.conftest import wait_until


def submit(orchestrator, pipeline: dict, status: int = 201) -> dict:
    r = orchestrator.http.post("/api/v1/tasks", json=pipeline)
    assert r.status_code == status, r.text
    return r.json()


def wait_pipeline(orchestrator, pipeline_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = orchestrator.http.get(f"/api/v1/pipelines/{pipeline_id}", params={"wait": 5})
        assert r.status_code == 200, r.text
        view = r.json()
        if view["status"] != "RUNNING" or time.monotonic() > deadline:
            return view


def stage(view: dict, name: str) -> dict:
    return next(s for s in view["stages"] if s["name"] == name)


def test_chain_passes_results_between_stages(orchestrator, start_worker):
    start_worker("w1")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "metadata": {"name": "chain"},
            "spec": {
                "params": {"greeting": "hello"},
                "taskType": "echo",
                "stages": [
                    {"name": "first", "spec": {"echo": {"message": "${params.greeting}"}}},
                    {
                        "name": "second",
                        "spec": {"echo": {"message": "${first.result.message} world"}},
                    },
                    {
                        "name": "third",
                        "spec": {"data": {"items": ["${second.task_id}", "${second.result}"]}},
                    },
                ],
            },
        },
    )
    done = wait_pipeline(orchestrator, view["pipeline_id"])
    assert done["status"] == "DONE", done
    second = stage(done, "second")
    assert second["inputs"] == {"spec.echo.message": "hello world"}
    third_task = orchestrator.wait(stage(done, "third")["tasks"][0]["task_id"])
    assert third_task["result"]["items"][0] == second["tasks"][0]["task_id"]
    assert third_task["result"]["items"][1]["message"] == "hello world"
    assert third_task["pipeline"] == {
        "pipeline_id": view["pipeline_id"],
        "stage": "third",
        "item": None,
    }


def test_graph_fans_out_and_in_in_item_order(orchestrator, start_worker):
    start_worker("w1", WORKER_SLOTS="8")
    start_worker("w2", WORKER_SLOTS="8")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "metadata": {"name": "fan"},
            "spec": {
                "params": {"words": ["alpha", "beta", "gamma", "delta", "epsilon"]},
                "taskType": "echo",
                "graph": {
                    "nodes": [
                        {"name": "split", "spec": {"data": {"items": "${params.words}"}}},
                        {
                            "name": "segments",
                            "forEach": "${split.result.items}",
                            # later items finish first: fan-in must still keep item order
                            "spec": {"echo": {"message": "${index}:${item}", "delaySec": 0.0}},
                        },
                        {
                            "name": "lengths",
                            "forEach": [3, 1, 2],
                            "spec": {"echo": {"message": "${item}", "delaySec": "${item}"}},
                            "dependsOn": [],
                        },
                        {
                            "name": "stitch",
                            "spec": {
                                "data": {"items": "${segments.results[*].message}"},
                                "echo": {"message": "${lengths.results[*].message}"},
                            },
                        },
                    ]
                },
            },
        },
    )
    pid = view["pipeline_id"]
    # A graph node waits only for what it names or reads: lengths and split start at once.
    assert {s["name"]: s["state"] for s in view["stages"]} == {
        "split": "running",
        "lengths": "running",
        "segments": "waiting",
        "stitch": "waiting",
    }
    done = wait_pipeline(orchestrator, pid)
    assert done["status"] == "DONE", done
    segments = stage(done, "segments")
    assert segments["task_count"] == 5 and segments["task_states"] == {"DONE": 5}
    assert [t["item"] for t in segments["tasks"]] == [0, 1, 2, 3, 4]
    assert stage(done, "stitch")["depends_on"] == ["segments", "lengths"]
    stitch = orchestrator.wait(stage(done, "stitch")["tasks"][0]["task_id"])
    assert stitch["result"]["items"] == ["0:alpha", "1:beta", "2:gamma", "3:delta", "4:epsilon"]
    assert stitch["result"]["message"] == [3, 1, 2]
    # Each item is a task of its own, with its id, status and attempts.
    one = orchestrator.wait(segments["tasks"][3]["task_id"])
    assert one["status"] == "DONE" and one["attempts"] == 1
    assert one["pipeline"]["item"] == 3 and one["pipeline"]["stage"] == "segments"
    listed = orchestrator.http.get("/api/v1/pipelines", params={"status": "DONE"}).json()
    assert pid in [p["pipeline_id"] for p in listed["pipelines"]]


@pytest.mark.parametrize(
    ("spec", "loc", "words"),
    [
        (
            {"stages": [{"name": "a", "spec": {"taskType": "echo"}}, {"name": "a"}]},
            "spec.stages[1].name",
            "used twice",
        ),
        (
            {"graph": {"nodes": [{"name": "a", "dependsOn": ["b"], "spec": {"taskType": "echo"}}]}},
            "spec.graph.nodes[0].dependsOn",
            "not a stage",
        ),
        (
            {
                "taskType": "echo",
                "graph": {
                    "nodes": [
                        {"name": "a", "dependsOn": "c"},
                        {"name": "b", "dependsOn": "a"},
                        {"name": "c", "spec": {"echo": {"message": "${b.result.message}"}}},
                    ]
                },
            },
            "spec.graph.nodes[0].dependsOn",
            "a -> c -> b -> a",
        ),
        (
            {
                "taskType": "echo",
                "stages": [
                    {"name": "a"},
                    {"name": "b", "spec": {"echo": {"message": "${train.result.message}"}}},
                ],
            },
            "spec.stages[1].spec.echo.message",
            "names stage 'train'",
        ),
        (
            {
                "taskType": "echo",
                "stages": [
                    {"name": "a"},
                    {
                        "name": "b",
                        "spec": {"echo": {"message": "${a.result.final_lora_archive_url}"}},
                    },
                ],
            },
            "spec.stages[1].spec.echo.message",
            "echo task's result has no field 'final_lora_archive_url'",
        ),
        (
            {"taskType": "echo", "stages": [{"name": "a", "spec": {"priority": "${params.p}"}}]},
            "spec.stages[0]",
            "no parameter 'p'",
        ),
        (
            {
                "taskType": "echo",
                "stages": [{"name": "a", "spec": {"echo": {"message": "${item}"}}}],
            },
            "spec.stages[0].spec.echo.message",
            "only defined in a stage with forEach",
        ),
        (
            {"taskType": "echo", "stages": [{"name": "a", "spec": {"echo": {"delaySec": "x"}}}]},
            "spec.stages[0].spec.echo.delaySec",
            "valid number",
        ),
        (
            {"taskType": "echo", "stages": [{"name": "a", "onUpstreamFailure": "maybe"}]},
            "spec.stages[0].onUpstreamFailure",
            "'fail', 'skip' or 'run'",
        ),
        (
            {
                "taskType": "echo",
                "params": {"n": 5},
                "stages": [{"name": "a", "forEach": "${params.n}"}],
            },
            "spec.stages[0].forEach",
            "forEach is a list, or one template giving a list; got a number",
        ),
        (
            {
                "taskType": "echo",
                "stages": [{"name": "a"}, {"name": "b", "forEach": ["${a.task_id}"]}],
            },
            "spec.stages[1].forEach",
            "items are used as they are",
        ),
        (
            {"taskType": "echo", "stages": [{"name": "params"}]},
            "spec.stages[0].name",
            "cannot name a stage",
        ),
        (
            {
                "taskType": "echo",
                "stages": [{"name": "a", "spec": {"echo": {"message": "${a.result"}}}],
            },
            "spec.stages[0]",
            "opens a ${ it never closes",
        ),
        (
            # a fan-in template in a list field must not hide the executor's own checks
            {
                "taskType": "echo",
                "stages": [
                    {"name": "a"},
                    {
                        "name": "b",
                        "spec": {
                            "data": {"items": "${a.results[*].message}"},
                            "echo": {"mesage": "typo"},
                        },
                    },
                ],
            },
            "spec.stages[1].spec.echo.mesage",
            "Extra inputs are not permitted",
        ),
        (
            # a known item is checked where it lands
            {
                "taskType": "echo",
                "stages": [{"name": "a", "forEach": [5000], "spec": {"priority": "${item}"}}],
            },
            "spec.stages[0].spec.priority",
            "less than or equal to 1000",
        ),
        (
            {
                "taskType": "echo",
                "stages": [{"name": "a", "forEach": ["echo"], "spec": {"taskType": "${item}"}}],
            },
            "spec.stages[0].spec.taskType",
            "taskType cannot be a template",
        ),
    ],
)
def test_bad_pipelines_are_refused_naming_stage_and_field(orchestrator, rdb, spec, loc, words):
    before = rdb.zcard("tasks:all")
    body = submit(orchestrator, {"kind": "Pipeline", "spec": spec}, status=422)
    assert any(e["loc"] == loc and words in e["msg"] for e in body["errors"]), body
    assert rdb.zcard("pipelines:all") == 0
    assert rdb.zcard("tasks:all") == before


def test_a_task_key_is_not_a_pipeline_key(orchestrator, rdb):
    headers = {"Idempotency-Key": "shared-key"}
    r = orchestrator.http.post(
        "/api/v1/tasks", json={"spec": {"taskType": "echo"}}, headers=headers
    )
    assert r.status_code == 201
    pipeline = {"kind": "Pipeline", "spec": {"taskType": "echo", "stages": [{"name": "a"}]}}
    r = orchestrator.http.post("/api/v1/pipelines", json=pipeline, headers=headers)
    assert r.status_code == 422 and "already used" in r.json()["detail"]
    assert rdb.zcard("pipelines:all") == 0
    again = orchestrator.http.post(
        "/api/v1/tasks", json={"spec": {"taskType": "echo"}}, headers=headers
    )
    assert again.status_code == 200 and again.json()["idempotent_replay"] is True


def test_a_stage_whose_task_vanished_from_redis_fails_instead_of_waiting_for_ever(
    start_orchestrator, start_worker, rdb
):
    orchestrator = start_orchestrator(FLOWMESH_PIPELINE_SCAN_SEC="0.2")
    start_worker("w1")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "spec": {
                "taskType": "echo",
                "stages": [{"name": "a", "spec": {"echo": {"delaySec": 30}}}, {"name": "b"}],
            },
        },
    )
    task_id = stage(view, "a")["tasks"][0]["task_id"]
    orchestrator.wait(task_id, statuses=("RUNNING",))
    rdb.delete(f"task:{task_id}")
    done = wait_pipeline(orchestrator, view["pipeline_id"], timeout=20)
    assert done["status"] == "FAILED"
    assert f"task {task_id} is no longer in Redis" in stage(done, "a")["reason"]
    assert stage(done, "b")["reason"] == "upstream a failed"
    assert rdb.scard("pipelines:active") == 0


def test_failed_stage_fails_skips_or_runs_its_dependants(orchestrator, start_worker):
    start_worker("w1")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "spec": {
                "taskType": "echo",
                "graph": {
                    "nodes": [
                        {"name": "prepare"},
                        {
                            "name": "train",
                            "dependsOn": "prepare",
                            "spec": {"echo": {"fail": "loss is NaN"}, "maxAttempts": 2},
                        },
                        {"name": "serve", "dependsOn": "train"},
                        {"name": "after_serve", "dependsOn": "serve", "onUpstreamFailure": "run"},
                        {"name": "report", "dependsOn": "train", "onUpstreamFailure": "skip"},
                        {"name": "after_report", "dependsOn": "report"},
                        {
                            "name": "cleanup",
                            "dependsOn": "train",
                            "onUpstreamFailure": "run",
                            "spec": {"echo": {"message": "${train.status}"}},
                        },
                        {
                            "name": "uses_result",
                            "dependsOn": "train",
                            "onUpstreamFailure": "run",
                            "spec": {"echo": {"message": "${train.result.message}"}},
                        },
                    ]
                },
            },
        },
    )
    done = wait_pipeline(orchestrator, view["pipeline_id"])
    assert done["status"] == "FAILED"
    states = {s["name"]: (s["state"], s["reason"]) for s in done["stages"]}
    assert states["prepare"] == ("done", None)
    assert states["train"][0] == "failed" and "loss is NaN" in states["train"][1]
    assert states["serve"] == ("failed", "upstream train failed")
    assert states["after_serve"][0] == "done"  # it runs whatever serve did
    assert states["report"] == ("skipped", "upstream train failed")
    assert states["after_report"] == ("skipped", "upstream report was skipped")
    assert states["cleanup"][0] == "done"
    cleanup = orchestrator.wait(stage(done, "cleanup")["tasks"][0]["task_id"])
    assert cleanup["result"]["message"] == "FAILED"
    assert states["uses_result"][0] == "failed"
    assert "has no result: it is failed" in states["uses_result"][1]
    train = orchestrator.wait(stage(done, "train")["tasks"][0]["task_id"])
    assert train["status"] == "FAILED" and train["attempts"] == 1  # permanent: not retried
    assert stage(done, "serve")["tasks"] == []  # never ran


def test_a_value_that_resolves_to_nothing_fails_the_stage_clearly(orchestrator, start_worker):
    start_worker("w1")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "spec": {
                "taskType": "echo",
                "stages": [
                    {"name": "a", "spec": {"data": {"items": [1, 2]}}},
                    {"name": "b", "spec": {"echo": {"message": "${a.result.items[5]}"}}},
                    {"name": "c", "spec": {"echo": {"message": "${a.result.message}"}}},
                ],
            },
        },
    )
    done = wait_pipeline(orchestrator, view["pipeline_id"])
    b = stage(done, "b")
    assert b["state"] == "failed"
    assert (
        "spec.echo.message" in b["reason"] and "has 2 item(s); [5] is past its end" in b["reason"]
    )
    # a's message is null: a value that resolves to null fails too, naming it
    assert stage(done, "c")["state"] == "failed"
    assert stage(done, "c")["reason"] == "upstream b failed"


def test_cancel_pipeline_cancels_every_unfinished_stage(orchestrator, start_worker):
    start_worker("w1")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "spec": {
                "taskType": "echo",
                "graph": {
                    "nodes": [
                        {"name": "quick"},
                        {"name": "slow", "forEach": [1, 2], "spec": {"echo": {"delaySec": 60}}},
                        {"name": "after", "dependsOn": ["slow"]},
                    ]
                },
            },
        },
    )
    pid = view["pipeline_id"]

    def ready(view: dict) -> bool:
        slow = stage(view, "slow")["task_states"].get("RUNNING") == 2
        return slow and stage(view, "quick")["state"] == "done"

    wait_until(lambda: ready(orchestrator.http.get(f"/api/v1/pipelines/{pid}").json()), timeout=20)
    r = orchestrator.http.post(f"/api/v1/pipelines/{pid}/cancel")
    assert r.status_code == 200, r.text
    done = wait_pipeline(orchestrator, pid, timeout=20)
    assert done["status"] == "CANCELLED"
    assert stage(done, "quick")["state"] == "done"
    assert stage(done, "slow")["state"] == "cancelled"
    assert stage(done, "slow")["task_states"] == {"CANCELLED": 2}
    assert stage(done, "after")["state"] == "cancelled"
    assert orchestrator.http.post(f"/api/v1/pipelines/{pid}/cancel").status_code == 409


def test_wait_timeout_fails_a_stage_whose_upstream_takes_too_long(start_orchestrator, start_worker):
    orchestrator = start_orchestrator(FLOWMESH_PIPELINE_SCAN_SEC="0.2")
    start_worker("w1")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "spec": {
                "taskType": "echo",
                "stages": [
                    {"name": "slow", "spec": {"echo": {"delaySec": 30}}},
                    {"name": "next", "waitTimeoutSec": 1},
                ],
            },
        },
    )
    pid = view["pipeline_id"]
    wait_until(
        lambda: (
            stage(orchestrator.http.get(f"/api/v1/pipelines/{pid}").json(), "next")["state"]
            == "failed"
        ),
        timeout=20,
    )
    nxt = stage(orchestrator.http.get(f"/api/v1/pipelines/{pid}").json(), "next")
    assert (
        nxt["reason"]
        == "waited more than 1 s (waitTimeoutSec) for upstream stage(s) slow (running)"
    )
    slow = orchestrator.task(stage(view, "slow")["tasks"][0]["task_id"])
    assert slow["status"] == "RUNNING" and slow["attempts"] == 1


def test_orchestrator_sigkilled_mid_pipeline_finishes_with_each_stage_run_once(
    start_orchestrator, start_worker, rdb
):
    """Killed after the pipeline is stored but before its first stage is released, then
    after a stage's task ended (its event read and acked) but before the next stage is
    released, then while a fan-out runs: each restarted orchestrator rebuilds what is due
    from task state alone, and every stage runs once."""
    pause = "pipeline_release:30"
    orch = start_orchestrator(FLOWMESH_FAILPOINTS=pause)
    start_worker("w1", WORKER_SLOTS="4")
    start_worker("w2", WORKER_SLOTS="4")
    pipeline = {
        "kind": "Pipeline",
        "spec": {
            "taskType": "echo",
            "stages": [
                {"name": "first", "spec": {"echo": {"message": "0"}}},
                {"name": "second", "spec": {"echo": {"message": "${first.result.message}1"}}},
                {
                    "name": "fan",
                    "forEach": [0, 1, 2, 3, 4, 5],
                    "spec": {
                        "echo": {"message": "${second.result.message}-${item}", "delaySec": 1.0}
                    },
                },
                {"name": "join", "spec": {"data": {"items": "${fan.results[*].message}"}}},
            ],
        },
    }
    before = rdb.zcard("tasks:all")

    def killed_at(orch, stage_name):
        wait_until(lambda: f"before releasing stage {stage_name}" in orch.log(), timeout=30)
        orch.signal(signal.SIGKILL)
        orch.proc.wait()

    # 1. The submit is answered only after the first release, which never comes.
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{orch.url}/api/v1/tasks", json=pipeline, timeout=httpx.Timeout(30, read=1))
    killed_at(orch, "first")
    (pid,) = rdb.zrange("pipelines:all", 0, -1)
    assert rdb.zcard("tasks:all") == before  # stored, nothing released
    # 2. This one releases `first` after its pause; killed before releasing `second`,
    # after first's task.finished event was read and acked.
    orch = start_orchestrator(FLOWMESH_FAILPOINTS="pipeline_release:2")
    killed_at(orch, "second")
    # 3. No failpoint: killed while the fan-out runs.
    orch = start_orchestrator()
    wait_until(
        lambda: stage(orch.http.get(f"/api/v1/pipelines/{pid}").json(), "fan")["task_count"] == 6,
        timeout=30,
    )
    orch.signal(signal.SIGKILL)
    orch.proc.wait()
    orch = start_orchestrator()
    done = wait_pipeline(orch, pid, timeout=60)
    assert done["status"] == "DONE", done
    counts = {s["name"]: s["task_count"] for s in done["stages"]}
    assert counts == {"first": 1, "second": 1, "fan": 6, "join": 1}
    assert rdb.zcard("tasks:all") == before + 9  # each stage released once
    for s in done["stages"]:
        for t in s["tasks"]:
            assert t["status"] == "DONE" and t["attempts"] == 1, t
    join = orch.wait(stage(done, "join")["tasks"][0]["task_id"])
    assert join["result"]["items"] == [f"01-{i}" for i in range(6)]


def test_a_stage_prefers_the_worker_holding_its_input_and_says_why(orchestrator, start_worker):
    """Locality is a soft score after a warm model, before load: w1 ran `produce` and is
    busier than w2, so load alone would pick w2, but `consume`, which reads produce's
    output, goes to w1, and its status says why."""
    start_worker("w1", WORKER_SLOTS="4")
    view = submit(
        orchestrator,
        {
            "kind": "Pipeline",
            "spec": {
                "taskType": "echo",
                "stages": [
                    {"name": "produce", "spec": {"echo": {"message": "weights", "delaySec": 3}}},
                    # where produce's files are: on the disk of the worker that ran it
                    {"name": "consume", "spec": {"echo": {"message": "${produce.outputs_dir}"}}},
                ],
            },
        },
    )
    busy = orchestrator.submit(*[{"spec": {"taskType": "echo", "echo": {"delaySec": 30}}}] * 2)
    for task_id in busy:
        orchestrator.wait(task_id, statuses=("RUNNING",))
    start_worker("w2", WORKER_SLOTS="4")  # idle: the least loaded from here on
    done = wait_pipeline(orchestrator, view["pipeline_id"])
    assert done["status"] == "DONE"
    consumer = orchestrator.task(stage(done, "consume")["tasks"][0]["task_id"])
    assert consumer["worker_id"] == "w1"
    assert consumer["placed_because"] == "w1 holds the outputs of stage produce"
    assert consumer["result"]["message"].endswith(
        f"/{stage(done, 'produce')['tasks'][0]['task_id']}"
    )
    # Without a pipeline input, the same task goes by load: to w2.
    (plain,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    assert orchestrator.wait(plain)["worker_id"] == "w2"


def test_idempotency_key_replays_a_pipeline_and_refuses_another(orchestrator, rdb):
    pipeline = {"kind": "Pipeline", "spec": {"taskType": "echo", "stages": [{"name": "a"}]}}
    headers = {"Idempotency-Key": "nightly-2026-11-30"}
    first = orchestrator.http.post("/api/v1/pipelines", json=pipeline, headers=headers)
    assert first.status_code == 201, first.text
    again = orchestrator.http.post("/api/v1/tasks", json=pipeline, headers=headers)
    assert again.status_code == 200 and again.json()["idempotent_replay"] is True
    assert again.json()["pipeline_id"] == first.json()["pipeline_id"]
    other = {"kind": "Pipeline", "spec": {"taskType": "echo", "stages": [{"name": "b"}]}}
    refused = orchestrator.http.post("/api/v1/pipelines", json=other, headers=headers)
    assert refused.status_code == 422 and "already used" in refused.json()["detail"]
    assert rdb.zcard("pipelines:all") == 1
    # A pipeline in a batch of tasks, and a task sent to the pipelines route, are refused.
    mixed = orchestrator.http.post("/api/v1/tasks", json=[{"spec": {"taskType": "echo"}}, pipeline])
    assert mixed.status_code == 422 and "submitted alone" in mixed.text
    task = orchestrator.http.post("/api/v1/pipelines", json={"spec": {"taskType": "echo"}})
    assert task.status_code == 422 and "not a pipeline" in task.text
    empty = orchestrator.http.post("/api/v1/pipelines", json=[])
    assert empty.status_code == 422 and "not a pipeline" in empty.text
