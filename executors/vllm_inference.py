"""`vllm`: text generation on vLLM engines kept warm per model, batching across tasks.

Tasks are coroutines awaited side by side (`arun`); every prompt is one request to the
model's one engine, which batches all the requests in flight, whichever task sent them.
vllm is imported inside methods: the orchestrator imports this module to validate specs at
submit time, where vLLM is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from executors.base import (
    INFERENCE_RESULT_FIELDS,
    Executor,
    ExecutorConfig,
    ExecutorError,
    PermanentError,
    RetryableError,
    TaskContext,
)
from executors.transformers_inference import (
    _NOT_FOUND,
    _UNREACHABLE,
    _chain,
    _messages,
    deterministic_sampling,
    local_source,
    model_and_prompt_problems,
)
from flowmesh.failures import FailureKind
from flowmesh.spec import Bool, Float, Int, LoraSource, ModelSpec, TaskBody, field_path

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

# The ranks vLLM's max_lora_rank takes; an engine serves adapters up to its rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# An engine started for an adapter takes adapters up to this rank (or the adapter's own,
# when larger), so the next adapter of a similar size needs no second engine.
DEFAULT_LORA_RANK = 64
DEFAULT_MAX_LORAS = 4
MAX_ADAPTER_BYTES = 4 << 30
# vLLM's share of each GPU for one engine when gpu_memory_utilization is not given.
DEFAULT_GPU_SHARE = 0.92

# The messages of an accelerator running out of memory: PyTorch's, and vLLM's own when the
# KV cache cannot be allocated (its wording varies between releases).
_OOM = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|No available memory for the cache blocks|"
    r"larger than the available KV cache memory|cannot allocate KV cache|"
    r"Cannot auto-fit max_model_len",
    re.IGNORECASE,
)

# The hub cannot be asked (no network, HF_HUB_OFFLINE) and the model is not in the cache.
_OFFLINE = re.compile(
    r"couldn't connect to|outgoing traffic has been disabled|"
    r"Cannot find an appropriate cached snapshot"
)


def _lora_rank(value: int | None) -> int | None:
    if value is not None and value not in LORA_RANKS:
        raise ValueError(f"must be one of {', '.join(map(str, LORA_RANKS))}")
    return value


class VllmEngineOptions(BaseModel):
    """`spec.model.vllm`: engine arguments, passed to vLLM's AsyncEngineArgs of the same
    names. The model's dtype, revision and trust_remote_code come from `spec.model`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_model_len: Int | None = Field(None, ge=16, le=1 << 22)
    gpu_memory_utilization: Float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: Int | None = Field(
        None, ge=1, le=64, description="Default: the number of GPUs given to the task"
    )
    enforce_eager: Bool | None = None
    quantization: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")
    max_num_seqs: Int | None = Field(None, ge=1, le=16384)
    max_num_batched_tokens: Int | None = Field(None, ge=16, le=1 << 22)
    kv_cache_memory_bytes: Int | None = Field(None, ge=1 << 20, le=1 << 50)
    kv_cache_dtype: Literal["auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = (
        None
    )
    enable_prefix_caching: Bool | None = None
    cpu_offload_gb: Float | None = Field(None, ge=0, le=65536)
    max_lora_rank: Annotated[Int | None, AfterValidator(_lora_rank)] = None
    max_loras: Int | None = Field(None, ge=1, le=256)


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class VllmInferenceOptions(BaseModel):
    """`spec.inference` on the vLLM engine: sampling, per prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: Int = Field(128, ge=1, le=1 << 20)
    min_tokens: Int = Field(0, ge=0, le=1 << 20, description="Tokens before EOS may end it")
    temperature: Float = Field(1.0, ge=0, le=10, description="0: greedy")
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: Int | None = Field(None, ge=1)
    min_p: Float = Field(0.0, ge=0, le=1)
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    repetition_penalty: Float = Field(1.0, gt=0, le=10)
    n: Int = Field(1, ge=1, le=128, description="Completions per prompt")
    stop: tuple[StopString, ...] = Field((), max_length=32, description="Ends a completion")
    system_prompt: str | None = None
    batch_size: Int = Field(
        8,
        ge=1,
        le=4096,
        description="Accepted as for the Transformers engine, with no effect: the vLLM "
        "engine batches every request in flight, across tasks",
    )
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _min_within_max(self) -> VllmInferenceOptions:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n above 1 needs sampling (temperature above 0): greedy gives one")
        return self


class CudaOutOfMemory(RetryableError):
    """The accelerator ran out of memory: the weights, the KV cache or a step's activations."""

    kind = FailureKind.CUDA_OOM


