"""The vLLM executor's own rules, without vLLM: spec validation, engine arguments, error
kinds, the warm-engine cache (on a stand-in engine), prompts and adapter archives.
Runs in every environment."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from executors.base import PermanentError, RetryableError, TaskContext
from executors.transformers_inference import TransformersInferenceExecutor
from executors.vllm_inference import (
    CudaOutOfMemory,
    VllmEngineOptions,
    VllmInferenceExecutor,
    VllmInferenceOptions,
    _Engine,
    engine_args,
    is_out_of_memory,
    load_error,
    lora_rank_for,
)
from flowmesh.spec import parse_task
from worker.artifacts.fetch import ArtifactCache, FetchSettings
from worker.child import describe_failure


def body(model: dict[str, Any] | None = None, items: Any = None, **inference: Any):
    spec: dict[str, Any] = {
        "taskType": "inference",
        "model": {"source": {"identifier": "/models/tiny"}, "engine": "vllm", **(model or {})},
        "data": {"items": ["hello"] if items is None else items},
    }
    if inference:
        spec["inference"] = inference
    return parse_task({"spec": spec}).spec


def problems(b) -> dict[str, str]:
    found = VllmInferenceExecutor.check_options(b) + VllmInferenceExecutor.validate_spec(b)
    return dict(found)


def test_a_plain_spec_has_no_problems_and_takes_the_defaults() -> None:
    b = body(
        {"vllm": {"max_model_len": 2048, "enforce_eager": True, "max_lora_rank": 16}},
        n=2,
        stop=["\n\n"],
        temperature=0.7,
        batch_size=4,
    )
    assert problems(b) == {}
    options = VllmInferenceExecutor.parse_options(b)
    assert (options.n, options.stop, options.max_tokens) == (2, ("\n\n",), 128)


def test_engine_options_are_checked_with_their_path() -> None:
    found = problems(
        body({"vllm": {"max_model_length": 1, "gpu_memory_utilization": 2, "max_lora_rank": 12}})
    )
    assert "Extra inputs" in found["spec.model.vllm.max_model_length"]
    assert "spec.model.vllm.gpu_memory_utilization" in found
    assert "one of 1, 8, 16" in found["spec.model.vllm.max_lora_rank"]
    # Numbers as numbers only, as everywhere in a spec.
    assert "spec.model.vllm.max_num_seqs" in problems(body({"vllm": {"max_num_seqs": "8"}}))


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"n": 0}, "spec.inference.n"),
        ({"stop": [""]}, "spec.inference.stop[0]"),
        ({"stop": "end"}, "spec.inference.stop"),
        ({"top_k": 0}, "spec.inference.top_k"),
        ({"max_tokens": 4, "min_tokens": 5}, "spec.inference"),
        ({"n": 2, "temperature": 0}, "spec.inference"),
        ({"beam_width": 2}, "spec.inference.beam_width"),
    ],
)
def test_bad_sampling_options_are_refused(options: dict[str, Any], path: str) -> None:
    assert path in problems(body(**options))


def test_prompts_and_model_are_required() -> None:
    found = problems(body(items=[]))
    assert "spec.data.items" in found
    found = problems(body(items=["ok", "  ", {"messages": []}]))
    assert set(found) == {"spec.data.items[1]", "spec.data.items[2]"}


@pytest.mark.parametrize(
    ("identifier", "ok"),
    [
        ("/adapters/sql", True),
        ("https://example.com/adapters/sql.tar.gz", True),
        ("https://example.com/a.tgz?token=x", True),
        ("https://example.com/adapters/sql.zip", False),
        ("s3://bucket/sql.tar.gz", False),
    ],
)
def test_an_adapter_is_a_directory_or_an_http_archive(identifier: str, ok: bool) -> None:
    found = problems(body({"lora": {"identifier": identifier, "name": "sql"}}))
    assert ("spec.model.lora.identifier" not in found) is ok


def test_the_transformers_engine_refuses_what_only_vllm_reads() -> None:
    b = body({"engine": "transformers", "vllm": {"max_model_len": 512}})
    assert "spec.model.vllm" in dict(TransformersInferenceExecutor.validate_spec(b))
    # Both engines serve LoRA adapters.
    b = body({"engine": "transformers", "lora": {"identifier": "/adapters/sql"}})
    assert "spec.model.lora" not in dict(TransformersInferenceExecutor.validate_spec(b))


def test_engine_args_follow_the_spec_and_the_gpus_given() -> None:
    spec = body({"dtype": "float16", "source": {"identifier": "org/m", "revision": "v2"}}).model
    assert spec is not None
    options = VllmEngineOptions(max_model_len=1024, enforce_eager=True)
    args = engine_args(spec, "org/m", options, (), 0)
    assert args["model"] == "org/m" and args["revision"] == "v2" and args["dtype"] == "float16"
    assert args["max_model_len"] == 1024 and args["enforce_eager"] is True
    assert "tensor_parallel_size" not in args and "enable_lora" not in args
    assert "gpu_memory_utilization" not in args  # vLLM's own default
    assert engine_args(spec, "org/m", options, (0, 1, 2, 3), 0)["tensor_parallel_size"] == 4
    explicit = VllmEngineOptions(tensor_parallel_size=2)
    assert engine_args(spec, "org/m", explicit, (0, 1, 2, 3), 0)["tensor_parallel_size"] == 2
    lora = engine_args(spec, "org/m", VllmEngineOptions(max_loras=2), (), 64)
    assert (lora["enable_lora"], lora["max_lora_rank"], lora["max_loras"]) == (True, 64, 2)


def test_an_engine_for_an_adapter_takes_a_rank_that_fits_the_next_ones_too() -> None:
    assert lora_rank_for(8, VllmEngineOptions()) == 64
    assert lora_rank_for(100, VllmEngineOptions()) == 128
    assert lora_rank_for(8, VllmEngineOptions(max_lora_rank=8)) == 8
    with pytest.raises(PermanentError, match="max_lora_rank"):
        lora_rank_for(32, VllmEngineOptions(max_lora_rank=16))
    with pytest.raises(PermanentError):
        lora_rank_for(1024, VllmEngineOptions())


def test_out_of_memory_is_a_cuda_oom_failure() -> None:
    torch_oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch.cuda"})
    assert is_out_of_memory(torch_oom("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:
        try:
            raise ValueError("No available memory for the cache blocks. Try increasing ...")
        except ValueError as inner:
            raise RuntimeError("engine start failed") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)
        error = load_error(outer, "org/m")
    assert isinstance(error, CudaOutOfMemory)
    recorded = describe_failure(error)
    assert (recorded["kind"], recorded["retryable"]) == ("cuda_oom", True)
    assert not is_out_of_memory(RuntimeError("CPU thread pool is busy"))


def test_engine_start_failures_say_whether_another_attempt_can_help() -> None:
    assert isinstance(load_error(ValueError("unsupported architecture Foo"), "m"), PermanentError)
    failed = load_error(RuntimeError("Engine core initialization failed. See root cause"), "m")
    assert type(failed) is RetryableError and "worker's log" in str(failed)
    missing = load_error(OSError("org/x is not a valid model identifier"), "org/x")
    assert isinstance(missing, PermanentError)
    offline = OSError(
        "Cannot find an appropriate cached snapshot folder for the specified revision on the "
        "local disk and outgoing traffic has been disabled."
    )
    assert "cannot be fetched" in str(load_error(offline, "org/x"))


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def fake_engine(templated: bool) -> _Engine:
    engine = _Engine(("m",), "m", (), 0, 0.9)
    engine.tokenizer, engine.templated = FakeTokenizer(), templated
    return engine


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one() -> None:
    items = [
        "hi",
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
    ]
    rendered = VllmInferenceExecutor._render_all(fake_engine(True), items, "be kind")
    assert [text for text, _ in rendered] == [
        "[system]be kind[user]hi[assistant]",
        "[system]s[user]q[assistant]",  # the item's own system message wins
    ]
    text, ids = rendered[0]
    assert ids == [ord(c) for c in text]  # the template's text holds its special tokens
    plain = VllmInferenceExecutor._render_all(fake_engine(False), [{"prompt": "hi"}], "be kind")
    assert plain == [("be kind\n\nhi", [1, *map(ord, "be kind\n\nhi")])]


# -- the warm-engine cache, on a stand-in for vLLM's AsyncLLM ------------------------------


class FakeLLM:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.shut = False
        self.model_config = SimpleNamespace(dtype="torch.float32")
        self.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=32))

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    def shutdown(self) -> None:
        self.shut = True


class Starts:
    """Replaces VllmInferenceExecutor._start: counts engine starts, each taking a moment."""

    def __init__(self, fail: bool = False) -> None:
        self.started: list[FakeLLM] = []
        self.fail = fail

    def __call__(self, engine: _Engine, args: dict[str, Any]) -> FakeLLM:
        threading.Event().wait(0.2)
        if self.fail:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        engine.device = "cpu"
        self.started.append(FakeLLM(args))
        return self.started[-1]


def acquire(ex: VllmInferenceExecutor, model: str, **engine: Any):
    spec = body({"source": {"identifier": model}}).model
    assert spec is not None
    options = VllmEngineOptions(**engine)
    return ex._acquire(spec, options, (), 0, engine_args(spec, model, options, (), 0))


@pytest.fixture
def executor(monkeypatch: pytest.MonkeyPatch) -> Iterator[VllmInferenceExecutor]:
    ex = VllmInferenceExecutor(max_warm_models=1)
    yield ex


def test_tasks_for_a_model_still_loading_share_its_one_engine(executor, monkeypatch) -> None:
    starts = Starts()
    monkeypatch.setattr(executor, "_start", starts)

    async def main() -> None:
        (a, load_a), (b, load_b) = await asyncio.gather(
            acquire(executor, "m"), acquire(executor, "m")
        )
        assert a is b and len(starts.started) == 1
        assert load_a > 0 and load_b > 0  # both waited for it: neither was warm
        assert executor.health() == {
            "loaded_models": ["m"],
            "loading_models": [],
            "engine": {"m": {"state": "ready", "running": 0, "max_num_seqs": 32}},
            "model_loads": 1,  # one engine started for both
        }
        executor._release(a)
        executor._release(b)
        c, load_c = await acquire(executor, "m")
        assert c is a and load_c == 0
        executor._release(c)

    asyncio.run(main())


def test_a_new_model_evicts_the_least_recent_idle_one_and_waits_for_a_busy_one(
    executor, monkeypatch
) -> None:
    starts = Starts()
    monkeypatch.setattr(executor, "_start", starts)

    async def main() -> None:
        first, _ = await acquire(executor, "m1")
        # m1 is in use: m2 waits for it to be let go of (one warm model here).
        second = asyncio.ensure_future(acquire(executor, "m2"))
        await asyncio.sleep(0.3)
        assert not second.done() and len(starts.started) == 1
        assert executor.health()["loaded_models"] == ["m1"]
        executor._release(first)
        engine, _ = await second
        assert starts.started[0].shut is True  # m1's engine was shut down
        assert executor.health()["loaded_models"] == ["m2"]
        executor._release(engine)

    asyncio.run(main())


def test_an_engine_that_fails_to_start_fails_every_task_waiting_and_is_forgotten(
    executor, monkeypatch
) -> None:
    monkeypatch.setattr(executor, "_start", Starts(fail=True))

    async def main() -> None:
        outcomes = await asyncio.gather(
            acquire(executor, "m"), acquire(executor, "m"), return_exceptions=True
        )
        assert all(isinstance(o, RetryableError) for o in outcomes)
        assert executor.health()["loaded_models"] == [] and executor._engines == {}

    asyncio.run(main())


def test_a_task_cancelled_while_the_engine_starts_leaves_it_starting_for_others(
    executor, monkeypatch
) -> None:
    starts = Starts()
    monkeypatch.setattr(executor, "_start", starts)

    async def main() -> None:
        first = asyncio.ensure_future(acquire(executor, "m"))
        await asyncio.sleep(0.05)
        assert executor.health()["loading_models"] == ["m"]
        first.cancel()
        engine, _ = await acquire(executor, "m")
        assert len(starts.started) == 1 and engine.users == 1
        executor._release(engine)

    asyncio.run(main())


# -- adapters ------------------------------------------------------------------------


def adapter_archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ADAPTER = {
    "sql/adapter_config.json": json.dumps({"r": 8, "peft_type": "LORA"}).encode(),
    "sql/adapter_model.safetensors": b"weights",
}


@pytest.fixture
def adapter_server(tmp_path: Path, serve_directory) -> tuple[str, list[str]]:
    (tmp_path / "sql.tar.gz").write_bytes(adapter_archive(ADAPTER))
    return serve_directory(tmp_path)


def task_for(tmp_path: Path, allowed: frozenset[str] = frozenset()) -> TaskContext:
    """A task whose sources resolve through a real download cache, as in a worker."""
    cache = ArtifactCache(FetchSettings(cache_dir=tmp_path / "cache", allowed_hosts=allowed))
    spec = parse_task({"spec": {"taskType": "inference"}})
    return TaskContext(
        task_id="t1", attempt=1, spec=spec, work_dir=tmp_path / "work", resolve=cache.resolve
    )


def test_an_adapter_url_is_downloaded_once_and_cached(adapter_server, tmp_path: Path) -> None:
    url, requests = adapter_server
    ex = VllmInferenceExecutor()
    task = task_for(tmp_path, frozenset({"127.0.0.1"}))
    lora = body({"lora": {"identifier": f"{url}/sql.tar.gz"}}).model.lora  # type: ignore[union-attr]

    async def main() -> None:
        (path, rank), again = await asyncio.gather(ex._adapter(task, lora), ex._adapter(task, lora))
        assert again == (path, rank) and rank == 8
        assert (path / "adapter_config.json").is_file() and path.name == "sql"
        missing = body({"lora": {"identifier": f"{url}/nope.tar.gz"}}).model.lora  # type: ignore[union-attr]
        with pytest.raises(PermanentError, match="404"):
            await ex._adapter(task, missing)

    asyncio.run(main())
    assert requests.count("/sql.tar.gz") == 1


def test_an_adapter_url_off_the_allow_list_is_refused_unfetched(
    adapter_server, tmp_path: Path
) -> None:
    url, requests = adapter_server
    lora = body({"lora": {"identifier": f"{url}/sql.tar.gz"}}).model.lora  # type: ignore[union-attr]
    with pytest.raises(PermanentError, match="ARTIFACT_ALLOWED_HOSTS"):
        asyncio.run(VllmInferenceExecutor()._adapter(task_for(tmp_path), lora))
    assert requests == []


def test_a_local_adapter_must_exist(tmp_path: Path) -> None:
    ex = VllmInferenceExecutor()
    lora = body({"lora": {"identifier": str(tmp_path / "none")}}).model.lora  # type: ignore[union-attr]
    with pytest.raises(PermanentError, match="not found"):
        asyncio.run(ex._adapter(task_for(tmp_path), lora))


def test_options_models_need_no_vllm() -> None:
    # The orchestrator validates specs with this module where vLLM is not installed.
    assert VllmInferenceOptions().batch_size == 8
    assert VllmEngineOptions().model_dump(exclude_none=True) == {}
