"""The vLLM executor through the whole fleet: HTTP submit, worker, executor child, engine.

All tests share the session's fleet and its one warm engine (tests/vllm/conftest.py).
"""

from __future__ import annotations

import re
import threading

import pytest

from tests.conftest import wait_until
from tests.vllm.conftest import MODEL_MAX_LEN, Fleet

pytest.importorskip(
    "vllm", reason="needs vLLM: the .venv-vllm environment that .ci/run builds (CPU build)"
)

pytestmark = pytest.mark.timeout(300)


def texts(task: dict) -> list[str]:
    assert task["status"] == "DONE", task["error"]
    return [r["text"] for r in task["result"]["responses"]]


def test_the_first_task_starts_the_engine_and_says_what_it_generated(fleet: Fleet, first_task):
    assert first_task["status"] == "DONE", first_task["error"]
    result = first_task["result"]
    assert result["engine"] == "vllm"
    assert result["model"] == str(fleet.model)
    assert result["device"] == "cpu"
    assert result["warm"] is False
    assert result["load_sec"] > 0
    assert [r["index"] for r in result["responses"]] == [0, 1]
    for r, prompt in zip(result["responses"], ["the quick brown fox", "hello world"], strict=True):
        # Plain prompts go through the chat template as a user's message.
        assert prompt in r["prompt"] and r["prompt"].endswith("<|assistant|>\n")
        assert 0 < r["completion_tokens"] <= 8
        assert r["finish_reason"] in ("length", "stop")
        assert r["prompt_tokens"] > 0
    assert result["usage"] == {
        "prompt_tokens": sum(r["prompt_tokens"] for r in result["responses"]),
        "completion_tokens": sum(r["completion_tokens"] for r in result["responses"]),
    }
    timings = result["timings"]
    assert timings["load_sec"] == result["load_sec"]
    assert 0 < timings["ttft_sec"] <= timings["generation_sec"] <= timings["elapsed_sec"]
    # The worker advertises the model (the scheduler routes to it) and its engine.
    wait_until(lambda: fleet.engines().get(str(fleet.model), {}).get("state") == "ready")
    engine = fleet.engines()[str(fleet.model)]
    assert engine["max_num_seqs"] >= 1
    workers = fleet.orchestrator.http.get("/api/v1/workers").json()["workers"]
    assert str(fleet.model) in workers[0]["loaded_models"]


def test_max_tokens_bounds_every_completion(fleet: Fleet, first_task):
    task = fleet.run(fleet.spec(["one two three"], max_tokens=5, min_tokens=5))
    (r,) = task["result"]["responses"]
    assert r["completion_tokens"] == 5
    assert r["finish_reason"] == "length"
    assert task["result"]["warm"] is True and task["result"]["load_sec"] == 0


def test_greedy_decoding_gives_the_same_text_in_two_tasks(fleet: Fleet, first_task):
    spec = fleet.spec(["the quick brown fox", "seven eight nine"], max_tokens=12, spec_merge=False)
    first, second = fleet.run(spec), fleet.run(spec)
    assert texts(first) == texts(second)
    assert texts(first) != ["", ""]


def test_a_seed_makes_sampling_reproducible(fleet: Fleet, first_task):
    def sample(seed: int) -> list[str]:
        spec = fleet.spec(
            ["write a story"], max_tokens=16, temperature=1.0, seed=seed, spec_merge=False
        )
        return texts(fleet.run(spec))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_a_stop_string_ends_the_completion_before_it(fleet: Fleet, first_task):
    prompt = ["the quick brown fox"]
    (full,) = texts(fleet.run(fleet.spec(prompt, max_tokens=48)))
    # A stop string the greedy completion will meet: two letters from its middle.
    match = re.search(r"[a-z]{2}", full[4:])
    assert match, f"no letters to stop at in {full!r}"
    stop = match.group(0)
    task = fleet.run(fleet.spec(prompt, max_tokens=48, stop=[stop]))
    (r,) = task["result"]["responses"]
    assert r["text"] == full[: full.index(stop)]
    assert r["finish_reason"] == "stop"


def test_n_completions_per_prompt(fleet: Fleet, first_task):
    task = fleet.run(fleet.spec(["hello", "world"], n=3, temperature=1.0, seed=3, max_tokens=6))
    result = task["result"]
    for r in result["responses"]:
        assert [o["index"] for o in r["outputs"]] == [0, 1, 2]
        assert all(0 < o["completion_tokens"] <= 6 for o in r["outputs"])
        assert r["text"] == r["outputs"][0]["text"]
        assert len({o["text"] for o in r["outputs"]}) > 1  # sampled, not three copies
    assert result["usage"]["completion_tokens"] == sum(
        o["completion_tokens"] for r in result["responses"] for o in r["outputs"]
    )


def test_chat_messages_and_a_system_prompt_go_through_the_chat_template(fleet: Fleet, first_task):
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "tell me a story"},
        ]
    }
    task = fleet.run(fleet.spec([chat, "what time is it"], system_prompt="answer in french"))
    own, added = task["result"]["responses"]
    assert own["prompt"] == "<s><|system|>\nbe brief\n<|user|>\ntell me a story\n<|assistant|>\n"
    assert added["prompt"] == (
        "<s><|system|>\nanswer in french\n<|user|>\nwhat time is it\n<|assistant|>\n"
    )


