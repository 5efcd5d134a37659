"""Spec parsing: sizes, defaults, and error paths a user can act on."""

from __future__ import annotations

import pytest

from flowmesh.spec import Requirements, SpecError, parse_bytes, parse_task


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("80GB", 80 * 10**9),
        ("512Mi", 512 * 2**20),
        (1024, 1024),
        ("1.5G", 1_500_000_000),
    ],
)
def test_sizes(text, value):
    assert parse_bytes(text) == value


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
    from pathlib import Path

    import yaml

    templates = sorted((Path(__file__).parents[2] / "templates").glob("*.yaml"))
    assert templates
    for path in templates:
        for doc in yaml.safe_load_all(path.read_text()):
            parse_task(doc)
