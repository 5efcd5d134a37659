"""Spec parsing: sizes, defaults, and error paths a user can act on."""

from __future__ import annotations

import re

import pytest

from flowmesh.spec import MAX_BYTES, Requirements, SpecError, parse_bytes, parse_task


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("80GB", 80 * 10**9),
        ("512Mi", 512 * 2**20),
        (1024, 1024),
        ("1.5G", 1_500_000_000),
        ("1Pi", 2**50),
        (2**50, MAX_BYTES),
        (4096.0, 4096),
    ],
)
def test_sizes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (1e300, "1e+300 is more than the largest size accepted, 1Pi (1125899906842624 bytes)"),
        ("1025Ti", "'1025Ti' is more than the largest size accepted, 1Pi"),
        (2**50 + 1, "is more than the largest size accepted"),
        (float("inf"), "inf is not a size"),
        (float("nan"), "nan is not a size"),
        (True, "expected a size"),
        ("1e300", "cannot read '1e300' as a size"),
    ],
)
def test_sizes_past_the_limit_or_not_numbers_are_refused(value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_bytes(value)


def problems(spec: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_task({"spec": {"taskType": "echo", **spec}})
    return dict(info.value.problems)


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"priority": True}, "spec.priority", "not the boolean true"),
        ({"maxAttempts": False}, "spec.maxAttempts", "not the boolean false"),
        ({"maxAttempts": 2.0}, "spec.maxAttempts", "valid integer"),
        ({"priority": "3"}, "spec.priority", "valid integer"),
        ({"timeoutSec": True}, "spec.timeoutSec", "not the boolean true"),
        ({"timeoutSec": "30"}, "spec.timeoutSec", "valid number"),
        ({"timeoutSec": float("nan")}, "spec.timeoutSec", "finite number"),
        ({"retryBackoffSec": float("nan")}, "spec.retryBackoffSec", "finite number"),
        ({"resources": {"replicas": True}}, "spec.resources.replicas", "boolean"),
        ({"resources": {"hardware": {"cpu": True}}}, "spec.resources.hardware.cpu", "boolean"),
        (
            {"resources": {"hardware": {"cpu": float("inf")}}},
            "spec.resources.hardware.cpu",
            "finite number",
        ),
        (
            {"resources": {"hardware": {"gpu": {"count": True}}}},
            "spec.resources.hardware.gpu.count",
            "boolean",
        ),
        (
            {"resources": {"hardware": {"memory": 1e300}}},
            "spec.resources.hardware.memory",
            "largest size accepted, 1Pi",
        ),
        (
            {"model": {"source": {"identifier": "m"}, "trust_remote_code": 1}},
            "spec.model.trust_remote_code",
            "valid boolean",
        ),
    ],
)
def test_numbers_are_numbers_and_booleans_are_booleans(spec, path, words):
    found = problems(spec)
    assert words in found.get(path, ""), found


def test_plain_numbers_from_yaml_or_json_are_still_numbers():
    body = parse_task(
        {
            "spec": {
                "taskType": "echo",
                "priority": -3,
                "maxAttempts": 5,
                "timeoutSec": 10,
                "retryBackoffSec": 0,
                "resources": {"hardware": {"cpu": 1, "memory": 2.5e9, "gpu": {"count": 1}}},
            }
        }
    ).spec
    assert (body.priority, body.maxAttempts, body.timeoutSec) == (-3, 5, 10.0)
    assert body.resources.hardware.memory == 2_500_000_000
    assert body.resources.hardware.gpu.count == 1


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        (
            {"output": {"destination": {"url": "https://example.com"}}},
            "spec.output.destination.url",
            "not supported yet: an upload goes to the orchestrator the worker is configured "
            "with (ORCHESTRATOR_BASE_URL), never to a URL or path a spec names; use type: "
            "http or type: local",
        ),
        (
            {"output": {"destination": {"path": "/srv/out"}}},
            "spec.output.destination.path",
            "not supported yet: an upload goes to the orchestrator the worker is configured "
            "with (ORCHESTRATOR_BASE_URL), never to a URL or path a spec names; use type: "
            "http or type: local",
        ),
        (
            {"output": {"artifacts": ["weights.bin"]}},
            "spec.output.artifacts",
            "not supported yet: every file an executor writes under its artifacts directory "
            "is kept, and final_model/ and final_lora/ are archived",
        ),
    ],
)
def test_fields_nothing_reads_yet_are_refused_saying_so(spec, path, message):
    assert problems(spec) == {path: message}


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"type": "jsonl"}, "spec.data", "data.type 'jsonl' needs data.path"),
        ({"type": "url", "url": "ftp://x/y"}, "spec.data.url", "expected an http:// or https://"),
        (
            {"type": "list", "items": [1], "path": "/d.jsonl"},
            "spec.data",
            "data.type 'list' reads data.items only; remove data.path",
        ),
        (
            {"type": "parquet", "path": "/d.parquet", "sha256": "0" * 64},
            "spec.data",
            "data.sha256 checks a download: it needs data.type 'url'",
        ),
        ({"type": "url", "url": "http://h/x", "sha256": "xyz"}, "spec.data.sha256", "pattern"),
    ],
)
def test_data_sources_are_checked(data, path, message):
    found = problems({"data": data})
    assert message in found.get(path, ""), found


