"""`ppo`: Proximal Policy Optimization (the loop is in `ppo_trainer`, run by launch.py).

Data items: `{prompt}`. Rewards come from built-in reward functions (`training.rewards`)
and/or a sequence-classification reward model (`training.reward_model`).

Why our own loop: TRL 1.13 removed PPOTrainer; the last one (trl.experimental.ppo in 1.12)
cannot resume from a checkpoint (`train()` takes no `resume_from_checkpoint`) and takes
only a reward *model*, and pinning TRL to 1.12 would hold SFT, DPO and GRPO back too.
`ppo_trainer` is a compact PPO: rollouts sampled from the policy, a per-token KL penalty
to a frozen reference (the starting weights; with LoRA, the base with the adapter off),
a value head on the policy's last hidden state, GAE, the clipped surrogate and a clipped
value loss, several epochs of minibatch updates per rollout; checkpoints (policy,
value head, optimizer, scheduler) that a later attempt resumes from at their step.
"""

from __future__ import annotations

from executors.trl.options import PpoOptions
from executors.trl.runner import TrainingExecutor


class PpoExecutor(TrainingExecutor):
    name = "ppo"
    family = "ppo"
    shape = "prompt"
    options = PpoOptions
