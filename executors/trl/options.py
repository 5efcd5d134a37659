"""`spec.training`: what every trainer takes, and what each one adds.

Validated at submit time by the orchestrator, so this module imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from executors.trl.rewards import RewardSpec
from flowmesh.spec import Bool, Float, Int

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class LoraOptions(BaseModel):
    """`training.lora`: a PEFT LoRA adapter is trained instead of every weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: Int = Field(16, ge=1, le=1024)
    alpha: Float = Field(32.0, gt=0, le=10_000)
    dropout: Float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear layer but the output head (PEFT's shorthand).
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", min_length=1)


class TrainingOptions(BaseModel):
    """The fields every trainer takes. `epochs` or `max_steps` bounds the run (one epoch
    when neither is given); `batch_size` is per process (per GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: Float | None = Field(None, gt=0, le=10_000)
    max_steps: Int | None = Field(None, ge=1, le=10_000_000)
    # None: the trainer's default (higher with LoRA, see DEFAULT_LR).
    learning_rate: Float | None = Field(None, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: Int = Field(0, ge=0)
    weight_decay: Float = Field(0.0, ge=0, le=1)
    max_grad_norm: Float = Field(1.0, gt=0, le=1000)
    batch_size: Int = Field(4, ge=1, le=4096)
    gradient_accumulation_steps: Int = Field(1, ge=1, le=4096)
    max_seq_length: Int = Field(1024, ge=8, le=1_048_576)
    # auto: bf16 on a GPU that supports it, fp16 on an older one, fp32 on the CPU.
    precision: Precision = "auto"
    # None: on for a GPU run, off on the CPU (where it only costs time).
    gradient_checkpointing: Bool | None = None
    lora: LoraOptions | None = None
    # A checkpoint every N optimizer steps (kept for a later attempt to resume from).
    save_steps: Int | None = Field(None, ge=1)
    save_total_limit: Int | None = Field(None, ge=1)
    seed: Int = Field(42, ge=0, le=2**32 - 1)
    logging_steps: Int = Field(10, ge=1)
    # With several GPUs given to the task, one process per GPU (torchrun); false: one.
    allow_multi_gpu: Bool = True
    # Caps the process count; on a CPU-only worker it sets it (gloo backend).
    nproc_per_node: Int | None = Field(None, ge=1, le=64)

    @model_validator(mode="after")
    def _one_bound(self) -> TrainingOptions:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        return self


class SftOptions(TrainingOptions):
    # Loss on the completion only for {prompt, completion} items (TRL's default: yes).
    completion_only_loss: Bool | None = None
    packing: Bool = False


class LoraSftOptions(SftOptions):
    lora: LoraOptions = Field(default_factory=LoraOptions)


class DpoOptions(TrainingOptions):
    beta: Float = Field(0.1, gt=0, le=100)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"


class _RewardedOptions(TrainingOptions):
    rewards: list[RewardSpec] = Field(default_factory=list, max_length=32)
    # A sequence-classification model (a directory or archive) whose logit is the reward.
    reward_model: str | None = Field(None, min_length=1, max_length=2048)
    max_completion_length: Int = Field(64, ge=1, le=65_536)
    temperature: Float = Field(1.0, gt=0, le=10)

    @model_validator(mode="after")
    def _some_reward(self) -> _RewardedOptions:
        if not self.rewards and self.reward_model is None:
            raise ValueError("needs rewards (built-in reward functions) or a reward_model")
        return self


class GrpoOptions(_RewardedOptions):
    num_generations: Int = Field(4, ge=2, le=1024)
    # KL coefficient to the reference model (0: no reference model is kept).
    beta: Float = Field(0.0, ge=0, le=100)

    @model_validator(mode="after")
    def _groups_fit(self) -> GrpoOptions:
        per_step = self.batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            raise ValueError(
                f"batch_size x gradient_accumulation_steps ({per_step}) must be a multiple of "
                f"num_generations ({self.num_generations})"
            )
        return self


class PpoOptions(_RewardedOptions):
    """One step = a rollout of `batch_size` prompts per process, then `ppo_epochs` passes
    over it in `num_mini_batches` optimizer steps each."""

    ppo_epochs: Int = Field(4, ge=1, le=100)
    num_mini_batches: Int = Field(1, ge=1, le=1024)
    cliprange: Float = Field(0.2, gt=0, le=10)
    cliprange_value: Float = Field(0.2, gt=0, le=100)
    vf_coef: Float = Field(0.1, ge=0, le=100)
    kl_coef: Float = Field(0.05, ge=0, le=100)
    gamma: Float = Field(1.0, gt=0, le=1)
    lam: Float = Field(0.95, ge=0, le=1)
    whiten_advantages: Bool = True

    @model_validator(mode="after")
    def _minibatches_fit(self) -> PpoOptions:
        if self.batch_size % self.num_mini_batches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_mini_batches "
                f"({self.num_mini_batches})"
            )
        if self.gradient_accumulation_steps != 1:
            raise ValueError("ppo takes no gradient_accumulation_steps: use num_mini_batches")
        return self


# Learning rates a trainer uses when the spec gives none: (full fine-tune, LoRA).
DEFAULT_LR: dict[str, tuple[float, float]] = {
    "sft": (2e-5, 2e-4),
    "dpo": (5e-7, 5e-6),
    "grpo": (1e-6, 1e-5),
    "ppo": (1e-6, 1e-5),
}