def is_out_of_memory(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        kind = type(seen)
        if kind.__name__ == "OutOfMemoryError" and kind.__module__.startswith("torch"):
            return True
        if _OOM.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_error(exc: BaseException, identifier: str) -> ExecutorError:
    """What a failed engine start means for the task."""
    if isinstance(exc, ExecutorError):
        return exc
    text = _chain(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_out_of_memory(exc):
        return CudaOutOfMemory(f"model {identifier!r}: out of memory starting the engine: {text}")
    if _NOT_FOUND.search(text):
        return PermanentError(f"model {identifier!r} not found: no such hub repository ({first})")
    if _OFFLINE.search(text) or _UNREACHABLE.search(text):
        return PermanentError(
            f"model {identifier!r} cannot be fetched: the model hub is unreachable from this "
            f"worker and the model is not in its cache ({first})"
        )
    if "Engine core initialization failed" in text:
        # The engine core is a process of its own: its error is in the worker's log only.
        return RetryableError(
            f"model {identifier!r}: the vLLM engine failed to start; its own error is in the "
            f"worker's log ({first})"
        )
    if isinstance(exc, ValueError):  # a config vLLM refuses (pydantic's errors included)
        return PermanentError(f"cannot start vLLM on model {identifier!r}: {text}")
    return RetryableError(f"cannot start vLLM on model {identifier!r}: {text}")


def engine_args(
    model: ModelSpec,
    source: str,
    options: VllmEngineOptions,
    devices: tuple[int, ...],
    lora_rank: int,
) -> dict[str, Any]:
    """The AsyncEngineArgs of the engine for a task (no vllm import: unit-tested as is)."""
    args: dict[str, Any] = {
        "model": source,
        "revision": model.source.revision,
        "tokenizer_revision": model.source.revision,
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
        # Per-request stats give each request's time to first token (the executor asks for
        # final outputs only); the engine also logs its throughput now and then.
        "disable_log_stats": False,
    }
    args.update(options.model_dump(exclude_none=True, exclude={"max_lora_rank", "max_loras"}))
    if len(devices) > 1 and options.tensor_parallel_size is None:
        args["tensor_parallel_size"] = len(devices)
    if lora_rank:
        args.update(
            enable_lora=True,
            max_lora_rank=lora_rank,
            max_loras=options.max_loras or DEFAULT_MAX_LORAS,
        )
    return args


def lora_rank_for(adapter_rank: int, options: VllmEngineOptions) -> int:
    """The max_lora_rank of an engine that serves an adapter of `adapter_rank`."""
    if options.max_lora_rank is not None:
        if adapter_rank > options.max_lora_rank:
            raise PermanentError(
                f"spec.model.lora: the adapter's rank {adapter_rank} is above "
                f"spec.model.vllm.max_lora_rank {options.max_lora_rank}"
            )
        return options.max_lora_rank
    wanted = max(adapter_rank, DEFAULT_LORA_RANK)
    rank = next((r for r in LORA_RANKS if r >= wanted), None)
    if rank is None:
        raise PermanentError(
            f"spec.model.lora: rank {adapter_rank} is above vLLM's {LORA_RANKS[-1]}"
        )
    return rank


@dataclass(eq=False)
class _Engine:
    """One AsyncLLM and what the executor counts about it (on the event loop's thread)."""

    base: tuple[Any, ...]  # model, revision, dtype, trust_remote_code, options, devices
    identifier: str
    devices: tuple[int, ...]
    lora_rank: int  # 0: started without LoRA
    gpu_share: float
    ready: asyncio.Future[None] | None = None
    llm: AsyncLLM | None = None
    tokenizer: Any = None
    templated: bool = False
    device: str = ""
    dtype: str = ""
    max_num_seqs: int | None = None
    running: int = 0  # requests in flight on it
    users: int = 0  # tasks holding it

    @property
    def key(self) -> tuple[Any, ...]:
        return (*self.base, self.lora_rank)

    @property
    def loaded(self) -> bool:
        ready = self.ready
        return (
            ready is not None and ready.done() and not ready.cancelled() and not ready.exception()
        )


@dataclass
class _Completion:
    parts: list[str]
    tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class VllmInferenceExecutor(Executor):
    """`taskType: inference` with `spec.model.engine: vllm`.

    The result has the Transformers executor's shape: `model`, `device`, `dtype`,
    `responses` (index, prompt, text, prompt_tokens, completion_tokens, finish_reason),
    `usage`, `load_sec`, `elapsed_sec`, `warm`; and `engine: "vllm"`, `timings` (load_sec,
    ttft_sec: to the first token of the first prompt, generation_sec, elapsed_sec), `lora`
    (the adapter's name) when one is used. With `n > 1` each response also lists its
    `outputs` (index, text, completion_tokens, finish_reason); its own text,
    completion_tokens and finish_reason are those of the first, and `usage` counts all.
    """

    name = "vllm"
    result_fields = INFERENCE_RESULT_FIELDS
    section = "inference"
    requires = ("vllm",)
    extra = "vllm"
    options = VllmInferenceOptions
    isolation = "shared"
    # Tasks are awaited side by side and their requests batched by the engine: as many as
    # vLLM batches by default (max_num_seqs 256), so the worker's slots (sized from this)
    # keep a whole batch in the engine; fewer would cap the batch below what vLLM runs.
    max_concurrency = 256
    shares_devices = True
    merges = True

    def __init__(self, max_warm_models: int = 2) -> None:
        self.max_warm_models = max_warm_models
        self._engines: OrderedDict[tuple[Any, ...], _Engine] = OrderedDict()
        self._health: dict[str, Any] = {
            "loaded_models": [],
            "loading_models": [],
            "engine": {},
            "model_loads": 0,
        }
        self._loads = 0  # engines started since setup (health: model_loads)
        self._released = asyncio.Event()  # an engine was let go of, or went away
        self._lora_ids: dict[str, int] = {}
        self._gpus_assigned = False
        self._visible: list[str] | None = None
        self._env_lock = threading.Lock()  # CUDA_VISIBLE_DEVICES while an engine starts
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def deterministic(cls, body: TaskBody, options: Any) -> bool:
        return deterministic_sampling(options)

    @classmethod
    def validate_spec(cls, body: TaskBody) -> list[tuple[str, str]]:
        problems = model_and_prompt_problems(body)
        if body.model is not None:
            try:
                VllmEngineOptions.model_validate(body.model.vllm)
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    problems.append((field_path(err["loc"], "spec.model.vllm"), err["msg"]))
            if body.model.lora is not None and (problem := _lora_problem(body.model.lora)):
                problems.append(("spec.model.lora.identifier", problem))
        return problems

    def setup(self, config: ExecutorConfig) -> None:
        if config.max_warm_models < 1:
            raise ValueError(f"MAX_WARM_MODELS must be at least 1, got {config.max_warm_models}")
        self.max_warm_models = config.max_warm_models
        self._gpus_assigned = bool(config.devices)
        # The worker set it for this process: CUDA ordinal i is entry i.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._visible = visible.split(",") if visible else None

    async def arun(self, task: TaskContext) -> dict[str, Any]:
        started = time.monotonic()
        body = task.body
        problems = self.validate_spec(body)
        if problems or body.model is None or body.data is None:
            raise PermanentError("; ".join(f"{path}: {msg}" for path, msg in problems))
        opts: VllmInferenceOptions = task.options or VllmInferenceOptions()
        spec = body.model
        engine_opts = VllmEngineOptions.model_validate(spec.vllm)
        source = _model_source(await asyncio.to_thread(local_source, task, spec.source.identifier))
        adapter = await self._adapter(task, spec.lora) if spec.lora is not None else None
        rank = lora_rank_for(adapter[1], engine_opts) if adapter else 0
        args = engine_args(spec, source, engine_opts, task.devices, rank)
        engine, load_sec = await self._acquire(spec, engine_opts, task.devices, rank, args)
        try:
            items = body.data.items
            prompts = await asyncio.to_thread(self._render_all, engine, items, opts.system_prompt)
            params = self._sampling(opts)
            lora = self._lora_request(spec.lora, adapter[0]) if spec.lora and adapter else None
            generating = time.monotonic()
            responses, first_token = await self._generate_all(task, engine, prompts, params, lora)
            done = time.monotonic()
        finally:
            self._release(engine)
        usage = {
            "prompt_tokens": sum(r["prompt_tokens"] for r in responses),
            "completion_tokens": sum(
                sum(o["completion_tokens"] for o in r.get("outputs", [r])) for r in responses
            ),
        }
        elapsed = round(done - started, 4)
        result: dict[str, Any] = {
            "model": spec.source.identifier,
            "engine": "vllm",
            "device": engine.device,
            "dtype": engine.dtype,
            "responses": responses,
            "usage": usage,
            "elapsed_sec": elapsed,
            "load_sec": round(load_sec, 4),
            "warm": load_sec == 0,
            "timings": {
                "load_sec": round(load_sec, 4),
                "ttft_sec": round(first_token - generating, 4) if first_token else None,
                "generation_sec": round(done - generating, 4),
                "elapsed_sec": elapsed,
            },
        }
        if lora is not None:
            result["lora"] = lora.lora_name
        return result

    def health(self) -> dict[str, Any]:
        return self._health  # replaced whole on the loop's thread, never changed in place

    def close(self) -> None:
        while self._engines:
            _, engine = self._engines.popitem(last=False)
            if engine.llm is not None:
                llm, engine.llm = engine.llm, None
                llm.shutdown()
                del llm
        gc.collect()
        self._publish()

    # -- engines (all on the event loop's thread) -----------------------------------

    async def _acquire(
        self,
        spec: ModelSpec,
        options: VllmEngineOptions,
        devices: tuple[int, ...],
        lora_rank: int,
        args: dict[str, Any],
    ) -> tuple[_Engine, float]:
        """The engine for a task, started if need be; and how long the task waited for it
        (0 when it was warm). Tasks that want an engine still starting wait for that one."""
        started = time.monotonic()
        base = (
            spec.source.identifier,
            spec.source.revision,
            spec.dtype,
            spec.trust_remote_code,
            options.model_dump_json(exclude={"max_lora_rank", "max_loras"}),
            devices,
        )
        engine = self._find(base, lora_rank)
        if engine is None:
            share = options.gpu_memory_utilization or DEFAULT_GPU_SHARE
            new = _Engine(base, spec.source.identifier, devices, lora_rank, share)
            await self._make_room(new)
            # Another task may have started one while this one made room.
            engine = self._find(base, lora_rank)
            if engine is None:
                engine = new
                engine.ready = asyncio.ensure_future(self._load(engine, args))
                engine.ready.add_done_callback(self._loaded)
                self._engines[engine.key] = engine
        warm = engine.loaded
        engine.users += 1
        self._engines.move_to_end(engine.key)
        self._publish()
        try:
            assert engine.ready is not None
            # Shielded: a task cancelled while it waits leaves the start to the others.
            await asyncio.shield(engine.ready)
        except BaseException:
            self._release(engine)
            raise
        return engine, 0.0 if warm else time.monotonic() - started

    def _find(self, base: tuple[Any, ...], lora_rank: int) -> _Engine | None:
        """A warm or starting engine for `base` that serves adapters up to `lora_rank`
        (the one with the smallest rank that does: a task without one takes any)."""
        fits = [e for e in self._engines.values() if e.base == base and e.lora_rank >= lora_rank]
        return min(fits, key=lambda e: e.lora_rank, default=None)

    def _in_the_way(self, new: _Engine) -> list[_Engine]:
        """Engines that must go before `new` starts, least recently used first: those
        beyond max_warm_models, and on GPUs those whose memory `new` needs."""
        engines = list(self._engines.values())
        out = engines[: max(len(engines) + 1 - self.max_warm_models, 0)]
        if new.devices:
            sharing = [e for e in engines if set(e.devices) & set(new.devices) and e not in out]
            need = new.gpu_share + sum(e.gpu_share for e in sharing)
            for engine in sharing:
                if need <= 1.0:
                    break
                out.append(engine)
                need -= engine.gpu_share
        return out

    async def _make_room(self, new: _Engine) -> None:
        while in_the_way := self._in_the_way(new):
            idle = [e for e in in_the_way if e.users == 0 and e.loaded]
            if idle:
                await self._evict(idle[0])
                continue
            # Every engine in the way serves tasks (or is starting): wait for one to let go.
            self._released.clear()
            await self._released.wait()

    async def _evict(self, engine: _Engine) -> None:
        if self._engines.get(engine.key) is engine:
            del self._engines[engine.key]
        self._publish()
        if engine.llm is not None:
            llm, engine.llm = engine.llm, None
            await asyncio.to_thread(llm.shutdown)
            del llm
            gc.collect()
        self._released.set()

    def _release(self, engine: _Engine) -> None:
        engine.users -= 1
        self._publish()
        self._released.set()

    async def _load(self, engine: _Engine, args: dict[str, Any]) -> None:
        try:
            # from_engine_args blocks until the engine core is up (seconds to minutes):
            # on a thread, so warm engines go on serving meanwhile.
            llm = await asyncio.to_thread(self._start, engine, args)
            engine.llm = llm
            engine.tokenizer = llm.get_tokenizer()
            engine.templated = bool(getattr(engine.tokenizer, "chat_template", None))
            engine.dtype = str(llm.model_config.dtype).removeprefix("torch.")
            engine.max_num_seqs = llm.vllm_config.scheduler_config.max_num_seqs
            self._loads += 1
        except Exception as exc:
            if self._engines.get(engine.key) is engine:
                del self._engines[engine.key]
            raise load_error(exc, engine.identifier) from exc

    def _loaded(self, ready: asyncio.Future[None]) -> None:
        """An engine started, or failed to: it shows, and it may make room."""
        if not ready.cancelled():
            ready.exception()  # retrieved, even when no task waits for it any more
        self._publish()
        self._released.set()

    def _start(self, engine: _Engine, args: dict[str, Any]) -> AsyncLLM:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            engine.device = "cpu"
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        if self._gpus_assigned and not engine.devices:
            raise PermanentError(
                "this worker's vLLM runs on GPUs and the task was given none: ask for "
                "spec.resources.hardware.gpu.count of 1 or more"
            )
        ordinals = engine.devices or (0,)
        engine.device = ",".join(f"cuda:{d}" for d in ordinals)
        if not engine.devices:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        # The engine's processes use the first GPUs they see: show them the task's.
        visible = [self._visible[d] if self._visible else str(d) for d in engine.devices]
        with self._env_lock:
            before = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
            try:
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
            finally:
                if before is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before

    def _publish(self) -> None:
        """Health as health() reports it, rebuilt after each change (health() runs on
        another thread, and must not walk the engines while they change)."""
        engines: dict[str, dict[str, Any]] = {}
        loaded: list[str] = []
        loading: list[str] = []
        for e in self._engines.values():
            state = "ready" if e.loaded else "loading"
            (loaded if e.loaded else loading).append(e.identifier)
            seen = engines.setdefault(
                e.identifier, {"state": state, "running": 0, "max_num_seqs": e.max_num_seqs}
            )
            seen["running"] += e.running
            if e.loaded:
                seen.update(state="ready", max_num_seqs=e.max_num_seqs)
        self._health = {
            "loaded_models": list(dict.fromkeys(loaded)),
            "loading_models": [m for m in dict.fromkeys(loading) if m not in loaded],
            "engine": engines,
            "model_loads": self._loads,
        }

    # -- requests ---------------------------------------------------------------------

    @staticmethod
    def _render_all(
        engine: _Engine, items: list[Any], system: str | None
    ) -> list[tuple[str, list[int]]]:
        """Each item as the prompt text and the token ids the engine gets."""
        tokenizer = engine.tokenizer
        out = []
        for i, item in enumerate(items):
            messages = _messages(item)
            if not engine.templated:
                text = "\n".join(m["content"] for m in messages)
                text = f"{system}\n\n{text}" if system else text
                out.append((text, list(tokenizer.encode(text))))
                continue
            # An item's own system message wins; many templates reject a second one.
            if system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *messages]
            try:
                text = str(
                    tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False
                    )
                )
            except Exception as exc:  # jinja raises its own errors for chats a template rejects
                raise PermanentError(f"spec.data.items[{i}]: chat template: {exc}") from exc
            # A rendered template already holds its special tokens (often a BOS).
            out.append((text, list(tokenizer.encode(text, add_special_tokens=False))))
        return out

    @staticmethod
    def _sampling(opts: VllmInferenceOptions) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        fields: dict[str, Any] = {
            "n": opts.n,
            "max_tokens": opts.max_tokens,
            "min_tokens": opts.min_tokens,
            "temperature": opts.temperature,
            "top_p": opts.top_p,
            "min_p": opts.min_p,
            "presence_penalty": opts.presence_penalty,
            "frequency_penalty": opts.frequency_penalty,
            "repetition_penalty": opts.repetition_penalty,
            "stop": list(opts.stop) or None,
            "seed": opts.seed,
            # One output per request, at its end: streaming every token to this loop costs
            # Python work per token per request that a batch of hundreds feels (0.8x of
            # LLM.generate with DELTA on a CPU engine). The first token's time comes from
            # the request's metrics.
            "output_kind": RequestOutputKind.FINAL_ONLY,
        }
        if opts.top_k is not None:
            fields["top_k"] = opts.top_k
        try:
            return SamplingParams(**fields)
        except (VLLMClientError, ValueError) as exc:
            raise PermanentError(f"spec.inference: {exc}") from exc

    def _lora_request(self, lora: LoraSource, path: Path) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(str(path), len(self._lora_ids) + 1)
        return LoRARequest(lora.name or path.name, lora_id, str(path))

    async def _generate_all(
        self,
        task: TaskContext,
        engine: _Engine,
        prompts: list[tuple[str, list[int]]],
        params: SamplingParams,
        lora: LoRARequest | None,
    ) -> tuple[list[dict[str, Any]], float | None]:
        """Every prompt as a request of its own, all in flight at once; the responses, and
        when the first prompt's first token came."""
        first_token: list[float] = []
        runs = [
            asyncio.ensure_future(
                self._generate(
                    engine,
                    f"{task.task_id}-{task.attempt}-{i}",
                    i,
                    text,
                    ids,
                    params,
                    lora,
                    first_token if i == 0 else None,
                )
            )
            for i, (text, ids) in enumerate(prompts)
        ]
        try:
            responses = await asyncio.gather(*runs)
        except BaseException:
            # A failed prompt (or a cancel) ends the task: its other requests leave too.
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            raise
        return responses, first_token[0] if first_token else None

    async def _generate(
        self,
        engine: _Engine,
        request_id: str,
        index: int,
        text: str,
        ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None,
        first_token: list[float] | None,
    ) -> dict[str, Any]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        assert engine.llm is not None
        completions: dict[int, _Completion] = {}
        engine.running += 1
        self._publish()
        submitted = time.monotonic()
        try:
            async for out in engine.llm.generate(
                {"prompt_token_ids": ids}, params, request_id, lora_request=lora
            ):
                for c in out.outputs:
                    seen = completions.setdefault(c.index, _Completion([]))
                    seen.parts.append(c.text)
                    seen.tokens += len(c.token_ids)
                    seen.finish_reason = c.finish_reason or seen.finish_reason
                latency = getattr(out.metrics, "first_token_latency", 0.0) or 0.0
                if first_token is not None and not first_token and latency > 0:
                    first_token.append(submitted + latency)
        except asyncio.CancelledError:
            # A cancel or a timeout: this request leaves the batch, the engine stays.
            with contextlib.suppress(Exception):
                await engine.llm.abort(request_id)
            raise
        except EngineDeadError as exc:
            # Its core process is gone: the next task starts a new engine.
            evicting = asyncio.ensure_future(self._evict(engine))
            self._background.add(evicting)
            evicting.add_done_callback(self._background.discard)
            if is_out_of_memory(exc):
                raise CudaOutOfMemory(f"the vLLM engine ran out of memory: {_chain(exc)}") from exc
            raise RetryableError(
                f"the vLLM engine died; its own error is in the worker's log: {_chain(exc)}"
            ) from exc
        except (VLLMClientError, ValueError) as exc:  # a request it refuses: a prompt too long
            raise PermanentError(f"spec.data.items[{index}]: {exc}") from exc
        except Exception as exc:
            if is_out_of_memory(exc):
                raise CudaOutOfMemory(f"the vLLM engine ran out of memory: {_chain(exc)}") from exc
            raise
        finally:
            engine.running -= 1
            self._publish()
        outputs = [completions.get(i, _Completion([])) for i in range(params.n)]
        response: dict[str, Any] = {
            "index": index,
            "prompt": text,
            "text": outputs[0].text,
            "prompt_tokens": len(ids),
            "completion_tokens": outputs[0].tokens,
            "finish_reason": outputs[0].finish_reason,
        }
        if params.n > 1:
            response["outputs"] = [
                {
                    "index": i,
                    "text": o.text,
                    "completion_tokens": o.tokens,
                    "finish_reason": o.finish_reason,
                }
                for i, o in enumerate(outputs)
            ]
        return response

    # -- adapters ---------------------------------------------------------------------

    async def _adapter(self, task: TaskContext, lora: LoraSource) -> tuple[Path, int]:
        """The adapter's local directory (a URL or archive is downloaded, checked and
        extracted once by the worker's cache: allowed hosts only) and its rank."""
        path = Path(await asyncio.to_thread(local_source, task, lora.identifier)).expanduser()
        if not path.is_dir():
            raise PermanentError(
                f"spec.model.lora: adapter {lora.identifier!r} not found: no such directory"
            )
        root = _adapter_root(path)
        if root is None:
            raise PermanentError(f"spec.model.lora: no adapter_config.json in {lora.identifier}")
        try:
            config = json.loads((root / "adapter_config.json").read_text())
            ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
            rank = max(int(r) for r in ranks)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PermanentError(
                f"spec.model.lora: {lora.identifier!r} is not a PEFT LoRA adapter "
                f"(adapter_config.json with its rank `r`): {exc}"
            ) from exc
        return root, rank


def _lora_problem(lora: LoraSource) -> str | None:
    identifier = lora.identifier
    if identifier.startswith(("http://", "https://")):
        path = identifier.split("?", 1)[0].split("#", 1)[0]
        if not path.endswith((".tar.gz", ".tgz", ".tar.zst", ".tar")):
            return "an http(s) URL must name a .tar.gz (or .tar.zst, .tar) archive of the adapter"
        return None
    if "://" in identifier:
        return "a local adapter directory, or an http(s) URL of a .tar.gz archive"
    return None


def _model_source(identifier: str) -> str:
    """A local model directory as an absolute path; a hub id as it is."""
    if identifier.startswith(("/", "./", "../", "~")) or Path(identifier).exists():
        path = Path(identifier).expanduser()
        if not path.is_dir():
            raise PermanentError(f"model {identifier!r} not found: no such local directory")
        return str(path.resolve())
    return identifier


def _adapter_root(directory: Path) -> Path | None:
    """The directory holding adapter_config.json: `directory`, or its one subdirectory."""
    if (directory / "adapter_config.json").is_file():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / "adapter_config.json").is_file():
        return subdirs[0]
    return None