def test_data_sources_and_a_checkpoint_to_load():
    body = parse_task(
        {
            "spec": {
                "taskType": "lora_sft",
                "data": {"type": "url", "url": "http://orch:8000/a.jsonl", "sha256": "a" * 64},
                "checkpoint": {"load": {"identifier": "http://orch:8000/final_lora.tar.gz"}},
                "output": {"destination": {"type": "http"}},
            }
        }
    ).spec
    assert body.data is not None and body.data.url == "http://orch:8000/a.jsonl"
    assert body.checkpoint is not None
    assert body.checkpoint.load.identifier.endswith("final_lora.tar.gz")
    assert body.output is not None and body.output.destination.type == "http"


def test_empty_reserved_fields_and_a_local_destination_are_fine():
    body = parse_task(
        {
            "spec": {
                "taskType": "echo",
                "model": {"source": {"identifier": "m"}, "vllm": {}},
                "output": {"destination": {"type": "local", "url": None}, "artifacts": []},
            }
        }
    ).spec
    assert body.output is not None and body.output.destination.type == "local"


def test_an_executor_section_passes_the_core_model_as_an_extra_field():
    # Validated against the executor's options model at submit (orchestrator.documents).
    body = parse_task({"spec": {"taskType": "greet", "greet": {"name": "ada"}}}).spec
    assert body.model_extra == {"greet": {"name": "ada"}}


def test_the_stored_spec_reads_back_the_same():
    spec = parse_task(
        {
            "spec": {
                "taskType": "echo",
                "timeoutSec": 5,
                "resources": {"hardware": {"memory": "1Gi", "gpu": {"count": 1}}},
                "output": {"destination": {"type": "local"}},
            }
        }
    )
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec


def test_defaults_and_requirements():
    spec = parse_task({"spec": {"taskType": "echo", "resources": {"tags": ["b", "a", "b"]}}})
    assert spec.apiVersion == "flowmesh/v1"
    assert spec.spec.maxAttempts == 3
    req = Requirements.of(spec.spec)
    assert req.tags == ("a", "b")
    assert req.gpu_count == 0


def test_error_paths_in_a_batch():
    with pytest.raises(SpecError) as info:
        parse_task(
            {"spec": {"taskType": "echo", "resources": {"hardware": {"gpu": {"count": "x"}}}}},
            "[4]",
        )
    assert info.value.problems[0][0] == "[4].spec.resources.hardware.gpu.count"


def test_non_object_document():
    with pytest.raises(SpecError) as info:
        parse_task(["not", "a", "spec"])
    assert "expected a task spec object" in str(info.value)


def test_every_template_is_a_valid_spec():
    """Task templates parse as specs, pipeline templates as pipelines (their stages are
    checked whole on a fleet: tests/e2e/test_pipeline_templates.py)."""
    from pathlib import Path

    import yaml

    from flowmesh.pipeline import is_pipeline, parse_pipeline

    templates = sorted((Path(__file__).parents[2] / "templates").glob("*.yaml"))
    assert templates
    for path in templates:
        for doc in yaml.safe_load_all(path.read_text()):
            if is_pipeline(doc):
                parse_pipeline(doc)
            else:
                parse_task(doc)


def test_a_size_with_hundreds_of_digits_is_a_422_not_an_overflow() -> None:
    import pytest

    from flowmesh.spec import SpecError, parse_task

    with pytest.raises(SpecError, match="more than the largest size accepted"):
        parse_task(
            {"spec": {"taskType": "echo", "resources": {"hardware": {"memory": 9 * 10**400}}}}
        )


def test_labels_and_revision_have_limits() -> None:
    import pytest

    from flowmesh.spec import SpecError, parse_task

    too_many = {f"k{i}": "v" for i in range(65)}
    for metadata, where in [
        ({"labels": too_many}, "metadata.labels"),
        ({"labels": {"team": "x" * 64}}, "metadata.labels.team"),
    ]:
        with pytest.raises(SpecError) as exc:
            parse_task({"metadata": metadata, "spec": {"taskType": "echo"}})
        assert [path for path, _ in exc.value.problems] == [where]
    model = {"source": {"identifier": "m", "revision": "r" * 256}}
    with pytest.raises(SpecError, match="at most 255"):
        parse_task({"spec": {"taskType": "inference", "model": model}})
