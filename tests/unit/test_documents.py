"""Reading a request body: values no spec may hold are refused with their path, and no
input, however deep or odd, gets past `decode` as anything but a BodyError."""

from __future__ import annotations

import json

import pytest

from flowmesh.spec import CATALOG_TASK_TYPES
from orchestrator.documents import MAX_DEPTH, BodyError, decode, validate

JSON = "application/json"
YAML = "application/yaml"


def refused(body: str, content_type: str = JSON) -> BodyError:
    with pytest.raises(BodyError) as info:
        decode(body.encode(), content_type)
    assert info.value.status == 400
    return info.value


def nested(levels: int) -> str:
    """A document whose innermost list sits at `levels` (the document is level 1)."""
    return '{"spec": ' * (levels - 1) + "[]" + "}" * (levels - 1)


def test_depth_up_to_the_limit_is_read_and_one_more_is_refused():
    assert decode(nested(MAX_DEPTH).encode(), JSON)
    err = refused(nested(MAX_DEPTH + 1))
    path = ".".join(["spec"] * MAX_DEPTH)
    assert err.problems == [(path, f"nested deeper than 64 levels at {path}; {NESTS}")]
    assert str(err) == f"body: nested deeper than 64 levels at {path}; {NESTS}"


NESTS = "a spec nests 64 levels at most"


@pytest.mark.parametrize("levels", [300, 1_000, 5_000])
def test_any_depth_is_a_400_not_a_recursion_error(levels):
    text = '{"spec": {"items": ' + "[" * levels + "]" * levels + "}}"
    assert "nested deeper than 64 levels" in str(refused(text, JSON))
    yaml_text = "spec: {items: " + "[" * levels + "]" * levels + "}"
    err = refused(yaml_text, YAML)
    assert err.problems[0][0] == "spec.items" + "[0]" * 62
    assert "(line 1, column 77)" in err.problems[0][1]


def test_a_list_body_counts_its_own_level_and_names_the_item():
    fits = nested(MAX_DEPTH - 1)  # innermost at level 64 inside the body's list
    inner = nested(MAX_DEPTH)  # innermost at level 65 inside the list, at `spec` x 63
    alone = nested(MAX_DEPTH + 1)  # too deep as a document of its own, at `spec` x 64
    assert len(decode(f"[{fits}, {fits}]".encode(), JSON)) == 2
    assert len(decode(f"{inner}\n---\n{inner}\n".encode(), YAML)) == 2
    in_list = ".".join(["spec"] * (MAX_DEPTH - 1))
    assert refused(f"[{inner}]").problems[0][0] == in_list
    assert refused(f"[{fits}, {inner}]").problems[0][0] == "[1]." + in_list
    assert refused(f"- {fits}\n- {inner}\n", YAML).problems[0][0] == "[1]." + in_list
    own = ".".join(["spec"] * MAX_DEPTH)
    assert refused(f"{fits}\n---\n{alone}\n", YAML).problems[0][0] == "[1]." + own
    assert refused(f"{alone}\n---\n{fits}\n", YAML).problems[0][0] == "[0]." + own
    assert refused(f"{alone}\n", YAML).problems[0][0] == own


def test_block_style_yaml_too_deep_names_its_path_and_line():
    text = (
        "spec:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(70)) + "  " * 71 + "x: 1\n"
    )
    (problem,) = refused(text, YAML).problems
    assert problem[0] == "spec." + ".".join(f"k{i}" for i in range(63))
    assert "(line 65, column 129)" in problem[1]


@pytest.mark.parametrize(
    ("text", "content_type"),
    [
        (r'{"spec": {"echo": {"message": "x\ud800"}}}', JSON),
        ('spec: {echo: {message: "x\\ud800"}}', YAML),
        ('spec: {echo: {message: "x\\U0000d800"}}', YAML),
    ],
)
def test_a_lone_surrogate_is_named_with_its_path(text, content_type):
    err = refused(text, content_type)
    message = "string at spec.echo.message holds a lone surrogate (\\ud800), not valid Unicode"
    assert err.problems == [("spec.echo.message", message)]
    assert str(err) == "body: " + message
    json.dumps(err.problems, ensure_ascii=False).encode()  # the reply can be sent


def test_a_lone_surrogate_in_a_key_is_named_without_breaking_the_reply():
    err = refused(r'{"spec": {"a\udc00b": 1}}')
    (loc, msg) = err.problems[0]
    assert loc == "spec.'a\\udc00b'"
    assert msg == "key at spec.'a\\udc00b' holds a lone surrogate (\\udc00), not valid Unicode"
    json.dumps(err.problems, ensure_ascii=False).encode()


def test_a_surrogate_pair_spelt_as_escapes_is_one_character_in_keys_and_values():
    (doc,) = decode(b'spec: {"k\\ud83d\\ude00": "v\\ud83d\\ude00", z: 1}', YAML)
    assert doc == {"spec": {"k\U0001f600": "v\U0001f600", "z": 1}}
    assert list(doc["spec"]) == ["k\U0001f600", "z"]  # the order is kept


