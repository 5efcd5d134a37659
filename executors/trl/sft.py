"""`sft` and `lora_sft`: supervised fine-tuning with TRL's SFTTrainer (full, or a LoRA adapter).

Data items: `{text}`, `{prompt, completion}` or `{messages: [{role, content}, ...]}`.
"""

from __future__ import annotations

from executors.trl.options import LoraSftOptions, SftOptions
from executors.trl.runner import TrainingExecutor


class SftExecutor(TrainingExecutor):
    """Every weight is trained (or a LoRA adapter when `training.lora` is set);
    writes `final_model/` (or `final_lora/`) with the tokenizer."""

    name = "sft"
    family = "sft"
    shape = "sft"
    options = SftOptions


class LoraSftExecutor(TrainingExecutor):
    """A PEFT LoRA adapter is trained (`training.lora`, defaults r=16, alpha=32);
    writes `final_lora/` (adapter and tokenizer)."""

    name = "lora_sft"
    family = "sft"
    shape = "sft"
    options = LoraSftOptions
