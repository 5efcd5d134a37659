"""Inbox entries as the worker reads them, including ones placed by an older orchestrator."""

from __future__ import annotations

import json

from flowmesh.store import Delivery


def test_entry_with_type_and_timeout_fields():
    spec = json.dumps({"spec": {"taskType": "echo", "timeoutSec": 9}})
    [d] = Delivery.from_entry(
        "1-0",
        {"task_id": "t", "attempt": "2", "task_type": "echo", "timeout_sec": "2.5", "spec": spec},
    )
    assert (d.task_id, d.attempt, d.task_type, d.timeout, d.spec) == ("t", 2, "echo", 2.5, spec)


def test_entry_without_a_timeout_has_none():
    [d] = Delivery.from_entry(
        "1-0",
        {"task_id": "t", "attempt": "1", "task_type": "echo", "timeout_sec": "", "spec": "{}"},
    )
    assert d.timeout is None


def test_entry_from_an_older_orchestrator_reads_type_and_timeout_from_the_spec():
    spec = json.dumps({"spec": {"taskType": "inference", "timeoutSec": 30.0}})
    [d] = Delivery.from_entry("1-0", {"task_id": "t", "attempt": "1", "spec": spec})
    assert (d.task_type, d.timeout) == ("inference", 30.0)


def test_merged_entry_is_one_delivery_per_child_sharing_the_entry():
    children = [
        {"task_id": "a", "attempt": "1", "spec": "{}", "timeout_sec": "", "identity": "x"},
        {
            "task_id": "b",
            "attempt": "3",
            "spec": "{}",
            "timeout_sec": "7",
            "identity": "",
            "created_at": "100.5",
        },
    ]
    fields = {
        "task_id": "a",
        "attempt": "1",
        "task_type": "vllm",
        "spec": "{}",
        "merge_children": json.dumps(children),
    }
    a, b = Delivery.from_entry("5-0", fields)
    assert (a.task_id, a.attempt, a.identity, a.timeout) == ("a", 1, "x", None)
    assert (b.task_id, b.attempt, b.timeout, b.created_at) == ("b", 3, 7.0, 100.5)
    assert a.stream_id == b.stream_id == "5-0" and a.group == b.group == ("a", "b")
    assert a.task_type == b.task_type == "vllm"
