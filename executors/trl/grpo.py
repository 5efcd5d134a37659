"""`grpo`: Group Relative Policy Optimization with TRL's GRPOTrainer.

Data items: `{prompt}`. Completions are scored by built-in reward functions
(`training.rewards`, see rewards.py) and/or a sequence-classification reward model.
"""

from __future__ import annotations

from executors.trl.options import GrpoOptions
from executors.trl.runner import TrainingExecutor


class GrpoExecutor(TrainingExecutor):
    name = "grpo"
    family = "grpo"
    shape = "prompt"
    options = GrpoOptions
