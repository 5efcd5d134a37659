"""Inference through the whole fleet: a tiny random-weight model loaded by path, like a hub id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import wait_until

pytest.importorskip("torch", reason="needs the inference extra: uv sync --extra inference")
pytest.importorskip("transformers", reason="needs the inference extra: uv sync --extra inference")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowmesh.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def inference_spec(model: Path, items: list, **options: object) -> dict:
    return {
        "metadata": {"name": "tiny"},
        "spec": {
            "taskType": "inference",
            "model": {"source": {"identifier": str(model)}},
            "data": {"type": "list", "items": items},
            "inference": {"max_tokens": 6, "temperature": 0, "batch_size": 2, **options},
        },
    }


@pytest.mark.timeout(180)
def test_batched_inference_end_to_end_keeps_the_model_warm(
    orchestrator, start_worker, tiny_llama, results_dir
):
    start_worker("gpu-less", WORKER_EXECUTORS="echo,inference")
    prompts = ["the quick brown fox", "hello world", "one two three"]
    (first,) = orchestrator.submit(inference_spec(tiny_llama, prompts))
    task = orchestrator.wait(first, timeout=150)
    assert task["status"] == "DONE", task["error"]
    result = task["result"]
    assert result["model"] == str(tiny_llama)
    assert result["device"] == "cpu"
    assert [r["index"] for r in result["responses"]] == [0, 1, 2]
    for r, prompt in zip(result["responses"], prompts, strict=True):
        assert prompt in r["prompt"]
        assert 0 < r["completion_tokens"] <= 6
        assert r["finish_reason"] in ("length", "stop")
    assert result["warm"] is False

    out = results_dir / first
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (out / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert json.loads((out / "responses.json").read_text())["result"] == result

    # The heartbeat advertises the loaded model, and the next task finds it warm.
    wait_until(
        lambda: (
            str(tiny_llama)
            in orchestrator.http.get("/api/v1/workers").json()["workers"][0]["loaded_models"]
        ),
        what="the worker to report its loaded model",
    )
    (second,) = orchestrator.submit(inference_spec(tiny_llama, prompts))
    again = orchestrator.wait(second, timeout=60)
    assert again["result"]["warm"] is True
    assert again["result"]["load_sec"] == 0
    # Greedy decoding: the same prompts give the same text on a warm model.
    assert [r["text"] for r in again["result"]["responses"]] == [
        r["text"] for r in result["responses"]
    ]


def test_missing_model_fails_fast_as_permanent(orchestrator, start_worker, tmp_path):
    start_worker("w1", WORKER_EXECUTORS="inference")
    missing = tmp_path / "no-such-model"
    (task_id,) = orchestrator.submit(inference_spec(missing, ["hi"]))
    task = orchestrator.wait(task_id, timeout=60)
    assert task["status"] == "FAILED"
    assert task["error"]["kind"] == "permanent"
    assert str(missing) in task["error"]["message"]


def test_a_hub_model_that_cannot_be_fetched_fails_once_as_permanent_saying_why(
    orchestrator, start_worker
):
    # The test workers run with HF_HUB_OFFLINE=1, as a worker without network would be.
    start_worker("w1", WORKER_EXECUTORS="inference")
    (task_id,) = orchestrator.submit(inference_spec("acme/not-cached-anywhere", ["hi"]))
    task = orchestrator.wait(task_id, timeout=60)
    assert task["status"] == "FAILED"
    assert task["attempts"] == 1  # not retried: another attempt cannot fetch it either
    assert task["error"]["kind"] == "permanent"
    assert "cannot be fetched" in task["error"]["message"]
    assert "hub is unreachable" in task["error"]["message"]


@pytest.mark.timeout(180)
def test_inference_requests_merge_and_identical_ones_run_once(
    orchestrator, start_worker, tiny_llama, results_dir
):
    # Submitted before the worker exists, so they are placed together.
    prompts = ["the quick brown fox", "hello world", "the quick brown fox", "one two three"]
    ids = orchestrator.submit(*(inference_spec(tiny_llama, [p]) for p in prompts))
    stored = orchestrator.task(ids[0])["spec"]["spec"]["model"]
    assert stored["engine"] == "transformers"  # `auto`, settled: no worker offers vllm
    start_worker("w1", WORKER_EXECUTORS="inference")
    tasks = [orchestrator.wait(t, timeout=150) for t in ids]
    assert [t["status"] for t in tasks] == ["DONE"] * 4, [t["error"] for t in tasks]
    assert {t["merge"]["parent"] for t in tasks} == {ids[0]}  # one delivery
    # The twin of the first got its result without running; the others ran.
    assert [t["result"].get("executed_by") for t in tasks] == [None, None, ids[0], None]
    assert tasks[2]["result"]["responses"] == tasks[0]["result"]["responses"]
    for t, prompt in zip(tasks, prompts, strict=True):
        assert prompt in t["result"]["responses"][0]["prompt"]
        saved = json.loads((results_dir / t["task_id"] / "responses.json").read_text())
        assert saved["task_id"] == t["task_id"] and saved["result"] == t["result"]
    worker = orchestrator.http.get("/api/v1/workers").json()["workers"][0]
    assert worker["slots"] == 4  # a sync executor: the default, not a batch's


def test_merge_false_runs_every_inference_request(orchestrator, start_worker, tiny_llama):
    spec = inference_spec(tiny_llama, ["same"])
    spec["spec"]["merge"] = False
    ids = orchestrator.submit(spec, spec)
    start_worker("w1", WORKER_EXECUTORS="inference")
    tasks = [orchestrator.wait(t, timeout=150) for t in ids]
    assert [t["status"] for t in tasks] == ["DONE", "DONE"]
    assert all(t["merge"] is None and "executed_by" not in t["result"] for t in tasks)
