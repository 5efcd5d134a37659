"""The command line a newcomer uses: `flowmesh submit --wait` and `flowmesh demo`, its
errors, and `worker --help` / `orchestrator --help`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowmesh.embedded import free_port
from flowmesh.status import TaskStatus
from tests.conftest import ROOT


def flowmesh(
    args: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "FLOWMESH_API_TOKEN", "FLOWMESH_URL", "RESULTS_DIR")
    }
    return subprocess.run(
        [sys.executable, "-m", "flowmesh.cli", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_wait_shows_progress_and_exits_zero_when_all_done(
    orchestrator, start_worker, tmp_path
):
    start_worker("w1")
    spec = tmp_path / "batch.yaml"
    spec.write_text(
        "metadata: {name: first}\nspec: {taskType: echo, echo: {delaySec: 0.3}}\n"
        "---\nmetadata: {name: second}\nspec: {taskType: echo}\n"
    )
    r = flowmesh(["--url", orchestrator.url, "submit", str(spec), "--wait"], {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("submitted ") == 2
    assert "DONE 2" in r.stdout  # the live table's summary line
    assert r.stdout.count("responses.json") >= 2


def test_submit_reports_validation_errors_with_their_path(orchestrator, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("spec: {taskType: echo, priority: urgent}\n")
    r = flowmesh(["--url", orchestrator.url, "submit", str(spec)], {})
    assert r.returncode == 2
    assert "spec.priority" in r.stderr
    assert "Traceback" not in r.stderr


def test_submit_wait_exits_nonzero_when_a_task_fails(orchestrator, start_worker, tmp_path):
    start_worker("w1", WORKER_EXECUTORS="echo,inference")
    spec = tmp_path / "missing-model.yaml"
    spec.write_text(
        json.dumps(
            {
                "spec": {
                    "taskType": "inference",
                    "model": {"source": {"identifier": str(tmp_path / "nope")}},
                    "data": {"items": ["hi"]},
                }
            }
        )
    )
    r = flowmesh(["--url", orchestrator.url, "submit", str(spec), "--wait", "--timeout", "60"], {})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout
    r = flowmesh(["--url", orchestrator.url, "dead-letters"], {})
    assert r.returncode == 0
    assert "permanent" in r.stdout and "nope" in r.stdout
    # A second one, then page through them one at a time.
    second = json.loads(spec.read_text())
    second["spec"]["model"]["source"]["identifier"] = str(tmp_path / "nope-again")
    (other,) = orchestrator.submit(second)
    assert orchestrator.wait(other, timeout=60)["status"] == "FAILED"
    first_page = flowmesh(["--url", orchestrator.url, "dead-letters", "--limit", "1"], {})
    assert first_page.returncode == 0 and other not in first_page.stdout
    cursor = first_page.stdout.split("(more: --cursor ")[1].split(")")[0]
    args = ["--url", orchestrator.url, "dead-letters", "--limit", "1", "--cursor", cursor]
    second_page = flowmesh(args, {})
    assert second_page.returncode == 0 and other in second_page.stdout


def test_cancel_from_the_command_line(orchestrator):
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    r = flowmesh(["--url", orchestrator.url, "cancel", task_id], {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CANCELLED (was PENDING)" in r.stdout
    assert orchestrator.task(task_id)["status"] == "CANCELLED"
    r = flowmesh(["--url", orchestrator.url, "cancel", task_id], {})
    assert r.returncode == 1 and "409" in r.stderr


@pytest.mark.timeout(300)
def test_demo_runs_a_whole_fleet_on_an_embedded_redis(tmp_path):
    results = tmp_path / "results"
    args = ["demo", "--tasks", "3", "--workers", "2"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        args.append("--no-inference")
    r = flowmesh(args, {"RESULTS_DIR": str(results)}, timeout=280, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "embedded Redis" in r.stdout
    done = [json.loads(p.read_text()) for p in results.glob("*/responses.json")]
    expected = 3 if "--no-inference" in args else 7
    assert len(done) == expected
    assert all(d["status"] == "DONE" for d in done)
    assert {d["worker_id"] for d in done} <= {"demo-1", "demo-2"}
    if "--no-inference" not in args:
        # The four inference requests went in one delivery; the two identical ones ran once.
        assert r.stdout.count("merge: delivered with") == 4, r.stdout
        assert r.stdout.count("so run once for both") == 1, r.stdout
    assert "stopping the fleet" in r.stdout
    kept = re.search(r"logs kept in (\S+)", r.stdout)
    assert kept, r.stdout
    logs = Path(kept.group(1))
    assert (logs / "orchestrator.log").is_file()
    shutil.rmtree(logs)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: one line on stderr, no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# Every subcommand that talks to the orchestrator, with arguments that would be accepted.
API_COMMANDS = [
    ["tasks"],
    ["tasks", "--status", "pending"],
    ["status", "0123456789abcdef"],
    ["cancel", "0123456789abcdef"],
    ["dead-letters"],
    ["dead-letters", "--requeue", "0123456789abcdef"],
    ["workers"],
    ["submit", str(ROOT / "templates" / "echo.yaml")],
]


def test_tasks_status_is_case_insensitive(orchestrator):
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    for status in ("pending", "Pending", "PENDING"):
        r = flowmesh(["--url", orchestrator.url, "tasks", "--status", status], {})
        assert r.returncode == 0, r.stdout + r.stderr
        assert task_id in r.stdout
    r = flowmesh(["--url", orchestrator.url, "tasks", "--status", "done"], {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert task_id not in r.stdout


def test_an_unknown_status_is_a_usage_error_naming_the_allowed_ones():
    # Refused before any request: no orchestrator needed.
    r = flowmesh(["--url", f"http://127.0.0.1:{free_port()}", "tasks", "--status", "BOGUS"], {})
    assert r.returncode == 2
    line = one_line_error(r)
    assert "BOGUS" in line
    assert all(s.value in line for s in TaskStatus), line


def test_a_refused_connection_names_flowmesh_url_and_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in API_COMMANDS:
        r = flowmesh(args, {"FLOWMESH_URL": url})
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        line = one_line_error(r)
        assert url in line and "FLOWMESH_URL" in line, line
        assert "uv run orchestrator" in line and "flowmesh demo --keep" in line, line


def test_a_missing_or_wrong_token_says_to_set_flowmesh_api_token(start_orchestrator):
    orch = start_orchestrator(token="t" * 24)
    for token_env in ({}, {"FLOWMESH_API_TOKEN": "wrong-token-0123456789"}):
        for args in API_COMMANDS:
            r = flowmesh(args, {"FLOWMESH_URL": orch.url, **token_env})
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            line = one_line_error(r)
            assert "401" in line and "FLOWMESH_API_TOKEN" in line, line
    r = flowmesh(["tasks"], {"FLOWMESH_URL": orch.url, "FLOWMESH_API_TOKEN": "t" * 24})
    assert r.returncode == 0, r.stdout + r.stderr


def test_other_api_errors_are_one_line_too(orchestrator):
    r = flowmesh(["--url", orchestrator.url, "status", "no-such-task"], {})
    assert r.returncode == 1
    assert "404" in one_line_error(r)
    r = flowmesh(["--url", orchestrator.url, "tasks", "--limit", "5000"], {})
    assert r.returncode == 2
    assert "limit" in one_line_error(r)


def test_tasks_order_desc_lists_newest_first_and_pages_follow(orchestrator):
    ids = [orchestrator.submit({"spec": {"taskType": "echo"}})[0] for _ in range(3)]

    def listed(*extra: str) -> tuple[list[str], list[str]]:
        """The task ids listed, and the arguments the CLI says give the next page."""
        r = flowmesh(["--url", orchestrator.url, "tasks", *extra], {})
        assert r.returncode == 0, r.stdout + r.stderr
        more = re.search(r"\(more: (.+)\)", r.stdout)
        found = [t for t in re.findall(r"^(\S+)\s", r.stdout, re.M) if t in ids]
        return found, more.group(1).split() if more else []

    assert listed() == (ids, [])
    assert listed("--order", "asc") == (ids, [])
    assert listed("--order", "desc") == (ids[::-1], [])
    page, more = listed("--order", "DESC", "--limit", "2")
    assert page == ids[:0:-1]
    assert listed(*more) == ([ids[0]], [])
    page, more = listed("--limit", "2")
    assert page == ids[:2]
    assert listed(*more) == ([ids[2]], [])


def _env_names(settings: Path) -> set[str]:
    """The variables a settings module reads (`env_*(env, "NAME"...)`, `env.get("NAME")`)."""
    text = settings.read_text()
    names = set(re.findall(r'env(?:_\w+)?\(\s*env,\s*"([A-Z0-9_]+)"', text))
    names |= set(re.findall(r'env\.get\(\s*"([A-Z0-9_]+)"', text))
    if "env_log_level(" in text:
        names.add("LOG_LEVEL")
    if "RedisConfig.from_env(" in text:  # REDIS_URL and the REDIS_* settings, read there
        names |= _env_names(ROOT / "flowmesh" / "redis_conn.py") | {"REDIS_URL"}
    return names


@pytest.mark.parametrize(
    ("module", "settings", "must"),
    [
        ("worker.main", "worker/settings.py", ["REDIS_URL", "HEARTBEAT_INTERVAL_SEC"]),
        ("orchestrator.main", "orchestrator/settings.py", ["REDIS_URL", "FLOWMESH_API_TOKEN"]),
    ],
)
def test_help_lists_the_environment_and_starts_nothing(module, settings, must):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FLOWMESH_"))}
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - started < 30
    assert "usage:" in r.stdout
    names = _env_names(ROOT / settings)
    assert set(must) <= names
    for name in names:
        assert re.search(rf"^\s+{name}\s", r.stdout, re.M), f"{name} missing from --help"
    if module == "orchestrator.main":
        assert "--host" in r.stdout and "--port" in r.stdout


def test_submit_pipeline_with_params_waits_and_shows_each_stage(
    orchestrator, start_worker, tmp_path
):
    start_worker("w1")
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(
        """
