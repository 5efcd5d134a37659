"""The HTTP API's contract: bad input named precisely and never stored, auth, listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from executors.registry import entry_points_by_name
from flowmesh.client import ApiError, Client
from flowmesh.spec import task_type_of
from tests.conftest import ROOT, wait_until


def post(orch, body: str | bytes, content_type: str = "application/yaml") -> httpx.Response:
    return orch.http.post("/api/v1/tasks", content=body, headers={"Content-Type": content_type})


def nothing_stored(rdb) -> bool:
    return rdb.zcard("tasks:all") == 0 and not rdb.keys("task:*")


def test_malformed_yaml_is_400_with_the_line(orchestrator, rdb):
    r = post(orchestrator, "spec:\n  taskType: echo\n  echo: {message: [unclosed\n")
    assert r.status_code == 400
    assert "malformed YAML" in r.json()["detail"]
    assert "line" in r.json()["detail"]
    assert nothing_stored(rdb)


def test_malformed_json_is_400(orchestrator, rdb):
    r = post(orchestrator, '{"spec": {"taskType": "echo",}', "application/json")
    assert r.status_code == 400
    assert "malformed JSON at line 1" in r.json()["detail"]
    assert nothing_stored(rdb)


NO_EXECUTOR = "no executor {!r} is installed here or offered by any registered worker; "


def test_a_type_no_executor_runs_is_422_listing_the_executors_that_exist(orchestrator, rdb):
    r = post(orchestrator, "spec:\n  taskType: teleport\n")
    assert r.status_code == 422
    (err,) = r.json()["errors"]
    assert err["loc"] == "spec.taskType"
    installed = ", ".join(sorted({task_type_of(n) for n in entry_points_by_name()}))
    assert err["msg"] == NO_EXECUTOR.format("teleport") + f"available: {installed}"
    # A catalogue type is refused too until its executor exists: it would wait forever.
    r = post(orchestrator, "spec:\n  taskType: rag\n")
    assert r.status_code == 422
    (err,) = r.json()["errors"]
    assert err["loc"] == "spec.taskType"
    assert err["msg"].startswith(NO_EXECUTOR.format("rag") + f"available: {installed} (")
    assert "'rag' is a planned catalogue type" in err["msg"]
    assert nothing_stored(rdb)


SHOUT = """
from executors.base import Executor


class Shout(Executor):
    name = "shout"

    def run(self, task):
        return {"text": "HI"}
