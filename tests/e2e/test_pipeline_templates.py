"""The pipeline templates a user copies (templates/pipeline_*.yaml), run on a real fleet as
written, with only their `spec.params` changed: a tiny model, a few steps."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, TRAINING_TIMEOUT, Orchestrator, Proc
from tests.e2e.test_pipelines import stage, submit, wait_pipeline

pytestmark = TRAINING_TIMEOUT
TEMPLATES = ROOT / "templates"
API_TOKEN = "api-secret-token"
WORKER_TOKEN = "worker-secret-token"


def template(name: str, **params: Any) -> dict[str, Any]:
    """A template as a user would submit it, its parameters overridden by `params`."""
    doc: dict[str, Any] = yaml.safe_load((TEMPLATES / name).read_text())
    unknown = set(params) - set(doc["spec"]["params"])
    assert not unknown, f"{name} has no parameter(s) {unknown}"
    doc["spec"]["params"].update(params)
    return doc


def states(view: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["state"] for s in view["stages"]}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="needs the inference extra: uv sync --extra inference")
    pytest.importorskip(
        "transformers", reason="needs the inference extra: uv sync --extra inference"
    )
    from flowmesh.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.mark.parametrize(
    ("name", "first", "waiting"),
    [
        ("pipeline_echo.yaml", "split", ["fanout", "join"]),
        ("pipeline_fanout_inference.yaml", "generate", ["collect"]),
        ("pipeline_lora_serve.yaml", "train", ["serve"]),
    ],
)
def test_each_template_is_accepted_as_written(
    orchestrator: Orchestrator, name: str, first: str, waiting: list[str]
) -> None:
    # No worker: the defaults (hub models, a GPU) pass the submit-time checks and wait.
    doc = template(name)
    view = submit(orchestrator, doc)
    assert view["status"] == "RUNNING" and view["params"] == doc["spec"]["params"]
    assert states(view) == {first: "running", **dict.fromkeys(waiting, "waiting")}
    pid = view["pipeline_id"]
    assert orchestrator.http.post(f"/api/v1/pipelines/{pid}/cancel").status_code == 200
    assert wait_pipeline(orchestrator, pid, timeout=20)["status"] == "CANCELLED"


def test_echo_pipeline_fans_out_and_joins_in_item_order(
    orchestrator: Orchestrator, start_worker: Callable[..., Proc]
) -> None:
    start_worker("w1", WORKER_SLOTS="4")
    start_worker("w2", WORKER_SLOTS="4")
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    view = submit(orchestrator, template("pipeline_echo.yaml", words=words, delaySec=0.2))
    done = wait_pipeline(orchestrator, view["pipeline_id"])
    assert done["status"] == "DONE", done
    assert states(done) == {"split": "done", "fanout": "done", "join": "done"}
    assert [s["depends_on"] for s in done["stages"]] == [[], ["split"], ["fanout"]]
    fanout = stage(done, "fanout")
    assert fanout["task_count"] == 5 and fanout["task_states"] == {"DONE": 5}
    assert [t["item"] for t in fanout["tasks"]] == [0, 1, 2, 3, 4]
    join = orchestrator.wait(stage(done, "join")["tasks"][0]["task_id"])
    assert join["result"]["items"] == [f"{i}:{w}" for i, w in enumerate(words)]
    assert join["result"]["message"] == [t["task_id"] for t in fanout["tasks"]]


def test_fanout_inference_runs_one_task_per_prompt_and_collects_the_answers(
    orchestrator: Orchestrator, start_worker: Callable[..., Proc], tiny_llama: Path
) -> None:
    start_worker("w1", WORKER_EXECUTORS="echo,inference")
    prompts = [
        "the quick brown fox",
        {"prompt": "hello world"},
        {"messages": [{"role": "user", "content": "one two three"}]},
    ]
    doc = template(
        "pipeline_fanout_inference.yaml",
        model=str(tiny_llama),
        prompts=prompts,
        max_tokens=4,
        temperature=0,
    )
    view = submit(orchestrator, doc)
    done = wait_pipeline(orchestrator, view["pipeline_id"], timeout=150)
    assert done["status"] == "DONE", done
    assert states(done) == {"generate": "done", "collect": "done"}
    generate = stage(done, "generate")
    assert generate["task_count"] == 3 and generate["task_states"] == {"DONE": 3}
    texts = []
    for task, words in zip(
        generate["tasks"], ["the quick brown fox", "hello world", "one two three"], strict=True
    ):
        (response,) = orchestrator.wait(task["task_id"])["result"]["responses"]
        assert words in response["prompt"]
        assert 0 < response["completion_tokens"] <= 4
        texts.append(response["text"])
    collect = orchestrator.wait(stage(done, "collect")["tasks"][0]["task_id"])
    assert collect["result"]["items"] == texts
    assert collect["result"]["message"] == str(tiny_llama)


def test_lora_serve_trains_uploads_and_serves_the_adapter_by_url(
    start_orchestrator: Callable[..., Orchestrator],
    start_worker: Callable[..., Proc],
    tiny_llama: Path,
    tmp_path: Path,
) -> None:
    pytest.importorskip("trl", reason="needs the training extra: uv sync --extra training")
    pytest.importorskip("peft", reason="needs the training extra: uv sync --extra training")
    orch = start_orchestrator(
        API_TOKEN,
        FLOWMESH_WORKER_TOKEN=WORKER_TOKEN,
        FLOWMESH_RESULTS_DIR=str(tmp_path / "orchestrator-results"),
    )
    # Trained on one worker and served on another, with a disk of its own: the adapter
    # reaches it by its URL only.
    workers = {
        name: start_worker(
            name,
            WORKER_EXECUTORS=executor,
            ORCHESTRATOR_BASE_URL=orch.url,
            FLOWMESH_WORKER_TOKEN=WORKER_TOKEN,
            RESULTS_DIR=str(tmp_path / name),
        )
        for name, executor in (("trainer", "lora_sft"), ("server", "inference"))
    }
    items = [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Two plus two is", "completion": " four."},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": "Water is", "completion": " wet."},
    ]
    doc = template(
        "pipeline_lora_serve.yaml",
        base_model=str(tiny_llama),
        train_data={"type": "list", "items": items},
        epochs=2,  # 4 items in batches of 4: 2 steps
        gpus=0,
        prompts=["The capital of France is", "The sky is"],
        max_tokens=4,
    )
    view = submit(orch, doc)
    done = wait_pipeline(orch, view["pipeline_id"], timeout=240)
    assert done["status"] == "DONE", (done, [w.log()[-3000:] for w in workers.values()])
    assert states(done) == {"train": "done", "serve": "done"}

    train_id = stage(done, "train")["tasks"][0]["task_id"]
    train = orch.wait(train_id)["result"]
    assert train["global_step"] == 2
    url = train["final_lora_archive_url"]
    assert url == f"{orch.url}/api/v1/results/{train_id}/files/final_lora.tar.gz"

    serve = stage(done, "serve")
    assert serve["depends_on"] == ["train"]
    assert serve["inputs"]["spec.model.lora.identifier"] == url
    task = orch.wait(serve["tasks"][0]["task_id"])
    assert task["worker_id"] == "server"
    model = task["spec"]["spec"]["model"]
    assert model["source"]["identifier"] == str(tiny_llama)  # the base spec's, merged in
    assert model["lora"]["identifier"] == url
    assert task["result"]["lora"] == "final_lora"  # the adapter it applied
    responses = task["result"]["responses"]
    assert [r["index"] for r in responses] == [0, 1]
    assert all(r["completion_tokens"] > 0 for r in responses)
    # The worker fetched the adapter from the URL, once, into its cache keyed by its sha256.
    assert orch.log().count(f"GET /api/v1/results/{train_id}/files/final_lora.tar.gz") == 1
    assert (tmp_path / "server" / ".artifact-cache" / train["final_lora_archive_sha256"]).is_dir()
    archive = orch.http.get(url)
    assert archive.status_code == 200
    assert hashlib.sha256(archive.content).hexdigest() == train["final_lora_archive_sha256"]