kind: Pipeline
metadata: {name: greet}
spec:
  params: {who: nobody, times: 1}
  taskType: echo
  stages:
    - name: hello
      spec: {echo: {message: "hello ${params.who}"}}
    - name: repeat
      forEach: "${params.times}"
      spec: {echo: {message: "${hello.result.message} #${index}"}}
"""
    )
    r = flowmesh(
        [
            "--url",
            orchestrator.url,
            "submit",
            str(spec),
            "--param",
            "who=fleet",
            "--param",
            "times=[a, b, c]",
            "--wait",
        ],
        {},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted pipeline" in r.stdout
    pipeline_id = re.search(r"submitted pipeline ([0-9a-f]{32})", r.stdout).group(1)
    assert f"pipeline {pipeline_id}: DONE" in r.stdout
    # the stage table: each stage, its state and its tasks
    assert re.search(r"hello\s.*done\s.*DONE 1", r.stdout), r.stdout
    assert re.search(r"repeat\s.*done\s.*DONE 3", r.stdout), r.stdout
    listed = flowmesh(["--url", orchestrator.url, "pipelines", "--status", "done"], {})
    assert pipeline_id in listed.stdout and "done=2" in listed.stdout

    not_a_pipeline = tmp_path / "task.yaml"
    not_a_pipeline.write_text("spec: {taskType: echo}\n")
    r = flowmesh(["--url", orchestrator.url, "submit", str(not_a_pipeline), "--param", "a=1"], {})
    assert r.returncode == 2 and "not a pipeline" in r.stderr
