"""Project and whole-log subscriptions by log position, over real sockets."""

from __future__ import annotations

import json
from typing import Any

from services.common.eventlog import EventLog
from services.gateway.server import Gateway
from tests.gateway.conftest import connect, receive_until
from tests.support import new_job, progress


def events_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if "eventId" in m]


async def log_positions(eventlog: EventLog, project: str | None = None) -> list[int]:
    events = await eventlog.tail(0, 10_000)
    return [e.position for e in events if project is None or e.project_id == project]


async def test_a_project_stream_syncs_replays_by_position_then_goes_live(
    gateway: Gateway, eventlog: EventLog
) -> None:
    mine = await new_job(eventlog, project="p1")
    other = await new_job(eventlog, project="p2")
    await eventlog.append(mine, 2, [progress(10)])
    await eventlog.append(other, 2, [progress(10)])
    head = (await log_positions(eventlog))[-1]
    async with await connect(gateway, projects=("p1",)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p1", "afterPosition": 0}))
        messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        sync = messages[0]
        assert sync["type"] == "export:status-sync"
        assert sync["projectId"] == "p1"
        assert sync["position"] == head
        assert [job["jobId"] for job in sync["jobs"]] == [str(mine)]
        assert sync["jobs"][0]["seq"] == 3
        replayed = events_of(messages)
        assert [e["position"] for e in replayed] == await log_positions(eventlog, "p1")
        assert {e["projectId"] for e in replayed} == {"p1"}
        assert messages[-1] == {"type": "export:caught-up", "projectId": "p1", "position": head}

        await eventlog.append(other, 3, [progress(20)])
        await eventlog.append(mine, 3, [progress(20)])
        live = await receive_until(ws, lambda m: "eventId" in m)
        assert [(e["jobId"], e["seq"]) for e in events_of(live)] == [(str(mine), 4)]


async def test_a_project_stream_resumes_after_the_last_position_seen(
    gateway: Gateway, eventlog: EventLog
) -> None:
    job = await new_job(eventlog, project="p1")
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p1"}))
        messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        assert events_of(messages) == []  # no cursor: the state only
        cursor = messages[-1]["position"]
    # Offline while two projects move on.
    await eventlog.append(job, 2, [progress(i) for i in range(1, 6)])
    await new_job(eventlog, project="p2")
    second = await new_job(eventlog, project="p1")
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p1", "afterPosition": cursor}))
        messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        missed = [(e["jobId"], e["seq"]) for e in events_of(messages)]
        assert missed == [(str(job), seq) for seq in range(3, 8)] + [
            (str(second), 1),
            (str(second), 2),
        ]


async def test_the_whole_log_is_for_services_and_auditors(
    gateway: Gateway, eventlog: EventLog
) -> None:
    await new_job(eventlog, project="p1")
    await new_job(eventlog, project="p2")
    async with await connect(gateway, projects=("*",)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "log": True, "afterPosition": 0}))
        [error] = await receive_until(ws, lambda m: m["type"] == "error")
        assert error["code"] == "forbidden"
    for role in ("service", "auditor"):
        async with await connect(gateway, user="svc", projects=(), roles=(role,)) as ws:
            await ws.send(json.dumps({"type": "subscribe", "log": True, "afterPosition": 1}))
            messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
            assert messages[0]["type"] == "export:status-sync"
            assert messages[0]["log"] is True
            assert "jobs" not in messages[0]
            positions = [e["position"] for e in events_of(messages)]
            assert positions == (await log_positions(eventlog))[1:]
            assert messages[-1]["log"] is True


async def test_a_project_the_token_does_not_cover_sends_nothing(
    gateway: Gateway, eventlog: EventLog
) -> None:
    job = await new_job(eventlog, project="p2")
    async with await connect(gateway, projects=("p1",)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p2", "afterPosition": 0}))
        await eventlog.append(job, 2, [progress(10)])
        await ws.send(json.dumps({"type": "ping"}))
        messages = await receive_until(ws, lambda m: m["type"] == "pong")
        assert [m["type"] for m in messages] == ["error", "pong"]
        assert messages[0]["code"] == "forbidden"


async def test_malformed_subscriptions_are_answered_and_the_connection_stays(
    gateway: Gateway,
) -> None:
    bad = [
        ({"type": "subscribe"}, "exactly one"),
        ({"type": "subscribe", "projectId": "p1", "log": True}, "exactly one"),
        ({"type": "subscribe", "projectId": "p1", "afterSeq": 3}, "afterPosition"),
        ({"type": "subscribe", "log": True, "afterSeq": 3}, "afterPosition"),
        (
            {
                "type": "subscribe",
                "jobId": "00000000-0000-0000-0000-000000000001",
                "afterPosition": 1,
            },
            "afterSeq",
        ),
        ({"type": "subscribe", "projectId": "p1", "afterPosition": -1}, "negative"),
        ({"type": "subscribe", "projectId": ""}, "empty"),
        ({"type": "unsubscribe", "projectId": "p1"}, "not following"),
    ]
    async with await connect(gateway) as ws:
        for message, reason in bad:
            await ws.send(json.dumps(message))
            [error] = await receive_until(ws, lambda m: m["type"] == "error")
            assert reason in error["message"], (message, error)
        await ws.send(json.dumps({"type": "ping"}))
        assert (await receive_until(ws, lambda m: True))[0]["type"] == "pong"


async def test_unsubscribing_a_project_stops_its_events(
    gateway: Gateway, eventlog: EventLog
) -> None:
    job = await new_job(eventlog, project="p1")
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p1"}))
        await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        await ws.send(json.dumps({"type": "unsubscribe", "projectId": "p1"}))
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job)}))
        await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        await eventlog.append(job, 2, [progress(50)])
        live = await receive_until(ws, lambda m: "eventId" in m)
        assert len(events_of(live)) == 1
        await ws.send(json.dumps({"type": "ping"}))
        rest = await receive_until(ws, lambda m: m["type"] == "pong")
        assert events_of(rest) == []  # the event came once: the project stream is gone


async def test_an_auditors_subscriptions_are_recorded(gateway: Gateway, eventlog: EventLog) -> None:
    await new_job(eventlog, project="p1")
    async with await connect(gateway, user="audra", projects=(), roles=("auditor",)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p1", "afterPosition": 0}))
        await receive_until(ws, lambda m: m["type"] == "export:caught-up")
    async with await connect(gateway) as ws:  # an ordinary user: not recorded
        await ws.send(json.dumps({"type": "subscribe", "projectId": "p1"}))
        await receive_until(ws, lambda m: m["type"] == "export:caught-up")
    async with eventlog.pool.acquire() as conn:
        rows = await conn.fetch("SELECT auditor, method, filters FROM audit_reads")
    assert [(r["auditor"], r["method"]) for r in rows] == [("audra", "SUBSCRIBE")]
    assert json.loads(rows[0]["filters"]) == {"projectId": ["p1"], "after": ["0"]}
