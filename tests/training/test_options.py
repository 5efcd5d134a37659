"""Spec checks at submit time: option field paths, cross-section rules, bad inline data."""

from __future__ import annotations

from typing import Any

import pytest

from executors.base import PermanentError
from executors.registry import load
from tests.training.conftest import DPO_ITEMS, PROMPTS, SFT_ITEMS, spec_for


def problems(
    task_type: str,
    training: dict[str, Any],
    items: list[Any] | None = None,
    model: str | None = "/models/x",
) -> dict[str, str]:
    cls = load(task_type)
    body = spec_for(task_type, model, training, items or SFT_ITEMS).spec
    return dict(cls.check_options(body) + cls.validate_spec(body))


def test_options_errors_name_the_field() -> None:
    assert "spec.training.learning_rate" in problems("sft", {"learning_rate": -1})
    assert "spec.training.lora.r" in problems("lora_sft", {"lora": {"r": 0}})
    assert "spec.training.precision" in problems("sft", {"precision": "fp8"})
    assert "spec.training.bogus" in problems("sft", {"bogus": 1})
    both = problems("sft", {"epochs": 1, "max_steps": 3})
    assert "not both" in both["spec.training"]
    assert "spec.training.nproc_per_node" in problems("dpo", {"nproc_per_node": 0}, DPO_ITEMS)


def test_rewards_come_from_the_registry() -> None:
    bad = problems("grpo", {"rewards": [{"name": "exec", "code": "import os"}]}, PROMPTS)
    assert any(path.startswith("spec.training.rewards[0]") for path in bad)
    regex = problems("grpo", {"rewards": [{"name": "format", "pattern": "("}]}, PROMPTS)
    assert "spec.training.rewards[0].format.pattern" in regex
    none = problems("ppo", {}, PROMPTS)
    assert "reward" in none["spec.training"]
    groups = problems(
        "grpo", {"batch_size": 3, "rewards": [{"name": "length", "target": 5}]}, PROMPTS
    )
    assert "num_generations" in groups["spec.training"]
    ok = {"rewards": [{"name": "contains", "keyword": "fox", "weight": 2}]}
    assert problems("grpo", {**ok, "batch_size": 4}, PROMPTS) == {}
    assert problems("ppo", ok, PROMPTS) == {}


def test_spec_needs_a_model_and_data_of_the_trainers_shape() -> None:
    assert "spec.model.source.identifier" in problems("sft", {}, model=None)
    dpo = problems("dpo", {}, [DPO_ITEMS[0], {"prompt": "p", "chosen": "c"}])
    assert "'rejected'" in dpo["spec.data.items[1]"]
    mixed = problems("sft", {}, [{"text": "a b"}, {"prompt": "a", "completion": "b"}])
    assert "spec.data.items[1]" in mixed
    assert problems("lora_sft", {}) == {}


def test_bad_inline_data_fails_before_launching() -> None:
    cls = load("dpo")
    spec = spec_for("dpo", "/models/x", {}, [DPO_ITEMS[0], {"prompt": "p", "chosen": "c"}])
    from pathlib import Path

    from executors.base import TaskContext

    ctx = TaskContext(task_id="t", attempt=1, spec=spec, work_dir=Path("/nonexistent/never"))
    with pytest.raises(PermanentError, match=r"spec\.data\.items\[1\].*'rejected'"):
        cls().run(ctx)


def test_module_import_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, executors.trl.sft, executors.trl.dpo, executors.trl.grpo, executors.trl.ppo;"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
