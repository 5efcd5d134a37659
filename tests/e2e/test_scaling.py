"""Workers taken out of placement and put back: by request (disable, enable, drain) and by
elastic scaling on a real fleet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, wait_until
from tests.e2e.test_cli import flowmesh


def workers(orchestrator) -> dict[str, dict]:
    r = orchestrator.http.get("/api/v1/workers")
    assert r.status_code == 200, r.text
    return {w["worker_id"]: w for w in r.json()["workers"]}


def test_disable_enable_and_drain_a_worker_by_request(start_orchestrator, start_worker):
    orchestrator = start_orchestrator(ENABLE_ELASTIC_SCALING="false")
    w1 = start_worker("w1", HEARTBEAT_INTERVAL_SEC="1")
    assert orchestrator.http.post("/api/v1/workers/nobody/disable").status_code == 404

    cli = flowmesh(["--url", orchestrator.url, "worker", "w1", "--disable"], {})
    assert cli.returncode == 0 and "worker w1 disabled" in cli.stdout, cli.stderr
    listed = flowmesh(["--url", orchestrator.url, "workers"], {})
    assert "DISABLED (disabled by request)" in listed.stdout
    row = workers(orchestrator)["w1"]
    assert row["disabled"] is True and row["disabled_reason"] == "disabled by request"
    (task,) = orchestrator.submit({"spec": {"taskType": "echo"}})
    time.sleep(1.0)
    pending = orchestrator.task(task)
    assert pending["status"] == "PENDING"  # a disabled worker takes nothing
    assert "disabled" in pending["reason"]

    assert orchestrator.http.post("/api/v1/workers/w1/enable").status_code == 200
    assert orchestrator.wait(task)["status"] == "DONE"
    assert workers(orchestrator)["w1"]["disabled"] is False

    # Drain: the running task finishes, then the worker deregisters and exits.
    (slow,) = orchestrator.submit({"spec": {"taskType": "echo", "echo": {"delaySec": 2}}})
    orchestrator.wait(slow, statuses=("RUNNING",))
    assert orchestrator.http.post("/api/v1/workers/w1/drain").status_code == 200
    done = orchestrator.wait(slow)
    assert done["status"] == "DONE" and done["attempts"] == 1
    wait_until(lambda: not w1.alive(), timeout=20, what="the drained worker to exit")
    assert w1.proc.returncode == 0
    assert "w1" not in {w for w, row in workers(orchestrator).items() if row["alive"]}


def test_elastic_scaling_disables_idle_workers_and_enables_them_for_a_backlog(
    start_orchestrator, start_worker
):
    orchestrator = start_orchestrator(
        ELASTIC_IDLE_SEC="1", ELASTIC_COOLDOWN_SEC="1", ELASTIC_MIN_ACTIVE_WORKERS="1"
    )
    for wid in ("w1", "w2", "w3"):
        start_worker(wid, WORKER_SLOTS="2", HEARTBEAT_INTERVAL_SEC="1", WORKER_COST_PER_HOUR="3600")

    def disabled() -> set[str]:
        return {w for w, row in workers(orchestrator).items() if row["disabled"]}

    wait_until(lambda: len(disabled()) == 2, timeout=30, what="two idle workers disabled")
    rows = workers(orchestrator)
    off = sorted(disabled())
    (kept,) = {"w1", "w2", "w3"} - set(off)
    assert all(rows[w]["disabled_reason"].startswith("elastic scaling: idle for") for w in off)
    # A disabled worker stays registered and beating, and accrues no cost meanwhile (it
    # reads that it is disabled within a beat interval: give it two).
    time.sleep(2.0)
    rows = workers(orchestrator)
    before = {w: rows[w]["cost_accrued"] for w in rows}
    time.sleep(3.0)
    after = workers(orchestrator)
    assert all(after[w]["alive"] for w in after)
    assert after[kept]["cost_accrued"] > before[kept] + 1.0  # 1 per second at 3600 per hour
    for w in off:
        assert after[w]["cost_accrued"] - before[w] < 1.0

    # A burst: more than the one enabled worker's two slots, for a while.
    tasks = orchestrator.submit(*[{"spec": {"taskType": "echo", "echo": {"delaySec": 1.5}}}] * 12)
    ran_on = {orchestrator.wait(t, timeout=60)["worker_id"] for t in tasks}
    assert len(ran_on) >= 2, ran_on  # disabled workers were enabled for the backlog
    log = orchestrator.log()
    assert "elastic scaling: enabled worker" in log and "backlog of echo tasks" in log
    # Idle again: back down to one enabled worker.
    wait_until(lambda: len(disabled()) == 2, timeout=30, what="the fleet to scale down again")


def test_local_scaler_starts_workers_for_a_burst_and_drains_them_after(
    start_orchestrator, redis_url, rdb, tmp_path
):
    orchestrator = start_orchestrator(ENABLE_ELASTIC_SCALING="false")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WORKER_", "FLOWMESH_", "REDIS_", "HEARTBEAT_", "RESULTS_"))
    }
    env.update(
        REDIS_URL=redis_url,
        RESULTS_DIR=str(tmp_path / "results"),
        HEARTBEAT_INTERVAL_SEC="1",
        WORKER_SLOTS="2",
        PYTHONUNBUFFERED="1",
    )
    log = (tmp_path / "scale.log").open("wb")
    scaler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowmesh.cli",
            "--url",
            orchestrator.url,
            "scale",
            "--min",
            "0",
            "--max",
            "3",
            "--idle-sec",
            "1",
            "--interval",
            "0.3",
            "--log-dir",
            str(tmp_path / "scale-logs"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        time.sleep(1.0)
        assert workers(orchestrator) == {}  # min 0: nothing runs without a backlog
        tasks = orchestrator.submit(
            *[{"spec": {"taskType": "echo", "echo": {"delaySec": 0.5}}}] * 30
        )
        done = [orchestrator.wait(t, timeout=90) for t in tasks]
        assert all(t["status"] == "DONE" and t["attempts"] == 1 for t in done)  # none lost
        assert len({t["worker_id"] for t in done}) >= 2  # it scaled out
        # Idle: every worker it started is drained and gone.
        wait_until(
            lambda: not any(w["alive"] for w in workers(orchestrator).values()),
            timeout=60,
            what="the scaler to drain its workers",
        )
        text = (tmp_path / "scale.log").read_text()
        assert "scale: started worker" in text and "scale: draining worker" in text
        assert "stopped (exit code 0)" in text
        assert rdb.zcard("tasks:status:DONE") >= 30
    finally:
        scaler.send_signal(signal.SIGTERM)
        assert scaler.wait(timeout=60) == 0
        log.close()
