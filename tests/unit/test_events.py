"""Event types: every type the Lua steps write is an EventType, and add_event queues
one trimmed XADD."""

from __future__ import annotations

import asyncio
import re
from importlib import resources

import redis
import redis.asyncio

from flowmesh import store
from flowmesh.events import EVENTS_MAXLEN, EventType, add_event
from flowmesh.keys import Keys

LUA = resources.files("flowmesh").joinpath("lua")
# `'type', 'task.started'` in an XADD, and `event('task.finished', ...)` (settle.lua's helper).
TYPE_LITERAL = re.compile(r"'type',\s*'([^']+)'")
EVENT_CALL = re.compile(r"\bevent\(\s*'([^']+)'")


def lua_event_types() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in LUA.iterdir():
        if path.name.endswith(".lua"):
            text = path.read_text()
            types = set(TYPE_LITERAL.findall(text)) | set(EVENT_CALL.findall(text))
            if types:
                found[path.name] = types
    return found


def test_every_lua_event_type_is_an_event_type():
    found = lua_event_types()
    assert found, "no event types found in flowmesh/lua/*.lua"
    values = {e.value for e in EventType}
    for name, types in found.items():
        assert types <= values, (name, types - values)


def test_every_task_event_type_is_written_by_a_lua_step():
    written = set().union(*lua_event_types().values())
    assert {e.value for e in EventType if e.value.startswith("task.")} <= written


def test_lua_steps_that_write_events_name_the_list():
    for name in lua_event_types():
        assert "flowmesh/events.py" in LUA.joinpath(name).read_text(), name


def queued(pipe) -> list[list[str]]:
    def text(a: object) -> str:
        return a.decode() if isinstance(a, bytes) else str(a)

    return [[text(a) for a in command[0]] for command in pipe.command_stack]


def test_add_event_queues_one_trimmed_xadd_on_sync_and_async_pipelines():
    # Never executed: no server needed.
    for pipe in (
        redis.Redis().pipeline(transaction=False),
        redis.asyncio.Redis().pipeline(transaction=True),
    ):
        add_event(pipe, Keys("p:"), EventType.WORKER_READY, worker_id="w1")
        xadd = ["XADD", "p:events", "MAXLEN", "~", str(EVENTS_MAXLEN), "*"]
        assert queued(pipe) == [[*xadd, "type", "worker.ready", "worker_id", "w1"]]


def test_events_maxlen_still_importable_from_the_store():
    assert store.EVENTS_MAXLEN == EVENTS_MAXLEN


def test_the_orchestrator_refreshes_its_fleet_on_worker_events():
    from orchestrator.fleet import Fleet

    async def scenario(event_type: str) -> bool:
        conn = redis.asyncio.Redis()  # never reached: handling events calls no Redis
        fleet = Fleet(conn, Keys())
        fleet._refresh_now = False
        await fleet._handle_events([("1-0", {"type": event_type, "worker_id": "w1"})])
        return fleet._refresh_now

    for event_type in EventType:
        if event_type.value.startswith("worker."):
            assert asyncio.run(scenario(event_type.value)), event_type
