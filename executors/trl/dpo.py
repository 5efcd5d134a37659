"""`dpo`: Direct Preference Optimization with TRL's DPOTrainer.

Data items: `{prompt, chosen, rejected}`. The reference model is the starting model (with
LoRA, the base with the adapter switched off).
"""

from __future__ import annotations

from executors.trl.options import DpoOptions
from executors.trl.runner import TrainingExecutor


class DpoExecutor(TrainingExecutor):
    name = "dpo"
    family = "dpo"
    shape = "preference"
    options = DpoOptions
