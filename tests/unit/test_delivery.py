"""Inbox entries as the worker reads them, including ones placed by an older orchestrator."""

from __future__ import annotations

import json

from flowmesh.store import Delivery


def test_entry_with_type_and_timeout_fields():
    spec = json.dumps({"spec": {"taskType": "echo", "timeoutSec": 9}})
    d = Delivery.from_entry(
        "1-0",
        {"task_id": "t", "attempt": "2", "task_type": "echo", "timeout_sec": "2.5", "spec": spec},
    )
    assert (d.task_id, d.attempt, d.task_type, d.timeout, d.spec) == ("t", 2, "echo", 2.5, spec)


def test_entry_without_a_timeout_has_none():
    d = Delivery.from_entry(
        "1-0",
        {"task_id": "t", "attempt": "1", "task_type": "echo", "timeout_sec": "", "spec": "{}"},
    )
    assert d.timeout is None


def test_entry_from_an_older_orchestrator_reads_type_and_timeout_from_the_spec():
    spec = json.dumps({"spec": {"taskType": "inference", "timeoutSec": 30.0}})
    d = Delivery.from_entry("1-0", {"task_id": "t", "attempt": "1", "spec": spec})
    assert (d.task_type, d.timeout) == ("inference", 30.0)
