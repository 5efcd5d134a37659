"""Pipeline templates and graph checks, as pure functions."""

from __future__ import annotations

import pytest

from flowmesh.pipeline import deep_merge, find_cycle, topological
from orchestrator.pipelines.templates import (
    KEEP,
    MISSING,
    Ref,
    TemplateError,
    follow,
    parse_ref,
    render,
    templated_paths,
)

RESULTS = {"train": [{"url": "http://o/a.tar.gz", "n": 3}], "fan": [{"m": "a"}, {"m": "b"}]}


def lookup(ref: Ref):
    if ref.scope == "params":
        return follow({"xs": [1, 2], "name": "x"}, ref.path, "params")
    if ref.field == "result":
        return follow(RESULTS[ref.stage][0], ref.path, f"{ref.stage}'s result")
    if ref.field == "results":
        return [follow(r, ref.path[1:], "r") for r in RESULTS[ref.stage]]
    return MISSING


def test_a_whole_template_keeps_its_type_and_an_embedded_one_is_written_in():
    spec = {
        "a": "${params.xs}",
        "b": "n=${train.result.n}, xs=${params.xs}",
        "c": ["${fan.results[*].m}"],
        "d": "cost: $${not.a.template}",
    }
    assert render(spec, lookup) == {
        "a": [1, 2],
        "b": "n=3, xs=[1,2]",
        "c": [["a", "b"]],
        "d": "cost: ${not.a.template}",
    }


def test_a_value_that_resolves_to_nothing_names_the_field_and_the_template():
    with pytest.raises(TemplateError, match=r"^spec\.x: \$\{train\.task_id\} resolved to nothing"):
        render({"spec": {"x": "${train.task_id}"}}, lookup)
    with pytest.raises(TemplateError, match=r"train's result has no 'nope' \(it has: n, url\)"):
        render({"x": "${train.result.nope}"}, lookup)
    with pytest.raises(TemplateError, match=r"has 2 item\(s\); \[7\] is past its end"):
        follow([1, 2], (7,), "items")


def test_a_partial_render_keeps_later_templates_and_escapes():
    def params_only(ref: Ref):
        return lookup(ref) if ref.scope == "params" else KEEP

    text = "${params.name}/${train.result.url}/$${x}"
    assert render(text, params_only, final=False) == "x/${train.result.url}/$${x}"
    assert render("${train.result.url}", params_only, final=False) == "${train.result.url}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train", "after the stage name comes one of"),
        ("train.result.a[*]", r"\[\*\] is for a stage's results only"),
        ("train.task_id.x", "task_id has no fields"),
        ("params", "name a parameter"),
        ("index.x", "is a number"),
        ("1abc", "is not a template"),
        ("train.results.x", "results is a list"),
        ("train.result.a b", "cannot read"),
    ],
)
def test_unreadable_templates_say_what_is_wrong(text, message):
    with pytest.raises(TemplateError, match=message):
        parse_ref(text)


def test_templated_paths_name_every_field_holding_a_template():
    spec = {"spec": {"model": {"lora": {"identifier": "${t.result.u}"}}, "data": ["a", "${item}"]}}
    paths = templated_paths(spec)
    assert sorted(paths) == ["spec.data[1]", "spec.model.lora.identifier"]
    assert paths["spec.model.lora.identifier"][0].stage == "t"


def test_graph_helpers():
    assert find_cycle({"a": ["c"], "b": ["a"], "c": ["b"]}) == ["a", "c", "b", "a"]
    assert find_cycle({"a": [], "b": ["a"]}) is None
    assert topological({"a": ["b"], "b": []}, ["a", "b"]) == ["b", "a"]
    base = {"model": {"source": {"identifier": "m"}, "dtype": "auto"}, "tags": ["x"]}
    merged = deep_merge(base, {"model": {"dtype": "float32"}, "tags": ["y"]})
    assert merged == {"model": {"source": {"identifier": "m"}, "dtype": "float32"}, "tags": ["y"]}
    assert base["model"]["dtype"] == "auto"  # the base is not changed


def test_a_parameter_holding_a_template_stays_literal_through_release():
    from orchestrator.pipelines.planner import plan_pipeline, stage_document

    def no_lookup(ref: Ref):
        raise AssertionError(f"{ref.text} was read as a template")

    plan = plan_pipeline(
        {
            "kind": "Pipeline",
            "spec": {
                "params": {"note": "costs ${secret.result.x}", "xs": ["${a}", "b"]},
                "taskType": "echo",
                "stages": [
                    {"name": "a", "spec": {"echo": {"message": "${params.note}"}}},
                    {
                        "name": "b",
                        "forEach": "${params.xs}",
                        "spec": {"echo": {"message": "${item}"}},
                    },
                ],
            },
        },
        check=lambda docs: [],
        result_fields=lambda task_type: None,
    )
    a = plan["stages"]["a"]
    assert a["deps"] == [] and a["sources"] == []  # no dependency on a stage named `secret`
    document = stage_document(plan, "a")
    assert render(document, no_lookup)["spec"]["echo"]["message"] == "costs ${secret.result.x}"
    from orchestrator.pipelines.templates import unescape

    assert unescape(plan["stages"]["b"]["forEach"]) == ["${a}", "b"]


def test_a_thousand_stages_in_reverse_order_are_checked_without_recursion():
    deps = {f"s{i}": [f"s{i + 1}"] for i in range(999)}
    deps["s999"] = []
    assert find_cycle(deps) is None
    deps["s999"] = ["s0"]
    assert len(find_cycle(deps)) == 1001
