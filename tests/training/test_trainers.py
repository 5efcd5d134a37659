"""Each trainer runs for real on a tiny Llama in its own process, and changes the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl", reason="needs the training extra: uv sync --extra training")
pytest.importorskip("peft", reason="needs the training extra: uv sync --extra training")

from tests.conftest import TRAINING_TIMEOUT
from tests.training.conftest import DPO_ITEMS, FAST, PROMPTS, SFT_ITEMS, MakeRun, Run

pytestmark = TRAINING_TIMEOUT


def _weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _changed(base: Path, trained: Path) -> bool:
    import torch

    before, after = _weights(base / "model.safetensors"), _weights(trained / "model.safetensors")
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before)


def _adapter_trained(adapter: Path) -> bool:
    """LoRA B matrices start at zero: a trained adapter has some that are not."""
    weights = _weights(adapter / "adapter_model.safetensors")
    return any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)


# peft asks transformers 5 for a property it deprecated (is_gradient_checkpointing).
@pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
def test_lora_sft_writes_a_loadable_adapter(
    lora_run: tuple[Run, dict[str, Any]], tiny_llama: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, result = lora_run
    assert result["final_dir"] == "final_lora" and result["global_step"] == 4
    assert result["world_size"] == 1 and result["resumed_from_step"] is None
    assert isinstance(result["train_loss"], float)
    adapter = run.ctx.artifacts_dir / "final_lora"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    assert _adapter_trained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    enc = tokenizer("hello world", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert out.shape[1] == enc["input_ids"].shape[1] + 1


def test_progress_and_checkpoints_reach_the_context(lora_run: tuple[Run, dict[str, Any]]) -> None:
    run, _ = lora_run
    losses = [r for r in run.reports if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(r["total"] == 4 and isinstance(r["loss"], float) for r in losses)
    assert all("learning_rate" in r and "epoch" in r for r in losses)
    names = [p.name for p in run.checkpoints.saved_paths]
    assert names == ["checkpoint-2", "checkpoint-4"]
    assert all(run.checkpoints.complete)  # complete when announced
    assert run.checkpoints.flushed == 1
    assert "loss" in run.trainer_log()


def test_resume_starts_at_the_checkpoints_step(
    lora_run: tuple[Run, dict[str, Any]], make_run: MakeRun, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = lora_run
    checkpoint = first.checkpoints.saved_paths[0]
    run = make_run(
        "lora_sft", {**FAST, "max_steps": 4, "learning_rate": 1e-3}, SFT_ITEMS, latest=checkpoint
    )
    with caplog.at_level("INFO", logger="executors"):
        result = run.executor.run(run.ctx)
    assert result["resumed_from_step"] == 2 and result["global_step"] == 4
    line = f"resuming from checkpoint {checkpoint} at step 2"
    assert line in caplog.text and line in run.trainer_log()
    steps = [r["step"] for r in run.reports if "loss" in r]
    assert steps == [3, 4]
    assert run.reports[0]["resumed_from_step"] == 2


def test_sft_writes_a_full_model(make_run: MakeRun, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = make_run("sft", {**FAST, "max_steps": 2, "learning_rate": 1e-3}, SFT_ITEMS)
    result = run.executor.run(run.ctx)
    final = run.ctx.artifacts_dir / "final_model"
    assert result["final_dir"] == "final_model" and result["global_step"] == 2
    assert (final / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(final)
    assert _changed(tiny_llama, final)


def test_dpo_trains_the_policy(make_run: MakeRun, tiny_llama: Path) -> None:
    run = make_run("dpo", {**FAST, "max_steps": 2, "learning_rate": 1e-3}, DPO_ITEMS)
    result = run.executor.run(run.ctx)
    assert result["global_step"] == 2
    assert _changed(tiny_llama, run.ctx.artifacts_dir / "final_model")


def test_grpo_trains_an_adapter_with_builtin_rewards(make_run: MakeRun) -> None:
    training = {
        **FAST, "max_steps": 2, "learning_rate": 1e-2, "lora": {"r": 4},
        "num_generations": 2, "max_completion_length": 6,
        "rewards": [{"name": "length", "target": 12}, {"name": "contains", "keyword": "the"}],
    }  # fmt: skip
    run = make_run("grpo", training, PROMPTS)
    result = run.executor.run(run.ctx)
    assert result["final_dir"] == "final_lora" and result["global_step"] == 2
    assert _adapter_trained(run.ctx.artifacts_dir / "final_lora")
    assert any("reward" in r for r in run.reports)


def test_ppo_trains_and_checkpoints(make_run: MakeRun, tiny_llama: Path) -> None:
    training = {
        **FAST, "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "save_steps": 2,
        "ppo_epochs": 2, "num_mini_batches": 2, "max_completion_length": 6,
        "rewards": [{"name": "length", "target": 12}],
    }  # fmt: skip
    run = make_run("ppo", training, PROMPTS)
    result = run.executor.run(run.ctx)
    assert result["final_dir"] == "final_model" and result["global_step"] == 2
    assert _changed(tiny_llama, run.ctx.artifacts_dir / "final_model")
    assert {"reward", "kl"} <= result["metrics"].keys()
    [checkpoint] = run.checkpoints.saved_paths
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert (checkpoint / "value_head.pt").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert [r["step"] for r in run.reports if "loss" in r] == [1, 2]


def test_checkpoint_load_trains_an_adapter_further_from_its_archive(
    lora_run: tuple[Run, dict[str, Any]], make_run: MakeRun, tmp_path: Path
) -> None:
    # An earlier task's final_lora.tar.gz (here a local archive; a URL takes the same path
    # through the worker's cache) is where the next training starts.
    from safetensors.torch import load_file

    from worker.artifacts.archive import ArchiveSettings, create_archive
    from worker.artifacts.fetch import ArtifactCache, FetchSettings

    first, _ = lora_run
    adapter = first.ctx.artifacts_dir / "final_lora"
    archive = create_archive(adapter, tmp_path / "archives", ArchiveSettings()).path
    # A learning rate too small to move the weights: what comes out is what went in.
    run = make_run(
        "lora_sft",
        {**FAST, "max_steps": 1, "learning_rate": 1e-12},
        SFT_ITEMS,
        checkpoint=str(archive),
    )
    run.ctx.resolve = ArtifactCache(FetchSettings(cache_dir=tmp_path / "cache")).resolve
    result = run.executor.run(run.ctx)
    assert result["final_dir"] == "final_lora" and result["global_step"] == 1
    before = load_file(adapter / "adapter_model.safetensors")
    after = load_file(run.ctx.artifacts_dir / "final_lora" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    trained = [k for k in before if "lora_B" in k]
    assert trained and all(before[k].abs().sum() > 0 for k in trained)  # not a fresh adapter
    assert all((before[k] - after[k]).abs().max() < 1e-6 for k in before)
