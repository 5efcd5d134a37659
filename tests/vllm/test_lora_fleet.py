"""LoRA adapters on the vLLM engine through the fleet: from a local directory and from an
http(s) `.tar.gz`, on an engine started with LoRA beside the base model's warm one."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.vllm.conftest import Fleet

pytest.importorskip(
    "vllm", reason="needs vLLM: the .venv-vllm environment that .ci/run builds (CPU build)"
)

pytestmark = pytest.mark.timeout(300)

PROMPT = ["the quick brown fox"]


def build_adapter(path: Path, base: Path, rank: int = 8) -> Path:
    """A PEFT LoRA adapter for the tiny Llama (q and v projections), with random weights
    large enough to change what greedy decoding picks."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden = config["hidden_size"]
    kv = config["num_key_value_heads"] * config.get(
        "head_dim", hidden // config["num_attention_heads"]
    )
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return path


@pytest.fixture(scope="module")
def adapter(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(tmp_path_factory.mktemp("adapters") / "shouty", fleet.model)


def lora_spec(fleet: Fleet, identifier: str) -> dict:
    return fleet.spec(
        PROMPT, max_tokens=12, spec_model={"lora": {"identifier": identifier, "name": "shouty"}}
    )


def test_an_adapter_changes_the_text_and_is_served_from_a_directory_or_a_url(
    fleet: Fleet, first_task, adapter: Path, tmp_path: Path, serve_directory
):
    base = fleet.run(fleet.spec(PROMPT, max_tokens=12))
    assert base["result"]["warm"] is True

    local = fleet.run(lora_spec(fleet, str(adapter)), timeout=240)
    assert local["status"] == "DONE", local["error"]
    assert local["result"]["lora"] == "shouty"
    # The warm engine was started without LoRA: one with it starts beside it.
    assert local["result"]["warm"] is False
    assert local["result"]["responses"][0]["text"] != base["result"]["responses"][0]["text"]

    with tarfile.open(tmp_path / "shouty.tar.gz", "w:gz") as tar:
        tar.add(adapter, arcname="shouty")
    url, requests = serve_directory(tmp_path)
    remote = fleet.run(lora_spec(fleet, f"{url}/shouty.tar.gz"))
    assert remote["status"] == "DONE", remote["error"]
    assert remote["result"]["warm"] is True  # the LoRA engine, warm
    assert remote["result"]["responses"][0]["text"] == local["result"]["responses"][0]["text"]
    again = fleet.run(lora_spec(fleet, f"{url}/shouty.tar.gz"))
    assert again["status"] == "DONE", again["error"]
    assert requests == ["/shouty.tar.gz"]  # downloaded once

    # The base model's tasks still find their text (on either warm engine).
    after = fleet.run(fleet.spec(PROMPT, max_tokens=12))
    assert after["result"]["responses"][0]["text"] == base["result"]["responses"][0]["text"]
    assert after["result"]["warm"] is True


def test_a_missing_adapter_directory_fails_at_once_as_permanent(fleet: Fleet, tmp_path: Path):
    missing = tmp_path / "no-adapter"
    task = fleet.run(lora_spec(fleet, str(missing)), timeout=60)
    assert task["status"] == "FAILED"
    assert task["attempts"] == 1
    assert task["error"]["kind"] == "permanent"
    assert str(missing) in task["error"]["message"]
