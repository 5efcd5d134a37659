"""The trainer process: `python -m executors.trl.launch <job.json>`, one per rank (torchrun).

Reads the job the executor wrote, loads model, tokenizer and data, trains with TRL (or the
PPO loop in `ppo_trainer`), saves `final_model/` or `final_lora/`, and reports through a
JSON-lines events file that the executor's supervisor tails: progress and checkpoints from
rank 0, an error from any rank, `done` last.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, ClassVar

from executors.trl.data import DataError, load
from executors.trl.options import DEFAULT_LR
from executors.trl.rewards import build
from flowmesh.failpoints import from_environment

# A model or adapter path that cannot be loaded as given: another attempt fails the same way.
# Crash tests only: a pause after every step, so a training runs long enough to be killed.
STEP_PAUSE = from_environment("train_step")
# Progress between logging steps goes out at most this often (and at the last step).
STEP_EVERY_SEC = 0.5

_NOT_LOADABLE = re.compile(
    r"not a valid (model|git) identifier|is not a local folder|does not appear to have|"
    r"Unrecognized model|Can't load (tokenizer|the configuration)|does not recognize this "
    r"architecture|Repo id must|\b404\b"
)


class Events:
    """Appends one JSON object per line; every rank may report an error, rank 0 the rest."""

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank
        # Set once the first step can run: a config refused before it is refused again.
        self.started = False

    def emit(self, event: str, *, any_rank: bool = False, **fields: Any) -> None:
        if self.rank != 0 and not any_rank:
            return
        line = json.dumps({"event": event, "rank": self.rank, **fields}, default=str)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def say(message: str) -> None:
    print(
        f"[flowmesh {time.strftime('%H:%M:%S')} rank {os.environ.get('RANK', '0')}] {message}",
        flush=True,
    )


def precision(job: dict[str, Any]) -> str:
    import torch

    wanted = job["options"]["precision"]
    if not torch.cuda.is_available():
        return "fp32" if wanted == "auto" else wanted
    if wanted == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return str(wanted)


def load_model(job: dict[str, Any], path: str, half: str) -> Any:
    """The causal LM to train: full weights stay fp32 under mixed precision; a LoRA base is
    loaded in the half type (its weights are frozen); spec.model.dtype overrides both."""
    import torch
    from transformers import AutoModelForCausalLM

    if job["dtype"] != "auto":
        dtype = getattr(torch, job["dtype"])
    elif job["lora"] and half in ("bf16", "fp16"):
        dtype = torch.bfloat16 if half == "bf16" else torch.float16
    else:
        dtype = torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=job["trust_remote_code"]
    )
    if job["init_adapter"]:
        from peft import PeftModel

        say(f"continuing LoRA adapter {job['init_adapter']}")
        model = PeftModel.from_pretrained(model, job["init_adapter"], is_trainable=True)
    return model


def load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise DataError(f"model {path}: tokenizer has no pad, eos or unk token")
    return tokenizer


def lora_config(job: dict[str, Any]) -> Any:
    """A new adapter's config; None when there is none to make (or one is continued)."""
    lora = job["options"].get("lora")
    if not job["lora"] or job["init_adapter"] or lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )


