"""The `inference` executor, run in-process on tiny random-weight models built offline."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from executors.base import ExecutorConfig, PermanentError, TaskContext
from executors.transformers_inference import TransformersInferenceExecutor
from flowmesh.spec import parse_task
from flowmesh.tiny_models import build_tiny_gpt2, build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["hello world", "the quick brown fox", "tell me a story", "one two three", "hi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Skipped here rather than for the module: spec validation and the import check below
    # matter most exactly where the `inference` extra is not installed.
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_tiny_llama(root / "llama"),
        "llama_chat": build_tiny_llama(root / "llama-chat", chat_template=True),
        "gpt2": build_tiny_gpt2(root / "gpt2"),
        # Makes EOS likely at every step, so rows in one batch end at different lengths.
        "gpt2_eos": build_tiny_gpt2(root / "gpt2-eos", eos_bias=4.5),
    }


@pytest.fixture
def executor() -> Iterator[TransformersInferenceExecutor]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ex = TransformersInferenceExecutor()
    ex.setup(ExecutorConfig("w1", max_warm_models=2))
    yield ex
    ex.close()


def task(
    tmp_path: Path, model: Path | str, items: list[Any] | None = None, **inference: Any
) -> TaskContext:
    body: dict[str, Any] = {
        "taskType": "inference",
        "model": {"source": {"identifier": str(model)}},
        "data": {"items": PROMPTS if items is None else items},
    }
    if inference:
        body["inference"] = inference
    spec = parse_task({"spec": body})
    options = TransformersInferenceExecutor.parse_options(spec.spec)
    return TaskContext("t1", 1, spec, tmp_path, options=options)


def texts(result: dict[str, Any]) -> list[str]:
    return [r["text"] for r in result["responses"]]


def test_batches_answer_every_item_in_order(executor, models, tmp_path):
    result = executor.run(task(tmp_path, models["llama"], max_tokens=6, batch_size=2))

    responses = result["responses"]
    assert [r["index"] for r in responses] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in responses] == PROMPTS
    for r in responses:
        assert 0 < r["completion_tokens"] <= 6
        assert r["prompt_tokens"] > 0
        assert r["finish_reason"] in ("stop", "length")
        assert isinstance(r["text"], str)
    assert result["usage"] == {
        "prompt_tokens": sum(r["prompt_tokens"] for r in responses),
        "completion_tokens": sum(r["completion_tokens"] for r in responses),
    }
    assert result["model"] == str(models["llama"])
    assert result["dtype"] == "float32" or result["device"].startswith("cuda")
    assert result["cancelled"] is False


def test_rows_that_stop_early_exclude_the_batch_padding(executor, models, tmp_path):
    result = executor.run(
        task(tmp_path, models["gpt2_eos"], max_tokens=24, batch_size=5, temperature=1.0, seed=7)
    )

    responses = result["responses"]
    lengths = [r["completion_tokens"] for r in responses]
    # Rows shorter than the batch's longest were padded on the right after their EOS.
    assert min(lengths) < max(lengths)
    for r in responses:
        if r["finish_reason"] == "stop":
            assert r["completion_tokens"] < 24
        else:
            assert r["completion_tokens"] == 24
    assert any(r["finish_reason"] == "stop" for r in responses)


def test_eos_ends_a_completion_and_is_not_part_of_its_text(executor, models, tmp_path):
    result = executor.run(task(tmp_path, models["gpt2_eos"], max_tokens=8, temperature=0))

    for r in result["responses"]:
        assert (r["completion_tokens"], r["finish_reason"], r["text"]) == (1, "stop", "")


def test_greedy_is_deterministic(executor, models, tmp_path):
    first = executor.run(task(tmp_path, models["llama"], max_tokens=8, temperature=0))
    second = executor.run(task(tmp_path, models["llama"], max_tokens=8, temperature=0))
    assert texts(first) == texts(second)


def test_seeded_sampling_is_reproducible(executor, models, tmp_path):
    def sample(seed: int) -> list[str]:
        return texts(
            executor.run(task(tmp_path, models["llama"], max_tokens=8, temperature=1.0, seed=seed))
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_second_run_is_warm(executor, models, tmp_path):
    cold = executor.run(task(tmp_path, models["llama"], max_tokens=2))
    warm = executor.run(task(tmp_path, models["llama"], max_tokens=2))

    assert cold["warm"] is False and cold["load_sec"] > 0
    assert warm["warm"] is True and warm["load_sec"] == 0
    assert executor.health()["loaded_models"] == [str(models["llama"])]
    assert executor.health()["model_loads"] == 1  # the warm run loaded nothing


def test_least_recently_used_model_is_evicted(models, tmp_path):
    executor = TransformersInferenceExecutor()
    executor.setup(ExecutorConfig("w1", max_warm_models=1))
    executor.run(task(tmp_path, models["llama"], max_tokens=2))
    executor.run(task(tmp_path, models["gpt2"], max_tokens=2))

    assert executor.health()["loaded_models"] == [str(models["gpt2"])]
    # Evicted, llama is loaded again: every load counts.
    executor.run(task(tmp_path, models["llama"], max_tokens=2))
    assert executor.health()["model_loads"] == 3
    executor.close()
    assert executor.health()["loaded_models"] == []


def test_warm_model_limit_comes_from_the_workers_settings():
    executor = TransformersInferenceExecutor()
    executor.setup(ExecutorConfig("w1", max_warm_models=3))
    assert executor.max_warm_models == 3
    with pytest.raises(ValueError, match="MAX_WARM_MODELS"):
        executor.setup(ExecutorConfig("w1", max_warm_models=0))


def test_chat_template_renders_the_system_prompt(executor, models, tmp_path):
    from transformers import AutoTokenizer

    items = ["hello world", {"messages": [{"role": "user", "content": "tell me a story"}]}]
    result = executor.run(
        task(tmp_path, models["llama_chat"], items, max_tokens=4, system_prompt="Be brief.")
    )

    first, second = result["responses"]
    assert "Be brief." in first["prompt"] and "hello world" in first["prompt"]
    assert "Be brief." in second["prompt"] and "tell me a story" in second["prompt"]
    assert first["prompt"].endswith("<|assistant|>\n")
    # The template writes its own BOS; tokenizing must not add a second one.
    tokenizer = AutoTokenizer.from_pretrained(models["llama_chat"])
    assert first["prompt"].count(tokenizer.bos_token) == 1
    ids = tokenizer(first["prompt"], add_special_tokens=False)["input_ids"]
    assert first["prompt_tokens"] == len(ids)


def test_a_chat_that_brings_its_own_system_message_keeps_it(executor, models, tmp_path):
    chat = [{"role": "system", "content": "Speak French."}, {"role": "user", "content": "hi"}]
    result = executor.run(
        task(
            tmp_path,
            models["llama_chat"],
            [{"messages": chat}],
            max_tokens=2,
            system_prompt="Be brief.",
        )
    )

    prompt = result["responses"][0]["prompt"]
    assert "Speak French." in prompt and "Be brief." not in prompt


def test_without_a_chat_template_prompts_are_concatenated(executor, models, tmp_path):
    items = [
        {"prompt": "hello world"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
    ]
    result = executor.run(
        task(tmp_path, models["gpt2"], items, max_tokens=2, system_prompt="Be brief.")
    )

    assert [r["prompt"] for r in result["responses"]] == [
        "Be brief.\n\nhello world",
        "Be brief.\n\nhi\nyes",
    ]


def test_concurrent_tasks_share_one_warm_model(executor, models, tmp_path):
    expected = texts(executor.run(task(tmp_path, models["llama"], max_tokens=4, temperature=0)))
    results: list[dict[str, Any]] = []

    def run() -> None:
        results.append(executor.run(task(tmp_path, models["llama"], max_tokens=4, temperature=0)))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert [texts(r) for r in results] == [expected] * 3
    assert all(r["warm"] for r in results)


def test_missing_local_model_is_a_permanent_error(executor, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PermanentError, match="no-such-model") as info:
        executor.run(task(tmp_path, missing))
    assert info.value.retryable is False


def test_a_directory_that_is_not_a_model_is_a_permanent_error(executor, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PermanentError, match="empty"):
        executor.run(task(tmp_path, tmp_path / "empty"))


def test_cancelled_before_run_generates_nothing(executor, models, tmp_path):
    ctx = task(tmp_path, models["llama"], batch_size=1)
    ctx.cancelled.set()

    result = executor.run(ctx)

    assert result["cancelled"] is True
    assert result["responses"] == []
    assert executor.health()["loaded_models"] == []


def test_cancel_between_batches_keeps_finished_work(executor, models, tmp_path, monkeypatch):
    ctx = task(tmp_path, models["llama"], max_tokens=2, batch_size=2)
    generate = executor._generate

    def generate_then_cancel(*args: Any) -> list[dict[str, Any]]:
        ctx.cancelled.set()
        return generate(*args)

    monkeypatch.setattr(executor, "_generate", generate_then_cancel)
    result = executor.run(ctx)

    assert result["cancelled"] is True
    assert [r["index"] for r in result["responses"]] == [0, 1]
    assert result["usage"]["completion_tokens"] == sum(
        r["completion_tokens"] for r in result["responses"]
    )


def body(spec: dict[str, Any]) -> Any:
    return parse_task({"spec": {"taskType": "inference", **spec}}).spec


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"data": {"items": ["hi"]}}, "spec.model.source.identifier"),
        ({"model": {"source": {"identifier": "m"}}, "data": {"items": []}}, "spec.data.items"),
        ({"model": {"source": {"identifier": "m"}}}, "spec.data.items"),
        (
            {"model": {"source": {"identifier": "m"}}, "data": {"items": ["a", "b", 3]}},
            "spec.data.items[2]",
        ),
        (
            {"model": {"source": {"identifier": "m"}}, "data": {"items": ["a", {"prompt": 1}]}},
            "spec.data.items[1]",
        ),
        (
            {
                "model": {"source": {"identifier": "m"}},
                "data": {"items": [{"messages": [{"role": "user"}]}]},
            },
            "spec.data.items[0]",
        ),
        ({"model": {"source": {"identifier": "m"}}, "data": {"items": [""]}}, "spec.data.items[0]"),
    ],
)
def test_validate_spec_names_the_bad_field(spec, path):
    problems = TransformersInferenceExecutor.validate_spec(body(spec))
    assert [p for p, _ in problems] == [path]


def test_validate_spec_accepts_every_item_shape():
    spec = {
        "model": {"source": {"identifier": "org/model"}},
        "data": {
            "items": ["hi", {"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}]
        },
    }
    assert TransformersInferenceExecutor.validate_spec(body(spec)) == []


def test_importing_the_module_does_not_import_torch():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import executors.transformers_inference, sys; print('torch' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False"


def test_options_are_checked_against_the_executors_own_model():
    spec = {"inference": {"temperature": -1, "bogus": 1}, "training": {"epochs": 1}}
    problems = TransformersInferenceExecutor.check_options(body(spec))
    assert sorted(p for p, _ in problems) == [
        "spec.inference.bogus",
        "spec.inference.temperature",
        "spec.training",
    ]
    assert "spec.inference" in dict(problems)["spec.training"]
