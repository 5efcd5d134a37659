"""Training on a real fleet: a LoRA trained, archived and uploaded, then served by URL; a
worker SIGKILLed mid-training and the next attempt resuming from the uploaded checkpoint.

Real orchestrator, real workers, per-task child processes, the TRL trainer in its own
process, the archive over HTTP. Needs the `training` extra.
"""

from __future__ import annotations

import hashlib
import json
import signal
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TRAINING_TIMEOUT, Orchestrator, Proc, wait_until

pytest.importorskip("trl", reason="needs the training extra: uv sync --extra training")
pytest.importorskip("peft", reason="needs the training extra: uv sync --extra training")

pytestmark = TRAINING_TIMEOUT
API_TOKEN = "api-secret-token"
WORKER_TOKEN = "worker-secret-token"

DATA = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "Two plus two is", "completion": " four."},
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": "Water is", "completion": " wet."},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowmesh.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def fleet(
    start_orchestrator: Callable[..., Orchestrator], tmp_path: Path
) -> Callable[..., tuple[Orchestrator, Callable[..., Proc]]]:
    def make() -> Any:
        return start_orchestrator(
            API_TOKEN,
            FLOWMESH_WORKER_TOKEN=WORKER_TOKEN,
            FLOWMESH_RESULTS_DIR=str(tmp_path / "orchestrator-results"),
        )

    return make


def _worker_env(orch: Orchestrator, results: Path, **extra: str) -> dict[str, str]:
    return {
        "WORKER_EXECUTORS": "lora_sft,inference",
        "ORCHESTRATOR_BASE_URL": orch.url,
        "FLOWMESH_WORKER_TOKEN": WORKER_TOKEN,
        "RESULTS_DIR": str(results),
        **extra,
    }


def _lora_sft(model: Path, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flowmesh/v1",
        "kind": "Task",
        "metadata": {"name": "lora"},
        "spec": {
            "taskType": "lora_sft",
            "model": {"source": {"identifier": str(model)}},
            "data": {"type": "list", "items": DATA},
            "training": {
                "max_steps": 4,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "max_seq_length": 32,
                "lora": {"r": 4, "alpha": 8},
                **training,
            },
            "output": {"destination": {"type": "http"}},
        },
    }


