"""The failure-kind table: every kind has a rule, the rules are the documented ones, and
`failure()` records a failure with the rule's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowmesh import errors
from flowmesh.failures import RULES, FailureKind, Rule, failure, markdown_table, rule

K = FailureKind
DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_every_kind_has_a_rule():
    assert set(RULES) == set(FailureKind)
    assert all(isinstance(r, Rule) and r.meaning for r in RULES.values())


@pytest.mark.parametrize(
    ("kinds", "charged", "retried", "immediate"),
    [
        ([K.EXCEPTION, K.EXECUTOR_ERROR, K.CRASH, K.CUDA_OOM, K.TIMEOUT], True, True, False),
        ([K.WORKER_ERROR], True, True, False),
        ([K.PERMANENT, K.MISSING_EXTRA, K.BAD_RESULT], True, False, False),
        # Charged as recorded; the lease check passes charge=False for a task not yet started.
        ([K.WORKER_LOST], True, True, True),
        ([K.HANDED_BACK, K.INTERRUPTED, K.EXECUTOR_FAILED], False, True, True),
        ([K.CANCELLED, K.SUPERSEDED], False, False, False),
    ],
)
def test_documented_rules(kinds, charged, retried, immediate):
    for kind in kinds:
        r = RULES[kind]
        assert (r.charged, r.retried, r.immediate) == (charged, retried, immediate), kind


def test_only_attempts_stopped_from_outside_lose_their_outputs():
    outside = {K.SUPERSEDED, K.CANCELLED, K.HANDED_BACK, K.INTERRUPTED, K.WORKER_LOST}
    outside.add(K.EXECUTOR_FAILED)  # the task never ran: nothing of its own to keep
    assert {k for k, r in RULES.items() if not r.keeps_outputs} == outside


def test_an_uncharged_retry_is_immediate():
    # A failure that is not the task's fault is re-placed at once (what the worker does
    # with an uncharged ending).
    for kind, r in RULES.items():
        if r.retried and not r.charged:
            assert r.immediate, kind


def test_rule_by_string_and_unknown_kind():
    assert rule("timeout") is RULES[K.TIMEOUT]
    assert rule(K.PERMANENT) is RULES[K.PERMANENT]
    assert rule("my_plugin_kind") is RULES[K.EXCEPTION]
    assert rule("") is RULES[K.EXCEPTION]


def test_failure_defaults_come_from_the_rule():
    assert failure("timeout", "too slow") == {
        "kind": "timeout",
        "type": "timeout",
        "message": "too slow",
        "retryable": True,
        "charge": True,
    }
    f = failure(K.PERMANENT, "never", type="Permanent", traceback="tb")
    assert f == {
        "kind": "permanent",
        "type": "Permanent",
        "message": "never",
        "retryable": False,
        "charge": True,
        "traceback": "tb",
    }
    assert type(f["kind"]) is str  # plain strings, as stored
    h = failure(K.HANDED_BACK, "stopping")
    assert (h["retryable"], h["charge"]) == (True, False)
    c = failure("cancelled", "by request")
    assert (c["retryable"], c["charge"]) == (False, False)


def test_failure_explicit_flags_win():
    f = failure(K.WORKER_LOST, "gone", retryable=False, charge=False)
    assert (f["retryable"], f["charge"]) == (False, False)
    f = failure(K.PERMANENT, "try again after all", retryable=True)
    assert f["retryable"] is True


def test_unknown_kind_is_recorded_as_given_with_the_exception_defaults():
    f = failure("my_plugin_kind", "boom")
    assert f["kind"] == f["type"] == "my_plugin_kind"
    assert (f["retryable"], f["charge"]) == (True, True)
    json.dumps(f)


def test_errors_module_still_exports_failure():
    assert errors.failure is failure


def test_docs_show_the_table():
    assert markdown_table() in DOCS.read_text()


def test_tracebacks_over_the_api_carry_no_worker_paths() -> None:
    from flowmesh.failures import public_error

    tb = (
        "Traceback (most recent call last):\n"
        '  File "/srv/flowmesh/worker/child.py", line 3, in run_one\n'
        '  File "/opt/venv/lib/python3.11/site-packages/transformers/x.py", line 9, in f\n'
        "ValueError: boom\n"
    )
    shown = public_error({"kind": "exception", "traceback": tb})["traceback"]
    assert '"worker/child.py"' in shown and '"transformers/x.py"' in shown
    assert "/srv/" not in shown and "/opt/venv" not in shown
    assert shown.endswith("ValueError: boom\n")
