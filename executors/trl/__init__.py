"""Fine-tuning executors on TRL and PEFT: sft, lora_sft, dpo, grpo, ppo.

Each is a `TrainingExecutor` (runner.py) that launches `launch.py` as its own process
(torchrun for several); importing this package imports no torch.
"""