def test_lora_trained_uploaded_and_served_by_url(
    fleet: Callable[..., Orchestrator],
    start_worker: Callable[..., Proc],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    orch = fleet()
    worker = start_worker("trainer", **_worker_env(orch, tmp_path / "w1"))
    (train_id,) = orch.submit(_lora_sft(tiny_model))
    task = orch.wait(train_id, timeout=240)
    assert task["status"] == "DONE", (task["error"], worker.log()[-3000:])
    result = task["result"]

    # Live progress ends at the last step, for the attempt that ran.
    assert task["progress"]["step"] == 4 and task["progress"]["total"] == 4
    assert task["progress"]["attempt"] == 1

    # The archive: on the worker's disk where the result says, and on the orchestrator.
    local = Path(result["final_lora_archive_path"])
    assert local.is_file() and local.name == "final_lora.tar.gz"
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    assert result["final_lora_archive_sha256"] == digest
    url = result["final_lora_archive_url"]
    assert url == f"{orch.url}/api/v1/results/{train_id}/files/final_lora.tar.gz"
    got = orch.http.get(url)
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == digest
    assert got.headers["x-flowmesh-sha256"] == digest
    with tarfile.open(local) as tar:
        names = tar.getnames()
    assert "final_lora/adapter_config.json" in names
    assert any(n.startswith("final_lora/adapter_model") for n in names)
    # Listed in the manifest like every other file of the task.
    manifest = json.loads((local.parent.parent / "manifest.json").read_text())
    assert "artifacts/final_lora.tar.gz" in {f["path"] for f in manifest["files"]}

    # A second task loads the adapter by its URL on top of the base model.
    infer = {
        "apiVersion": "flowmesh/v1",
        "kind": "Task",
        "spec": {
            "taskType": "inference",
            "model": {
                "source": {"identifier": str(tiny_model)},
                "engine": "transformers",
                "lora": {"identifier": url},
            },
            "data": {"type": "list", "items": ["The capital of France is"]},
            "inference": {"max_tokens": 4, "temperature": 0},
        },
    }
    (infer_id,) = orch.submit(infer)
    done = orch.wait(infer_id, timeout=120)
    assert done["status"] == "DONE", (done["error"], worker.log()[-3000:])
    assert done["result"]["responses"][0]["completion_tokens"] > 0
    # Downloaded once into the worker's cache, keyed by the archive's sha256.
    cache = tmp_path / "w1" / ".artifact-cache"
    assert (cache / digest).is_dir()

    # Another task for the same URL is served from the cache: no second download.
    downloads = orch.log().count(f"GET /api/v1/results/{train_id}/files/final_lora.tar.gz")
    (again,) = orch.submit(infer)
    assert orch.wait(again, timeout=120)["status"] == "DONE"
    assert orch.log().count(f"GET /api/v1/results/{train_id}/files/final_lora.tar.gz") == downloads


def test_sigkilled_worker_mid_training_resumes_from_the_uploaded_checkpoint(
    fleet: Callable[..., Orchestrator],
    start_worker: Callable[..., Proc],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    orch = fleet()
    # A pause after each step (a test-only failpoint) makes the training long enough to kill.
    first = start_worker(
        "first", **_worker_env(orch, tmp_path / "first", FLOWMESH_FAILPOINTS="train_step:0.1")
    )
    spec = _lora_sft(tiny_model, max_steps=60, save_steps=10, learning_rate=1e-4)
    (task_id,) = orch.submit(spec)

    def uploaded_step() -> int | None:
        files = orch.http.get(f"/api/v1/results/{task_id}/files")
        steps = [
            int(f["name"].split("-")[1].split(".")[0])
            for f in (files.json().get("files", []) if files.status_code == 200 else [])
            if f["name"].startswith("checkpoint-")
        ]
        return max(steps) if steps else None

    wait_until(
        lambda: uploaded_step() and orch.task(task_id)["progress"]["step"] >= 10,
        timeout=240,
        interval=0.2,
        what="a checkpoint upload and progress past it",
    )
    assert orch.task(task_id)["status"] == "RUNNING"
    first.signal(signal.SIGKILL)
    first.proc.wait()
    kept = uploaded_step()
    assert kept is not None and kept < 60

    # Another worker, with a disk of its own: it can only resume from the upload.
    second = start_worker("second", **_worker_env(orch, tmp_path / "second"))
    task = orch.wait(task_id, timeout=300)
    assert task["status"] == "DONE", (task["error"], second.log()[-3000:])
    assert task["attempts"] == 2 and task["worker_id"] == "second"
    result = task["result"]
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] >= kept
    assert result["global_step"] == 60
    log = (tmp_path / "second" / task_id / "logs" / "executor.log").read_text()
    assert f"at step {result['resumed_from_step']}" in log
    assert (
        httpx.get(
            result["final_lora_archive_url"], headers={"Authorization": f"Bearer {API_TOKEN}"}
        ).status_code
        == 200
    )


def _trainers_of(task_id: str) -> list[int]:
    """Trainer processes still alive for a task (their command names its job file)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "executors.trl.launch" in cmdline and task_id in cmdline:
            found.append(proc.pid)
    return found


def test_cancel_and_timeout_stop_the_trainer(
    fleet: Callable[..., Orchestrator],
    start_worker: Callable[..., Proc],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    orch = fleet()
    start_worker(
        "trainer", **_worker_env(orch, tmp_path / "w", FLOWMESH_FAILPOINTS="train_step:0.2")
    )
    long = _lora_sft(tiny_model, max_steps=10_000)
    long["spec"]["output"] = {"destination": {"type": "local"}}
    timed = {**long, "spec": {**long["spec"], "timeoutSec": 45, "maxAttempts": 1}}
    cancelled, timed_out = orch.submit(long, timed)

    wait_until(
        lambda: (orch.task(cancelled).get("progress") or {}).get("step", 0) >= 1,
        timeout=120,
        what="the first training step",
    )
    assert _trainers_of(cancelled)
    assert orch.http.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
    assert orch.wait(cancelled, timeout=60)["status"] == "CANCELLED"

    task = orch.wait(timed_out, timeout=120)
    assert task["status"] == "FAILED" and task["error"]["kind"] == "timeout"
    assert (task.get("progress") or {}).get("step", 0) >= 1
    # Neither trainer outlives its task.
    wait_until(
        lambda: not _trainers_of(cancelled) and not _trainers_of(timed_out),
        timeout=15,
        what="both trainers gone",
    )
