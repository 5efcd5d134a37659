"""`inference`: batched text generation with a Hugging Face causal LM, kept warm between tasks.

torch and transformers are imported inside methods: the orchestrator imports this module to
validate specs at submit time, where the `inference` extra need not be installed.
"""

from __future__ import annotations

import gc
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from executors.base import (
    INFERENCE_RESULT_FIELDS,
    Executor,
    ExecutorConfig,
    ExecutorError,
    MissingExtra,
    PermanentError,
    RetryableError,
    TaskContext,
    source_error,
)
from flowmesh.spec import Float, Int, ModelSpec, TaskBody

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, GenerationMixin, PreTrainedTokenizerBase

# The OSErrors transformers raises when a model cannot exist as named, and when the hub
# cannot be reached and the model is not in the cache (no network, HF_HUB_OFFLINE): another
# attempt on the same worker fails the same way, so neither is retried. Any other OSError
# (a full disk, a reset mid-download) may pass on another attempt.
_NOT_FOUND = re.compile(
    r"not a valid (model|git) identifier|is not a local folder|does not appear to have|"
    r"Repo id must|\b404\b"
)
# Not retried either: the hub cannot be reached at all from this worker (refused, no route,
# no name resolution). A timeout or a reset may pass on another attempt and is retried.
_UNREACHABLE = re.compile(
    r"Connection refused|Name or service not known|Temporary failure in name resolution|"
    r"Network is unreachable|No route to host|nodename nor servname"
)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub library read it (the worker's environment, not ours)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


class InferenceOptions(BaseModel):
    """`spec.inference`: sampling and batching."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: Int = Field(128, ge=1, le=32768)
    temperature: Float = Field(1.0, ge=0, le=10)
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: Int | None = Field(None, ge=1)
    system_prompt: str | None = None
    batch_size: Int = Field(8, ge=1, le=4096)
    seed: Int | None = Field(None, ge=0, le=2**64 - 1)  # what torch.manual_seed takes


@dataclass
class _Loaded:
    model: GenerationMixin
    tokenizer: PreTrainedTokenizerBase
    device: str
    dtype: torch.dtype
    stop_ids: frozenset[int]
    templated: bool  # the tokenizer has a chat template


def _chain(exc: BaseException) -> str:
    """The messages of an exception and of the ones that caused it."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 10:
        parts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return " | ".join(parts)


def _is_message(m: Any) -> bool:
    return (
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    )


def _item_problem(item: Any) -> str | None:
    if isinstance(item, str):
        return None if item.strip() else "empty prompt"
    if isinstance(item, dict) and "messages" in item:
        messages = item["messages"] if isinstance(item["messages"], list) else []
        if messages and all(_is_message(m) for m in messages):
            return None
        return "messages must be a non-empty list of {role: str, content: str}"
    if isinstance(item, dict) and "prompt" in item:
        prompt = item["prompt"]
        return None if isinstance(prompt, str) and prompt.strip() else "prompt must be a string"
    return "expected a prompt string, {prompt: str} or {messages: [{role, content}, ...]}"


def model_and_prompt_problems(body: TaskBody) -> list[tuple[str, str]]:
    """What every inference engine needs of a spec: a model, and prompts it can read."""
    problems: list[tuple[str, str]] = []
    if body.model is None or not body.model.source.identifier.strip():
        problems.append(("spec.model.source.identifier", "required: a hub id or a local path"))
    items = body.data.items if body.data else []
    if not items:
        problems.append(("spec.data.items", "must be a non-empty list of prompts"))
    for i, item in enumerate(items):
        if problem := _item_problem(item):
            problems.append((f"spec.data.items[{i}]", problem))
    return problems


def deterministic_sampling(options: Any) -> bool:
    """Greedy decoding, or sampling from a fixed seed: the same prompt gives the same text,
    so identical requests may run once (task merge)."""
    return bool(options is not None and (options.temperature == 0 or options.seed is not None))


def _messages(item: str | dict[str, Any]) -> list[dict[str, str]]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if "messages" in item:
        return [{"role": m["role"], "content": m["content"]} for m in item["messages"]]
    return [{"role": "user", "content": item["prompt"]}]


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tar")


def local_source(task: TaskContext, identifier: str) -> str:
    """A model or adapter source as something `from_pretrained` reads: an http(s) URL or a
    path of an archive (an earlier task's `final_model_archive_url`, say) is downloaded,
    checked and extracted by the worker's cache; a directory or hub id stays as it is."""
    if not (
        identifier.startswith(("http://", "https://")) or identifier.endswith(ARCHIVE_SUFFIXES)
    ):
        return identifier
    try:
        return str(task.resolve(identifier))
    except ExecutorError:
        raise
    except Exception as exc:  # FetchError: not allowed, not there, not safe, or the network
        raise source_error(exc, f"cannot get {identifier!r}") from exc


class TransformersInferenceExecutor(Executor):
    name = "inference"
    result_fields = INFERENCE_RESULT_FIELDS
    requires = ("torch", "transformers")
    extra = "inference"
    options = InferenceOptions
    # Its tasks take turns on one lock, so they may share the GPUs it was given.
    shares_devices = True
    # Tasks wait on the lock here rather than in Redis, so a warm model serves them in turn.
    max_concurrency = 4
    # Compatible requests share one delivery; identical greedy or seeded ones run once.
    merges = True

    def __init__(self, max_warm_models: int = 2) -> None:
        self.max_warm_models = max_warm_models
        # (model, revision, dtype, device, adapter) -> the loaded model
        self._models: OrderedDict[tuple[str, str | None, str, str, str | None], _Loaded] = (
            OrderedDict()
        )
        # Read by health() on the heartbeat thread while run() may hold the lock for minutes.
        self._warm_ids: tuple[str, ...] = ()
        self._loading_id: str | None = None
        self._loads = 0  # models loaded since setup (health: model_loads)
        self._lock = threading.Lock()
        # The worker accounts for GPUs (NVML saw some): a task uses the ones it was given.
        self._gpus_assigned = False

    @classmethod
    def deterministic(cls, body: TaskBody, options: Any) -> bool:
        return deterministic_sampling(options)

    @classmethod
    def validate_spec(cls, body: TaskBody) -> list[tuple[str, str]]:
        problems = model_and_prompt_problems(body)
        if body.model is not None and body.model.vllm:
            problems.append(
                ("spec.model.vllm", "read only by the vLLM engine: set spec.model.engine: vllm")
            )
        return problems

    def setup(self, config: ExecutorConfig) -> None:
        if config.max_warm_models < 1:
            raise ValueError(f"MAX_WARM_MODELS must be at least 1, got {config.max_warm_models}")
        self.max_warm_models = config.max_warm_models
        self._gpus_assigned = bool(config.devices)

    def run(self, task: TaskContext) -> dict[str, Any]:
        body = task.body
        problems = self.validate_spec(body)
        if problems or body.model is None or body.data is None:
            raise PermanentError("; ".join(f"{path}: {msg}" for path, msg in problems))
        identifier = body.model.source.identifier
        opts: InferenceOptions = task.options or InferenceOptions()
        items = body.data.items
        if not self._acquire(task.cancelled):
            return {"model": identifier, "responses": [], "cancelled": True}
        try:
            started = time.monotonic()
            source = local_source(task, body.model.source.identifier)
            lora = local_source(task, body.model.lora.identifier) if body.model.lora else None
            loaded, load_sec = self._get(body.model, self._device(task), source, lora)
            prompts = [
                self._render(loaded, it, opts.system_prompt, i) for i, it in enumerate(items)
            ]
            config = self._generation_config(loaded, opts)
            responses: list[dict[str, Any]] = []
            for start in range(0, len(prompts), opts.batch_size):
                if task.cancelled.is_set():
                    break
                batch = prompts[start : start + opts.batch_size]
                responses += self._generate(loaded, batch, start, config, opts.seed)
        finally:
            self._lock.release()
        usage = {k: sum(r[k] for r in responses) for k in ("prompt_tokens", "completion_tokens")}
        adapter = {}
        if body.model.lora is not None and lora is not None:
            # As the vLLM executor names it: its `name`, else its directory's.
            adapter = {"lora": body.model.lora.name or Path(lora).name}
        return {
            **adapter,
            "model": identifier,
            "device": loaded.device,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "responses": responses,
            "usage": usage,
            # Includes load_sec: the time the task took once the model was its to use.
            "elapsed_sec": round(time.monotonic() - started, 4),
            "load_sec": round(load_sec, 4),
            "warm": load_sec == 0,
            "cancelled": len(responses) < len(prompts),
        }

    def health(self) -> dict[str, Any]:
        loading = self._loading_id
        return {
            "loaded_models": list(self._warm_ids),
            "loading_models": [loading] if loading else [],
            "model_loads": self._loads,
        }

    def close(self) -> None:
        with self._lock:
            while self._models:
                self._evict()

    def _acquire(self, cancelled: threading.Event) -> bool:
        # Polls, so a task cancelled while queued behind another never loads a model.
        while not cancelled.is_set():
            if self._lock.acquire(timeout=0.2):
                return True
        return False

    # -- model cache (callers hold the lock) -----------------------------------------

    def _device(self, task: TaskContext) -> str:
        """The task's own GPU; the CPU when it asked for none on a worker that hands GPUs
        out (one it was not given may be another task's, whole); on a worker that cannot
        see its GPUs through NVML, the first CUDA device there is."""
        if task.devices:
            return f"cuda:{task.devices[0]}"
        if self._gpus_assigned:
            return "cpu"
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def _get(
        self, spec: ModelSpec, device: str, source: str, lora: str | None
    ) -> tuple[_Loaded, float]:
        key = (spec.source.identifier, spec.source.revision, spec.dtype, device, lora)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key], 0.0
        # Evict before loading: on a GPU the new model may only fit once the old one is gone.
        while len(self._models) >= self.max_warm_models:
            self._evict()
        started = time.monotonic()
        self._loading_id = spec.source.identifier
        try:
            self._models[key] = self._load(spec, device, source, lora)
            self._loads += 1
        finally:
            self._loading_id = None
        self._warm_ids = tuple(k[0] for k in self._models)
        return self._models[key], time.monotonic() - started

    def _evict(self) -> None:
        import torch

        _, loaded = self._models.popitem(last=False)
        self._warm_ids = tuple(k[0] for k in self._models)
        on_cuda = loaded.device.startswith("cuda")
        del loaded
        gc.collect()  # the weights must be unreachable before the CUDA cache can be returned
        if on_cuda:
            torch.cuda.empty_cache()

    def _load(self, spec: ModelSpec, device: str, source: str, lora: str | None) -> _Loaded:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        identifier = spec.source.identifier
        if source.startswith(("/", "./", "../", "~")) or Path(source).exists():
            path = Path(source).expanduser()
            if not path.is_dir():
                raise PermanentError(f"model {identifier!r} not found: no such local directory")
            source = str(path)
        if spec.dtype != "auto":
            dtype = getattr(torch, spec.dtype)
        elif device == "cpu":
            dtype = torch.float32
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        common = {"revision": spec.source.revision, "trust_remote_code": spec.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, device_map=device, **common
            )
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if _NOT_FOUND.search(str(exc)):
                raise PermanentError(
                    f"model {identifier!r} not found: no such local directory or hub "
                    f"repository ({first})"
                ) from exc
            if "couldn't connect to" in str(exc) and (
                _hub_offline() or _UNREACHABLE.search(_chain(exc))
            ):
                raise PermanentError(
                    f"model {identifier!r} cannot be fetched: the model hub is unreachable from "
                    "this worker (no network, or HF_HUB_OFFLINE) and the model is not in its "
                    "cache; give a local path saved with save_pretrained, or fill the worker's "
                    f"HF cache first ({first})"
                ) from exc
            raise RetryableError(f"cannot load model {identifier!r}: {exc}") from exc
        except ValueError as exc:  # an unknown architecture or a broken config
            raise PermanentError(f"cannot load model {identifier!r}: {exc}") from exc
        if lora is not None:
            model = self._with_adapter(model, lora, identifier)
        model.eval()
        # Left padding keeps every prompt's last token next to its first generated one.
        tokenizer.padding_side = "left"
        # Batches need a pad token; EOS (or UNK) is the usual stand-in where a model has none.
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise PermanentError(f"model {identifier!r}: tokenizer has no pad, eos or unk token")
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        stop_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        templated = bool(getattr(tokenizer, "chat_template", None))
        return _Loaded(model, tokenizer, device, dtype, stop_ids, templated)

    @staticmethod
    def _with_adapter(model: Any, lora: str, identifier: str) -> Any:
        """The model with a LoRA adapter applied and merged in (one warm copy per adapter)."""
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise MissingExtra("inference", ["peft"], "inference") from exc
        if not Path(lora, "adapter_config.json").is_file():
            raise PermanentError(
                f"spec.model.lora: {lora!r} is not a LoRA adapter (no adapter_config.json)"
            )
        try:
            return PeftModel.from_pretrained(model, lora).merge_and_unload()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise PermanentError(
                f"cannot apply LoRA adapter {lora!r} to model {identifier!r}: {exc}"
            ) from exc

    # -- generation -------------------------------------------------------------------

    @staticmethod
    def _render(loaded: _Loaded, item: Any, system: str | None, i: int) -> str:
        messages = _messages(item)
        if not loaded.templated:
            text = "\n".join(m["content"] for m in messages)
            return f"{system}\n\n{text}" if system else text
        # An item's own system message wins; many templates reject a second one.
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        try:
            rendered = loaded.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises its own errors for chats a template rejects
            raise PermanentError(f"spec.data.items[{i}]: chat template: {exc}") from exc
        return str(rendered)

    @staticmethod
    def _generation_config(loaded: _Loaded, opts: InferenceOptions) -> GenerationConfig:
        from transformers import GenerationConfig

        fields: dict[str, Any] = {
            "max_new_tokens": opts.max_tokens,
            "pad_token_id": loaded.tokenizer.pad_token_id,
            "eos_token_id": sorted(loaded.stop_ids) or None,
            "do_sample": opts.temperature > 0,
        }
        if opts.temperature > 0:
            # transformers 5 fills fields left unset from the model's generation_config.json
            # (and a global top_k=50), so "no top-k" must be spelled 0 for the spec to rule.
            fields.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or 0)
        return GenerationConfig(**fields)

    @staticmethod
    def _generate(
        loaded: _Loaded, prompts: list[str], offset: int, config: GenerationConfig, seed: int | None
    ) -> list[dict[str, Any]]:
        import torch

        # A rendered chat template already holds its special tokens (often a BOS).
        enc = loaded.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=not loaded.templated
        )
        input_ids = enc["input_ids"].to(loaded.device)
        attention_mask = enc["attention_mask"].to(loaded.device)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
        rows = out[:, input_ids.shape[1] :].tolist()
        prompt_lens = attention_mask.sum(dim=1).tolist()
        responses = []
        for i, (prompt, row, prompt_len) in enumerate(zip(prompts, rows, prompt_lens, strict=True)):
            # A row that stops early is padded on the right until the batch's longest ends;
            # counting to the first stop token (not the first pad: a model may emit the pad
            # token as ordinary text) leaves that padding out.
            stop = next((j for j, t in enumerate(row) if t in loaded.stop_ids), None)
            count = len(row) if stop is None else stop + 1
            responses.append(
                {
                    "index": offset + i,
                    "prompt": prompt,
                    "text": loaded.tokenizer.decode(row[:count], skip_special_tokens=True),
                    "prompt_tokens": int(prompt_len),
                    "completion_tokens": count,
                    "finish_reason": "length" if stop is None else "stop",
                }
            )
        return responses