"""


def test_a_type_a_worker_offers_is_accepted_and_one_installed_here_waits_with_a_reason(
    orchestrator, start_worker, install_plugin
):
    assert post(orchestrator, "spec: {taskType: shout}\n").status_code == 422
    plugin = install_plugin("fm_shout", SHOUT, {"shout": "Shout"})
    start_worker("w1", WORKER_EXECUTORS="echo,shout", PYTHONPATH=plugin)
    # Offered by a registered worker (not installed here): accepted once the fleet is read.
    r = wait_until(
        lambda: (r := post(orchestrator, "spec: {taskType: shout}\n")).status_code == 201 and r,
        what="the worker's executor to be accepted",
    )
    (task,) = r.json()["tasks"]
    assert orchestrator.wait(task["task_id"])["result"] == {"text": "HI"}
    r = post(orchestrator, "spec: {taskType: rag}\n")
    installed = sorted({*(task_type_of(n) for n in entry_points_by_name()), "shout"})
    assert f"available: {', '.join(installed)}" in r.json()["errors"][0]["msg"]
    # Installed here, offered by no worker: stored, and its reason says why it waits.
    (task_id,) = orchestrator.submit(
        {
            "spec": {
                "taskType": "inference",
                "model": {"source": {"identifier": "sshleifer/tiny-gpt2"}},
                "data": {"items": ["hello"]},
            }
        }
    )
    task = wait_until(
        lambda: (t := orchestrator.task(task_id)).get("reason") and t,
        what="the pending task's reason",
    )
    assert task["status"] == "PENDING"
    assert "no registered worker can run it" in task["reason"]


def test_values_no_spec_may_hold_are_400_naming_the_path(orchestrator, rdb):
    deep_json = '{"spec": {"taskType": "echo", "echo": {"message": ' + "[" * 300 + "]" * 300 + "}}}"
    cases = [
        # (body, content type, loc, message)
        (
            r'{"spec": {"taskType": "echo", "echo": {"message": "a\ud800b"}}}',
            "application/json",
            "spec.echo.message",
            "string at spec.echo.message holds a lone surrogate (\\ud800), not valid Unicode",
        ),
        (
            'spec: {taskType: echo, echo: {message: "\\udc00"}}\n',
            "application/yaml",
            "spec.echo.message",
            "string at spec.echo.message holds a lone surrogate (\\udc00), not valid Unicode",
        ),
        (
            r'{"spec": {"taskType": "echo", "echo": {"\udfff": 1}}}',
            "application/json",
            "spec.echo.'\\udfff'",
            "key at spec.echo.'\\udfff' holds a lone surrogate (\\udfff), not valid Unicode",
        ),
        (
            deep_json,
            "application/json",
            "spec.echo.message" + "[0]" * 61,
            "nested deeper than 64 levels at spec.echo.message[0][0]",
        ),
        (
            "spec: {taskType: echo, echo: {message: " + "[" * 300 + "]" * 300 + "}}\n",
            "application/yaml",
            "spec.echo.message" + "[0]" * 61,
            "nested deeper than 64 levels at spec.echo.message[0][0]",
        ),
        (
            r'{"spec": {"taskType": "echo", "data": {"items": ["a", NaN]}}}',
            "application/json",
            "spec.data.items[1]",
            "number at spec.data.items[1] is nan: NaN and Infinity are not accepted",
        ),
        (
            r'{"spec": {"taskType": "echo", "timeoutSec": -Infinity}}',
            "application/json",
            "spec.timeoutSec",
            "number at spec.timeoutSec is -inf: NaN and Infinity are not accepted",
        ),
        (
            "spec: {taskType: echo, echo: {message: hi, delaySec: .inf}}\n",
            "application/yaml",
            "spec.echo.delaySec",
            "number at spec.echo.delaySec is inf",
        ),
        (
            r'{"spec": {"taskType": "echo", "priority": 1, "priority": 5}}',
            "application/json",
            "spec",
            "duplicate key 'priority' at spec: give each key once",
        ),
        (
            "spec: {taskType: echo, data: {items: [!!binary gIA=]}}\n",
            "application/yaml",
            "spec.data.items[0]",
            "value at spec.data.items[0] is a YAML binary value (!!binary)",
        ),
    ]
    for body, content_type, loc, message in cases:
        r = post(orchestrator, body.encode(), content_type)
        assert r.status_code == 400, (body[:80], r.text[:300])
        assert r.json()["detail"].startswith("body: " + message), r.json()["detail"][:300]
        assert [e["loc"] for e in r.json()["errors"]] == [loc], r.json()["errors"]
    for body, content_type, message in [
        # Past what Python's JSON reader can nest: no path, but the place in the text.
        (
            '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
            "application/json",
            "body: nested deeper than 64 levels at line 1, column 70; a spec nests 64",
        ),
        (
            "spec:\n  taskType: echo\n  priority: 1\n  priority: 2\n",
            "application/yaml",
            "body: duplicate key 'priority' at line 4, column 3",
        ),
        (
            "spec: {taskType: echo, data: {items: [" + "9" * 5000 + "]}}",
            "application/yaml",
            "body: a number has more than 4300 digits",
        ),
    ]:
        r = post(orchestrator, body, content_type)
        assert r.status_code == 400, (body[:80], r.text[:300])
        assert r.json()["detail"].startswith(message), r.json()["detail"]
    assert nothing_stored(rdb)
    # A surrogate pair written as two escapes is one character, in YAML as in JSON.
    for body, content_type in [
        ('spec: {taskType: echo, echo: {message: "\\ud83d\\ude00"}}', "application/yaml"),
        (
            r'{"spec": {"taskType": "echo", "echo": {"message": "\ud83d\ude00"}}}',
            "application/json",
        ),
    ]:
        r = post(orchestrator, body, content_type)
        assert r.status_code == 201, r.text
        stored = json.loads(rdb.get(f"task:{r.json()['tasks'][0]['task_id']}:spec"))
        assert stored["spec"]["echo"]["message"] == "\U0001f600"


@pytest.mark.parametrize(
    ("spec", "loc", "words"),
    [
        ("spec:\n  taskType: echo\n  priority: high\n", "spec.priority", "integer"),
        ("spec:\n  taskType: echo\n  timeoutSec: -5\n", "spec.timeoutSec", "greater than 0"),
        ("spec:\n  taskType: echo\n  colour: red\n", "spec.colour", "Extra inputs"),
        (
            "spec:\n  taskType: echo\n  resources: {hardware: {gpu: {count: -1}}}\n",
            "spec.resources.hardware.gpu.count",
            "greater than or equal to 0",
        ),
        (
            "spec:\n  taskType: echo\n  resources: {hardware: {memory: lots}}\n",
            "spec.resources.hardware.memory",
            "16Gi",
        ),
        ("apiVersion: flowmesh/v9\nspec: {taskType: echo}\n", "apiVersion", "flowmesh/v1"),
        ("metadata: {name: x}\n", "spec", "Field required"),
        (
            "spec:\n  taskType: inference\n  data: {items: [hello]}\n",
            "spec.model.source.identifier",
            "required",
        ),
    ],
)
def test_wrong_fields_are_422_naming_the_field_path(orchestrator, rdb, spec, loc, words):
    r = post(orchestrator, spec)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["loc"] == loc and words in e["msg"] for e in errors), errors
    assert loc in r.json()["detail"]
    assert nothing_stored(rdb)


def test_numbers_are_numbers_sizes_have_a_limit_and_unused_fields_are_refused(orchestrator, rdb):
    def echo(**fields):
        return {"spec": {"taskType": "echo", **fields}}

    model = {"source": {"identifier": "m"}}
    cases = [
        # (spec, loc, message)
        (echo(priority=True), "spec.priority", "Input should be a number, not the boolean true"),
        (echo(maxAttempts=True), "spec.maxAttempts", "not the boolean true"),
        (echo(maxAttempts=2.5), "spec.maxAttempts", "Input should be a valid integer"),
        (echo(priority="5"), "spec.priority", "Input should be a valid integer"),
        (echo(retryBackoffSec=False), "spec.retryBackoffSec", "not the boolean false"),
        (
            echo(resources={"replicas": True, "hardware": {"gpu": {"count": True}}}),
            "spec.resources.hardware.gpu.count",
            "not the boolean true",
        ),
        (
            echo(resources={"hardware": {"memory": 1e300}}),
            "spec.resources.hardware.memory",
            "1e+300 is more than the largest size accepted, 1Pi (1125899906842624 bytes)",
        ),
        (
            echo(resources={"hardware": {"gpu": {"memory": "2Pi"}}}),
            "spec.resources.hardware.gpu.memory",
            "'2Pi' is more than the largest size accepted, 1Pi",
        ),
        (
            {
                "spec": {
                    "taskType": "inference",
                    "model": {**model, "engine": "transformers", "vllm": {"max_model_len": 64}},
                    "data": {"items": ["hi"]},
                }
            },
            "spec.model.vllm",
            "read only by the vLLM engine",
        ),
        (
            echo(checkpoint={"load": {"identifier": "/models/lora"}}),
            "spec.checkpoint",
            "executor 'echo' loads no checkpoint",
        ),
        (
            echo(output={"destination": {"url": "https://example.com/up"}}),
            "spec.output.destination.url",
            "never to a URL or path a spec names",
        ),
        (
            echo(output={"destination": {"type": "local", "path": "/data/out"}}),
            "spec.output.destination.path",
            "never to a URL or path a spec names",
        ),
        (echo(output={"artifacts": ["model.bin"]}), "spec.output.artifacts", "not supported yet"),
        (
            echo(training={"epochs": 1}),
            "spec.training",
            "Extra inputs are not permitted: executor 'echo' takes its options under",
        ),
    ]
    r = orchestrator.http.post("/api/v1/tasks", json=[spec for spec, _, _ in cases])
    assert r.status_code == 422, r.text
    errors = {e["loc"]: e["msg"] for e in r.json()["errors"]}
    for i, (_, loc, message) in enumerate(cases):
        assert message in errors.get(f"[{i}].{loc}", ""), (i, loc, errors)
    assert "[5].spec.resources.replicas" in errors
    assert nothing_stored(rdb)
    # What is fine stays fine: plain numbers, sizes up to 1Pi, a local destination.
    fine = echo(
        priority=5,
        maxAttempts=2,
        timeoutSec=30,
        retryBackoffSec=0.5,
        resources={"hardware": {"memory": "1Pi", "cpu": 2, "gpu": {"count": 0}}},
        output={"destination": {"type": "local"}, "artifacts": []},
    )
    assert len(orchestrator.submit(fine)) == 1
    # An empty vllm section says nothing, and is fine where a model is read.
    reads_a_model = {
        "spec": {
            "taskType": "inference",
            "model": {**model, "vllm": {}},
            "data": {"items": ["hi"]},
        }
    }
    assert len(orchestrator.submit(reads_a_model)) == 1


def test_a_batch_with_one_bad_spec_stores_none_of_them(orchestrator, rdb):
    body = [{"spec": {"taskType": "echo"}}, {"spec": {"taskType": "echo", "maxAttempts": 0}}]
    r = orchestrator.http.post("/api/v1/tasks", json=body)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == "[1].spec.maxAttempts"
    assert nothing_stored(rdb)


def test_yaml_multi_document_batch(orchestrator):
    r = post(orchestrator, "spec: {taskType: echo}\n---\nspec: {taskType: echo}\n")
    assert r.status_code == 201
    assert len(r.json()["tasks"]) == 2


def test_oversize_body_is_413_naming_the_limit(start_orchestrator, rdb):
    orch = start_orchestrator(FLOWMESH_MAX_BODY_BYTES="2048")
    r = post(orch, "spec: {taskType: echo, echo: {message: '" + "x" * 5000 + "'}}\n")
    assert r.status_code == 413
    assert "2048" in r.json()["detail"] and "FLOWMESH_MAX_BODY_BYTES" in r.json()["detail"]
    assert nothing_stored(rdb)


def test_yaml_aliases_are_refused(orchestrator, rdb):
    r = post(orchestrator, "a: &x [1, 2]\nspec: {taskType: echo, data: {items: *x}}\n")
    assert r.status_code == 400
    assert "alias" in r.json()["detail"]
    assert nothing_stored(rdb)


def test_unsupported_content_type_is_415(orchestrator):
    r = post(orchestrator, "taskType=echo", "application/x-www-form-urlencoded")
    assert r.status_code == 415


def test_unknown_task_is_404(orchestrator):
    r = orchestrator.http.get("/api/v1/tasks/doesnotexist")
    assert r.status_code == 404
    assert "doesnotexist" in r.json()["detail"]


def test_result_of_unfinished_task_is_409(orchestrator):
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    r = orchestrator.http.get(f"/api/v1/tasks/{task_id}/result")
    assert r.status_code == 409
    assert "PENDING" in r.json()["detail"]


def test_listing_filters_and_paginates_with_a_cursor(orchestrator, start_worker):
    ids = orchestrator.submit(*[{"spec": {"taskType": "echo"}} for _ in range(25)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 10, "status": "PENDING"}
        if cursor:
            params["cursor"] = cursor
        page = orchestrator.http.get("/api/v1/tasks", params=params).json()
        seen += [t["task_id"] for t in page["tasks"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids  # oldest first, no duplicates, none missing
    assert pages == 3
    assert (
        orchestrator.http.get("/api/v1/tasks", params={"type": "inference"}).json()["tasks"] == []
    )
    r = orchestrator.http.get("/api/v1/tasks", params={"status": "SLEEPING"})
    assert r.status_code == 422


TOKEN = "s3cret-token-for-the-test-for-tests-0123456789"


def test_token_auth_guards_everything_but_health(start_orchestrator):
    orch = start_orchestrator(token=TOKEN)
    base = orch.url
    for path in ("/api/v1/tasks", "/api/v1/workers", "/docs", "/openapi.json"):
        r = httpx.get(base + path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.get(base + path, headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 401, path
        assert TOKEN not in r.text
        r = httpx.get(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, path
    r = httpx.post(base + "/api/v1/tasks", json={"spec": {"taskType": "echo"}})
    assert r.status_code == 401
    assert orch.http.post("/api/v1/tasks", json={"spec": {"taskType": "echo"}}).status_code == 201
    assert httpx.get(base + "/healthz").status_code == 200


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FLOWMESH_API_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_token_the_orchestrator_refuses_a_public_address(redis_url):
    r = run_cli(["orchestrator.main", "--host", "0.0.0.0", "--port", "1"], {"REDIS_URL": redis_url})
    assert r.returncode == 2
    assert "FLOWMESH_API_TOKEN" in r.stderr and "0.0.0.0" in r.stderr


@pytest.mark.parametrize("module", ["orchestrator.main", "worker.main"])
def test_missing_or_unreachable_redis_is_named(module):
    r = run_cli([module], {})
    assert r.returncode == 2
    assert "REDIS_URL is not set" in r.stderr
    r = run_cli([module], {"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"})
    assert r.returncode == 2
    assert "cannot reach Redis at REDIS_URL" in r.stderr
    assert "hunter2" not in r.stderr  # the password is never echoed


def test_bad_worker_setting_is_named(redis_url):
    r = run_cli(["worker.main"], {"REDIS_URL": redis_url, "HEARTBEAT_INTERVAL_SEC": "soon"})
    assert r.returncode == 2
    assert "HEARTBEAT_INTERVAL_SEC must be a number" in r.stderr


def test_long_poll_returns_when_the_task_ends_not_before(orchestrator, start_worker):
    start_worker("w1")
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo", "echo": {"delaySec": 0.6}}})
    t0 = time.monotonic()
    r = orchestrator.http.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})
    waited = time.monotonic() - t0
    assert r.status_code == 200
    assert r.json()["status"] == "DONE"
    assert 0.3 < waited < 10, waited  # held until it ended, far short of the 20 s asked


def test_long_poll_times_out_with_the_current_state(orchestrator, start_worker):
    start_worker("w1")
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo", "echo": {"delaySec": 30}}})
    orchestrator.wait(task_id, ("RUNNING",))
    t0 = time.monotonic()
    r = orchestrator.http.get(f"/api/v1/tasks/{task_id}", params={"wait": 1.2})
    assert r.status_code == 200
    assert r.json()["status"] == "RUNNING"
    assert time.monotonic() - t0 >= 1.1


def test_long_poll_on_a_cancelled_task_returns_at_once(orchestrator):
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo"}})  # no worker: stays PENDING
    assert orchestrator.http.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
    t0 = time.monotonic()
    r = orchestrator.http.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})
    assert r.json()["status"] == "CANCELLED"
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_long_poll_wait_out_of_range_is_422(orchestrator, wait):
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    r = orchestrator.http.get(f"/api/v1/tasks/{task_id}", params={"wait": wait})
    assert r.status_code == 422
    assert "wait" in r.text


def test_python_client_submits_and_long_polls_with_a_token(start_orchestrator, start_worker):
    orch = start_orchestrator(token="s3cret-token-for-the-test")
    start_worker("w1")
    with Client(orch.url, token="s3cret-token-for-the-test") as fm:  # the README's example
        [task] = fm.submit({"spec": {"taskType": "echo", "echo": {"message": "hi"}}})
        done = fm.task(task["task_id"], wait=30)
        assert done["status"] == "DONE"
        assert done["result"]["message"] == "hi"
        with pytest.raises(ApiError) as bad:
            fm.submit({"spec": {"taskType": "echo", "priority": "high"}})
        assert bad.value.status == 422
        assert "priority" in str(bad.value)
    with Client(orch.url) as anonymous, pytest.raises(ApiError) as denied:
        anonymous.workers()
    assert denied.value.status == 401


def test_openapi_document_has_no_dangling_references(orchestrator):
    doc = orchestrator.http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(doc))
    assert "#/components/schemas/TaskSpec" in found  # the submit body's schema
    missing = {r for r in found if r.removeprefix("#/components/schemas/") not in schemas}
    assert not missing
    task_type = schemas["TaskBody"]["properties"]["taskType"]
    assert task_type["pattern"].startswith("^[a-z]")