def common_args(job: dict[str, Any], half: str) -> dict[str, Any]:
    import torch

    o = job["options"]
    cuda = torch.cuda.is_available()
    lr = o["learning_rate"] or DEFAULT_LR[job["family"]][1 if job["lora"] else 0]
    checkpointing = o["gradient_checkpointing"]
    return {
        "output_dir": job["output_dir"],
        "num_train_epochs": o["epochs"] or 1.0,
        "max_steps": o["max_steps"] or -1,
        "learning_rate": lr,
        "lr_scheduler_type": o["lr_scheduler"],
        "warmup_steps": o["warmup_steps"],
        "weight_decay": o["weight_decay"],
        "max_grad_norm": o["max_grad_norm"],
        "per_device_train_batch_size": o["batch_size"],
        "gradient_accumulation_steps": o["gradient_accumulation_steps"],
        "bf16": half == "bf16",
        "fp16": half == "fp16",
        "gradient_checkpointing": cuda if checkpointing is None else checkpointing,
        "save_strategy": "steps" if o["save_steps"] else "no",
        "save_steps": o["save_steps"] or 500,
        "save_total_limit": o["save_total_limit"],
        "seed": o["seed"],
        "logging_steps": o["logging_steps"],
        "logging_first_step": True,
        "report_to": "none",
        "use_cpu": not cuda,
        "ddp_backend": "gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def callback(events: Events) -> Any:
    from transformers import TrainerCallback

    class ReportEvents(TrainerCallback):
        """Progress from the trainer's logs, and each checkpoint once it is complete."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            events.started = True
            events.emit(
                "progress", step=state.global_step, total=state.max_steps, epoch=state.epoch
            )

        last: ClassVar[dict[str, Any]] = {"at": 0.0, "loss": None, "learning_rate": None}

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if STEP_PAUSE:
                time.sleep(STEP_PAUSE)  # FLOWMESH_FAILPOINTS=train_step:S, crash tests only
            if args.save_strategy == "steps" and state.global_step >= state.max_steps:
                # A checkpoint at the last step too: an attempt after a failure past it (an
                # upload, the worker lost) resumes there instead of training again.
                control.should_save = True
            # Between logging steps too (at most every STEP_EVERY_SEC, and the last step),
            # so the task's status follows the steps, with the last loss logged.
            if args.logging_strategy == "steps" and state.global_step % args.logging_steps == 0:
                return  # a logging step: on_log reports it, with its loss
            now = time.monotonic()
            if now - self.last["at"] < STEP_EVERY_SEC and state.global_step < state.max_steps:
                return
            self.last["at"] = now
            events.emit(
                "progress",
                step=state.global_step,
                total=state.max_steps,
                loss=self.last["loss"],
                learning_rate=self.last["learning_rate"],
                epoch=state.epoch,
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" not in logs:  # the summary train() logs at its end
                return
            self.last.update(loss=logs.get("loss"), learning_rate=logs.get("learning_rate"))
            events.emit(
                "progress",
                step=state.global_step,
                total=state.max_steps,
                loss=logs.get("loss"),
                learning_rate=logs.get("learning_rate"),
                epoch=state.epoch,
                **{  # type: ignore[arg-type]
                    k: v
                    for k, v in logs.items()
                    if k.startswith(("rewards/", "reward")) and isinstance(v, int | float)
                },
            )

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            events.emit("checkpoint", path=str(path), step=state.global_step)

    return ReportEvents()


def trl_trainer(job: dict[str, Any], half: str, events: Events) -> Any:
    """The TRL trainer the job names, ready to train."""
    o = job["options"]
    tokenizer = load_tokenizer(job["model"], job["trust_remote_code"])
    dataset = load(job["data"], job["shape"])
    say(
        f"{job['trainer']}: {len(dataset)} rows, precision {half}, world size "
        f"{os.environ.get('WORLD_SIZE', '1')}"
    )
    model = load_model(job, job["model"], half)
    kwargs: dict[str, Any] = {
        "model": model,
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "peft_config": lora_config(job),
        "callbacks": [callback(events)],
    }
    common = common_args(job, half)
    family = job["family"]
    if family == "sft":
        from trl import SFTConfig, SFTTrainer

        config: Any = SFTConfig(
            **common,
            max_length=o["max_seq_length"],
            packing=o["packing"],
            completion_only_loss=o["completion_only_loss"],
        )
        return SFTTrainer(args=config, **kwargs)
    if family == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(
            **common, max_length=o["max_seq_length"], beta=o["beta"], loss_type=[o["loss_type"]]
        )
        return DPOTrainer(args=config, **kwargs)
    if family == "grpo":
        from pydantic import TypeAdapter
        from trl import GRPOConfig, GRPOTrainer

        from executors.trl.rewards import RewardSpec

        specs = TypeAdapter(list[RewardSpec]).validate_python(o["rewards"])
        funcs: list[Any] = [build(s) for s in specs]
        weights = [s.weight for s in specs]
        if job["reward_model"]:
            funcs.append(job["reward_model"])
            weights.append(1.0)
        config = GRPOConfig(
            **common,
            num_generations=o["num_generations"],
            max_completion_length=o["max_completion_length"],
            temperature=o["temperature"],
            beta=o["beta"],
            reward_weights=weights,
        )
        return GRPOTrainer(reward_funcs=funcs, args=config, **kwargs)
    raise ValueError(f"unknown trainer family {family!r}")


def train(job: dict[str, Any], events: Events) -> dict[str, Any]:
    import torch
    from transformers import set_seed

    set_seed(job["options"]["seed"])
    half = precision(job)
    if job["resume"]:
        say(f"resuming from checkpoint {job['resume']} at step {job['resume_step']}")
    if job["family"] == "ppo":
        from executors.trl import ppo_trainer

        return ppo_trainer.train(job, half, events, say)
    trainer = trl_trainer(job, half, events)
    out = trainer.train(resume_from_checkpoint=job["resume"])
    final = Path(job["final_dir"])
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(final))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "global_step": out.global_step,
        "train_loss": out.training_loss,
        "metrics": out.metrics,
        "world_size": world,
    }


def classify(exc: BaseException, started: bool) -> str:
    from executors.vllm_inference import is_out_of_memory

    if is_out_of_memory(exc):
        return "cuda_oom"
    if isinstance(exc, DataError):
        return "permanent"
    text = str(exc)
    if isinstance(exc, OSError) and _NOT_LOADABLE.search(text):
        return "permanent"
    # A config or data the trainer refuses (ValueError, KeyError, TypeError) before the
    # first step is refused again by another attempt.
    if not started and isinstance(exc, ValueError | KeyError | TypeError | ImportError):
        return "permanent"
    return "error"


def main(argv: list[str]) -> int:
    # The worker's executor process ignores SIGTERM (it is the worker's to act on), and an
    # ignored signal stays ignored across exec: the trainer takes its default back, so the
    # SIGTERM of a cancel or timeout stops it at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    events = Events(job["events"], rank)
    started = time.monotonic()
    try:
        result = train(job, events)
    except Exception as exc:
        traceback.print_exc()
        kind = classify(exc, events.started)
        events.emit(
            "error", any_rank=True, kind=kind, message=f"{type(exc).__name__}: {exc}"[-4000:]
        )
        return 1
    result["train_runtime_sec"] = round(time.monotonic() - started, 3)
    events.emit("done", **result)
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    # Everything is on disk and the last event written: skip the interpreter's teardown of
    # torch and its thread pools (a second or more the task would wait for, doing nothing).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