def test_32_tasks_at_once_are_batched_by_the_one_engine(fleet: Fleet, first_task):
    # Long enough for the engine's health, reported with heartbeats, to show the batch.
    tokens = 2048
    solo = fleet.run(fleet.spec(["count with me"], max_tokens=tokens, min_tokens=tokens))
    solo_sec = solo["result"]["timings"]["generation_sec"]

    running: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            running.append(fleet.engines().get(str(fleet.model), {}).get("running", 0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        specs = [
            fleet.spec([f"prompt number {i}"], max_tokens=tokens, min_tokens=tokens)
            for i in range(32)
        ]
        r = fleet.orchestrator.http.post("/api/v1/tasks", json=specs)
        assert r.status_code == 201, r.text
        done = [fleet.wait(t["task_id"], timeout=240) for t in r.json()["tasks"]]
    finally:
        stop.set()
        watcher.join()
    assert all(t["status"] == "DONE" for t in done), [t["error"] for t in done if t["error"]]
    for t in done:
        assert t["result"]["warm"] is True
        assert t["result"]["responses"][0]["completion_tokens"] == tokens
    # The engine held many of them at once...
    assert max(running) > 1, running
    # ...and generated for all of them in about the time of one, where one task after
    # another would take 32 times as long.
    span = max(t["finished_at"] for t in done) - min(t["started_at"] for t in done)
    assert span < 8 * solo_sec + 2, (span, solo_sec)


def _long_spec(fleet: Fleet, **body) -> dict:
    # Sixteen prompts of the longest generation the engine allows: tens of seconds here, so
    # the task is still generating when the test has seen it in the engine (one such prompt
    # alone ended in about the time the worker record takes to show it).
    tokens = MODEL_MAX_LEN - 64
    return fleet.spec(["go on and on"] * 16, max_tokens=tokens, min_tokens=tokens, **body)


def _wait_running_on_engine(fleet: Fleet, task_id: str) -> None:
    def generating() -> bool:
        task = fleet.task(task_id)
        if task is None:
            return False
        assert task["status"] not in ("DONE", "FAILED", "CANCELLED"), task
        return task["status"] == "RUNNING" and fleet.engines()[str(fleet.model)]["running"] >= 1

    wait_until(generating, timeout=30, what="the long task to be generating")


def _assert_engine_idle_and_warm(fleet: Fleet) -> None:
    # The stopped request left the batch (aborted, not left generating)...
    wait_until(
        lambda: fleet.engines().get(str(fleet.model), {}).get("running") == 0,
        timeout=10,
        what="the engine to have no request running",
    )
    # ...and the model stayed loaded for the next task.
    after = fleet.run(fleet.spec(["still there?"]))
    assert after["status"] == "DONE", after["error"]
    assert after["result"]["warm"] is True
    assert after["result"]["load_sec"] == 0


def test_cancel_stops_a_long_generation_and_keeps_the_model_warm(fleet: Fleet, first_task):
    (task_id,) = fleet.orchestrator.submit(_long_spec(fleet))
    _wait_running_on_engine(fleet, task_id)
    r = fleet.orchestrator.http.post(f"/api/v1/tasks/{task_id}/cancel")
    assert r.status_code in (200, 202), r.text
    # Left alone, the generation would go on for 20 s or more (here), and end DONE.
    task = fleet.wait(task_id, timeout=40)
    assert task["status"] == "CANCELLED"
    _assert_engine_idle_and_warm(fleet)


def test_a_timeout_stops_a_long_generation_and_keeps_the_model_warm(fleet: Fleet, first_task):
    (task_id,) = fleet.orchestrator.submit(_long_spec(fleet, spec_timeoutSec=2, spec_maxAttempts=1))
    task = fleet.wait(task_id, timeout=45)
    assert task["status"] == "FAILED"
    assert task["error"]["kind"] == "timeout"
    _assert_engine_idle_and_warm(fleet)


def test_an_unknown_engine_option_is_refused_at_submit_naming_it(fleet: Fleet):
    spec = fleet.spec(["hi"])
    spec["spec"]["model"]["vllm"] = {"max_model_length": 512, "gpu_memory_utilization": 2}
    r = fleet.orchestrator.http.post("/api/v1/tasks", json=spec)
    assert r.status_code == 422, r.text
    assert "spec.model.vllm.max_model_length" in r.text
    assert "spec.model.vllm.gpu_memory_utilization" in r.text


def test_a_missing_model_directory_fails_at_once_as_permanent(fleet: Fleet, tmp_path):
    missing = tmp_path / "no-such-model"
    task = fleet.run(fleet.spec(["hi"], model=str(missing)), timeout=60)
    assert task["status"] == "FAILED"
    assert task["attempts"] == 1
    assert task["error"]["kind"] == "permanent"
    assert str(missing) in task["error"]["message"]
