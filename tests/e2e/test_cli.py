"""The command line a newcomer uses: `flowmesh submit --wait` and `flowmesh demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "spec.priority" in r.stdout


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


def test_cancel_from_the_command_line(orchestrator):
    (task_id,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    r = flowmesh(["--url", orchestrator.url, "cancel", task_id], {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CANCELLED (was PENDING)" in r.stdout
    assert orchestrator.task(task_id)["status"] == "CANCELLED"
    r = flowmesh(["--url", orchestrator.url, "cancel", task_id], {})
    assert r.returncode == 1 and "409" in r.stdout


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
    expected = 3 if "--no-inference" in args else 4
    assert len(done) == expected
    assert all(d["status"] == "DONE" for d in done)
    assert {d["worker_id"] for d in done} <= {"demo-1", "demo-2"}
    assert "stopping the fleet" in r.stdout