@pytest.mark.parametrize(
    ("text", "content_type", "path", "shown"),
    [
        ('{"spec": {"items": [1, NaN]}}', JSON, "spec.items[1]", "nan"),
        ('{"spec": {"timeoutSec": Infinity}}', JSON, "spec.timeoutSec", "inf"),
        ('{"spec": {"timeoutSec": -Infinity}}', JSON, "spec.timeoutSec", "-inf"),
        ('{"spec": {"x": 1e400}}', JSON, "spec.x", "inf"),
        ("spec: {items: [.nan]}", YAML, "spec.items[0]", "nan"),
        ("spec: {x: -.inf}", YAML, "spec.x", "-inf"),
    ],
)
def test_nan_and_infinity_are_refused_anywhere(text, content_type, path, shown):
    (problem,) = refused(text, content_type).problems
    assert problem == (
        path,
        f"number at {path} is {shown}: NaN and Infinity are not accepted "
        "(nor numbers too large for a 64-bit float)",
    )


def test_duplicate_keys_are_refused_not_last_one_wins():
    err = refused('{"spec": {"priority": 1, "taskType": "echo", "priority": 9}}')
    assert err.problems == [
        ("spec", "duplicate key 'priority' at spec: give each key once (JSON would keep the last)")
    ]
    err = refused("spec:\n  priority: 1\n  priority: 9\n", YAML)
    assert str(err) == (
        "body: duplicate key 'priority' at line 3, column 3: give each key once "
        "(YAML would keep the last)"
    )
    assert "'1' and 'on' are one key" in str(refused("spec: {1: a, on: b}", YAML))
    # A merge key (`<<`) overriding on purpose is not a duplicate.
    assert decode(b"spec: {<<: {priority: 1}, priority: 2}", YAML) == [{"spec": {"priority": 2}}]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("spec: {items: [2024-01-01]}", "value at spec.items[0] is a YAML date"),
        ("spec: {at: 2024-01-01 10:00:00}", "value at spec.at is a YAML timestamp"),
        ("spec: {x: !!binary gIA=}", "value at spec.x is a YAML binary value (!!binary)"),
        ("spec: {x: !!set {a, b}}", "value at spec.x is a YAML set (!!set)"),
        ("spec: {x: !!omap [a: 1]}", "value at spec.x[0] is a YAML pair"),
        ("spec: {echo: {1: one}}", "key 1 at spec.echo is of type int; keys must be strings"),
        ("spec: {echo: {null: x}}", "key None at spec.echo is of type NoneType"),
        ("spec: {x: 2024-02-30}", "body: a value cannot be read: day is out of range for month"),
        ("spec: {x: " + "9" * 5000 + "}", "body: a number has more than 4300 digits"),
    ],
)
def test_yaml_values_json_cannot_hold_are_refused(text, words):
    assert words in str(refused(text, YAML))


def test_a_huge_json_integer_is_a_400():
    assert "more than 4300 digits" in str(refused('{"x": ' + "9" * 5000 + "}"))


def test_problems_are_capped_and_listed_in_order():
    err = refused(json.dumps({"spec": {"items": [float("nan")] * 50}}))
    assert len(err.problems) == 20
    assert [p[0] for p in err.problems[:3]] == ["spec.items[0]", "spec.items[1]", "spec.items[2]"]


def test_valid_documents_come_back_unchanged():
    body = {
        "spec": {
            "taskType": "echo",
            "echo": {"message": "héllo \U0001f600", "n": 2**70, "x": -0.5, "ok": True},
            "data": {"items": [None, [], {}, "x"]},
        }
    }
    assert decode(json.dumps(body).encode(), JSON) == [body]
    assert decode(json.dumps(body, ensure_ascii=False).encode(), YAML) == [body]


def pick(task_type: str, available: set[str]) -> str:
    with pytest.raises(Exception) as info:
        validate(
            [{"spec": {"taskType": task_type}}],
            max_batch=10,
            available_types=available,
            executor_of=lambda _: None,
        )
    ((loc, msg),) = info.value.problems  # type: ignore[attr-defined]
    assert loc == "spec.taskType"
    return msg


def test_a_type_is_accepted_only_when_an_executor_for_it_exists():
    assert validate(
        [{"spec": {"taskType": "shout"}}],
        max_batch=10,
        available_types={"echo", "shout"},
        executor_of=lambda _: None,
    )
    assert pick("teleport", {"echo", "inference"}) == (
        "no executor 'teleport' is installed here or offered by any registered worker; "
        "available: echo, inference"
    )
    for task_type in set(CATALOG_TASK_TYPES) - {"echo", "inference"}:
        assert pick(task_type, {"echo", "inference"}) == (
            f"no executor {task_type!r} is installed here or offered by any registered "
            f"worker; available: echo, inference ({task_type!r} is a planned catalogue "
            "type: it can be submitted once its executor is installed here or a worker "
            "offers it)"
        )
    assert pick("sft", set()).endswith(
        "available: none ('sft' is a planned catalogue type: "
        "it can be submitted once its executor is installed "
        "here or a worker offers it)"
    )


def test_tagged_yaml_values_pyyaml_cannot_construct_are_a_400() -> None:
    import pytest

    from orchestrator.documents import BodyError, decode

    for value in ("!!bool x", "!!int ''", "!!float ''", "!!timestamp x"):
        body = f"spec: {{taskType: echo, echo: {{message: {value}}}}}\n".encode()
        with pytest.raises(BodyError, match="tagged YAML value"):
            decode(body, "application/yaml")


def test_a_byte_order_mark_is_not_part_of_the_document() -> None:
    from orchestrator.documents import decode

    body = '\ufeff{"spec": {"taskType": "echo"}}'.encode()
    assert decode(body, "application/json") == [{"spec": {"taskType": "echo"}}]
