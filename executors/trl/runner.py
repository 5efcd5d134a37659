"""The executor side of every trainer: checks the spec, writes the job file, starts the
trainer process (torchrun for several), and supervises it.

`run()` never imports torch: it resolves the model, data and checkpoints to local paths,
launches `python -m executors.trl.launch job.json` in the task's own process group (so the
worker's hard stop kills it too), tails the events file the trainer writes, and turns them
into progress, saved checkpoints, the result, or the matching ExecutorError.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import executors
from executors.base import (
    ARTIFACT_RESULT_FIELDS,
    Executor,
    ExecutorConfig,
    ExecutorError,
    PermanentError,
    RetryableError,
    TaskContext,
    source_error,
)
from executors.trl.data import Shape, items_problems
from executors.trl.options import TrainingOptions
from executors.vllm_inference import CudaOutOfMemory
from flowmesh.failures import FailureKind
from flowmesh.spec import TaskBody

# Seconds between a SIGTERM to the trainer and the SIGKILL that follows when it lingers.
STOP_GRACE_SEC = 5.0
# Seconds between progress lines in the task's log (progress itself goes out every event).
LOG_EVERY_SEC = 15.0
POLL_SEC = 0.2


class TrainingStopped(ExecutorError):
    """The task was cancelled or timed out and the trainer was stopped."""

    kind = FailureKind.CANCELLED
    retryable = False


class TrainerCrashed(RetryableError):
    """The trainer process died without saying why (a signal, the OOM killer, a bug)."""

    kind = FailureKind.CRASH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checkpoint_step(path: Path) -> int | None:
    """The step an HF Trainer (or PPO) checkpoint directory was written at."""
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError):
            pass
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


class TrainingExecutor(Executor):
    """What sft, lora_sft, dpo, grpo and ppo share; each sets `family`, `shape`, `options`."""

    section = "training"
    result_fields = ARTIFACT_RESULT_FIELDS | {
        "final_dir",
        "global_step",
        "train_loss",
        "resumed_from_step",
        "world_size",
        "train_runtime_sec",
        "metrics",
        "cancelled",
    }
    requires = ("torch", "transformers", "trl", "peft", "datasets")
    extra = "training"
    isolation = "task"
    takes_checkpoint = True
    # The training code launch.py runs, and the item shape its data must have.
    family: ClassVar[str]
    shape: ClassVar[Shape]

    def __init__(self) -> None:
        self._gpus_assigned = False

    @classmethod
    def validate_spec(cls, body: TaskBody) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if body.model is None or not body.model.source.identifier.strip():
            problems.append(("spec.model.source.identifier", "required: the model to train"))
        elif body.model.vllm or body.model.engine == "vllm":
            problems.append(("spec.model.vllm", "training runs on transformers, not vLLM"))
        elif body.model.lora is not None:
            problems.append(
                (
                    "spec.model.lora",
                    "to continue training an adapter, give it as spec.checkpoint.load.identifier",
                )
            )
        if body.data is None:
            problems.append(("spec.data", "required: the training data"))
        elif body.data.type == "list":
            if not body.data.items:
                problems.append(("spec.data.items", "must be a non-empty list"))
            problems += items_problems(cls.shape, body.data.items, "spec.data.items")
        return problems

    def setup(self, config: ExecutorConfig) -> None:
        self._gpus_assigned = bool(config.devices)

    def run(self, task: TaskContext) -> dict[str, Any]:
        body = task.body
        problems = self.validate_spec(body)
        if problems:
            raise PermanentError("; ".join(f"{path}: {msg}" for path, msg in problems))
        opts: TrainingOptions = task.options or self.parse_options(body)
        job, resumed = self._job(task, opts)
        world = self.world_size(opts, task.devices)
        job["world_size"] = world
        task.work_dir.mkdir(parents=True, exist_ok=True)
        (task.work_dir / "logs").mkdir(exist_ok=True)
        job_path = task.work_dir / "trainer_job.json"
        job_path.write_text(json.dumps(job, indent=2))
        events = Path(job["events"])
        events.unlink(missing_ok=True)
        if resumed is not None:
            task.log.info("resuming from checkpoint %s at step %s", job["resume"], resumed)
            task.progress(step=resumed, resumed_from_step=resumed)
        task.log.info(
            "%s: training %s with world size %d (%s)",
            self.name,
            job["model"],
            world,
            "LoRA" if job["lora"] else "full",
        )
        try:
            outcome = self._supervise(task, self._command(job_path, world), events)
        except BaseException:
            # Stopped or failed: no waiting for checkpoint uploads still queued (a cancel
            # must not wait minutes for them); those already sent are kept.
            task.checkpoints.discard()
            raise
        task.checkpoints.flush()
        return {
            "final_dir": Path(job["final_dir"]).name,
            "global_step": outcome.get("global_step"),
            "train_loss": outcome.get("train_loss"),
            "resumed_from_step": resumed,
            "world_size": outcome.get("world_size", world),
            "train_runtime_sec": outcome.get("train_runtime_sec"),
            "metrics": outcome.get("metrics", {}),
        }

    # -- the job ---------------------------------------------------------------------

    def _resolve(self, task: TaskContext, source: str, sha256: str | None, what: str) -> Path:
        try:
            path = task.resolve(source, sha256)
        except ExecutorError:
            raise
        except Exception as exc:  # FetchError: not allowed, not there, not safe, the network
            raise source_error(exc, f"{what} {source!r} cannot be used") from exc
        if not path.exists():
            raise PermanentError(f"{what} {source!r} not found: no such file or directory")
        return path

    def _job(self, task: TaskContext, opts: TrainingOptions) -> tuple[dict[str, Any], int | None]:
        body = task.body
        assert body.model is not None and body.data is not None  # validate_spec said so
        model = body.model.source.identifier
        local = model.startswith(("/", "./", "../", "~")) or "://" in model or Path(model).exists()
        # A hub id stays a hub id: from_pretrained fetches it (or finds it in the HF cache).
        model_path = str(self._resolve(task, model, None, "model")) if local else model
        init_adapter = None
        if body.checkpoint is not None:
            load = body.checkpoint.load
            ckpt = self._resolve(task, load.identifier, load.sha256, "spec.checkpoint.load")
            if (ckpt / "adapter_config.json").is_file():
                init_adapter = str(ckpt)
            elif (ckpt / "config.json").is_file():
                model_path = str(ckpt)
            else:
                raise PermanentError(
                    f"spec.checkpoint.load {load.identifier!r}: neither a LoRA adapter "
                    "(adapter_config.json) nor a model (config.json)"
                )
        data: dict[str, Any] = {"type": body.data.type}
        if body.data.type == "list":
            data["items"] = body.data.items
        elif body.data.type == "url":
            assert body.data.url is not None
            data["path"] = str(
                self._resolve(task, body.data.url, body.data.sha256, "spec.data.url")
            )
        else:
            assert body.data.path is not None
            data["path"] = str(self._resolve(task, body.data.path, None, "spec.data.path"))
        reward_model = getattr(opts, "reward_model", None)
        if reward_model is not None:
            reward_model = str(self._resolve(task, reward_model, None, "training.reward_model"))
        resume = task.checkpoints.latest()
        lora = opts.lora is not None or init_adapter is not None
        final = task.artifacts_dir / ("final_lora" if lora else "final_model")
        job: dict[str, Any] = {
            "trainer": self.name,
            "family": self.family,
            "shape": self.shape,
            "task_id": task.task_id,
            "model": model_path,
            "dtype": body.model.dtype,
            "trust_remote_code": body.model.trust_remote_code,
            "init_adapter": init_adapter,
            "lora": lora,
            "data": data,
            "options": opts.model_dump(mode="json"),
            "reward_model": reward_model,
            "output_dir": str(task.checkpoints_dir),
            "final_dir": str(final),
            "events": str(task.work_dir / "trainer_events.jsonl"),
            "resume": str(resume) if resume is not None else None,
            "resume_step": checkpoint_step(resume) if resume is not None else None,
        }
        return job, job["resume_step"] if resume is not None else None

    def world_size(self, opts: TrainingOptions, devices: tuple[int, ...]) -> int:
        """One process per GPU given (when allowed), capped by nproc_per_node; on the CPU,
        nproc_per_node processes (gloo), or one."""
        if devices:
            n = len(devices) if opts.allow_multi_gpu else 1
            return min(n, opts.nproc_per_node) if opts.nproc_per_node else n
        return opts.nproc_per_node or 1

    @staticmethod
    def _command(job_path: Path, world: int) -> list[str]:
        if world == 1:
            return [sys.executable, "-m", "executors.trl.launch", str(job_path)]
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", str(world),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "executors.trl.launch", str(job_path),
        ]  # fmt: skip

    def _env(self, task: TaskContext) -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(executors.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if task.devices:
            # The task's ordinals index this process's visible GPUs.
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(max(task.devices) + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in task.devices)
        elif self._gpus_assigned:
            env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU was given: another task's are not ours
        return env

    # -- supervision -------------------------------------------------------------------

    def _supervise(self, task: TaskContext, cmd: list[str], events: Path) -> dict[str, Any]:
        log_path = task.work_dir / "logs" / "trainer.log"
        with open(log_path, "ab") as log:
            # Same process group as this one, on purpose: the worker's hard stop kills both.
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(task),
                cwd=task.work_dir, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        tail = _Tail(events)
        done: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        last_log = 0.0
        try:
            while True:
                exited = proc.poll() is not None
                for event in tail.read():
                    kind = event.get("event")
                    if kind == "progress":
                        fields = {k: v for k, v in event.items() if k not in ("event", "rank")}
                        task.progress(**fields)
                        if time.monotonic() - last_log >= LOG_EVERY_SEC or (
                            fields.get("step") == fields.get("total")
                        ):
                            last_log = time.monotonic()
                            task.log.info("%s: %s", self.name, _progress_line(fields))
                    elif kind == "checkpoint":
                        task.log.info("checkpoint %s at step %s", event["path"], event["step"])
                        try:
                            task.checkpoints.saved(Path(event["path"]))
                        except OSError as exc:  # rotated away already (save_total_limit)
                            task.log.warning("checkpoint %s not kept: %s", event["path"], exc)
                    elif kind == "done":
                        done = event
                    elif kind == "error" and error is None:
                        error = event
                if exited:
                    break
                if task.cancelled.wait(POLL_SEC):
                    _stop(proc)
                    raise TrainingStopped(f"{self.name}: stopped; the trainer was terminated")
        finally:
            if proc.poll() is None:
                _stop(proc)
        if done is not None:
            return done
        if error is not None:
            raise _error(self.name, error, log_path)
        raise TrainerCrashed(
            f"{self.name}: the trainer exited with code {proc.returncode} without a result; "
            f"trainer.log ends: {_log_tail(log_path)}"
        )


class _Tail:
    """The complete lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # never written by the trainer: only whole JSON lines are
        return out


def _progress_line(fields: dict[str, Any]) -> str:
    parts = [f"step {fields.get('step')}/{fields.get('total')}"]
    for key in ("loss", "learning_rate", "epoch", "reward"):
        if isinstance(fields.get(key), int | float):
            parts.append(f"{key} {fields[key]:.4g}")
    return ", ".join(parts)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (torchrun passes it to its workers), then SIGKILL for the whole tree."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_SEC)
    if proc.poll() is None:
        proc.kill()
    for child in tree:  # torchrun's workers, or anything the trainer started
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=STOP_GRACE_SEC)


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return "(no log)"


def _error(name: str, event: dict[str, Any], log_path: Path) -> ExecutorError:
    message = f"{name}: {event.get('message', 'the trainer failed')}"
    kind = event.get("kind")
    if kind == "cuda_oom":
        return CudaOutOfMemory(message)
    if kind == "permanent":
        return PermanentError(message)
    return RetryableError(f"{message}; trainer.log ends: {_log_tail(log_path, 1000)}")
