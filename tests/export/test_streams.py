"""Server-Sent Events streams of a project or the log, and durable consumers, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from services.common.eventlog import EventLog
from services.export.keys import EVENTLOG, STREAMS
from tests.export.conftest import Client, ClientFactory, auth, token
from tests.support import new_job, progress, wait_for


@dataclass
class Message:
    id: int | None
    event: str
    data: dict[str, Any]


async def messages(response: aiohttp.ClientResponse) -> AsyncIterator[Message]:
    """Parse an SSE body as it arrives (comments and `retry:` skipped)."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line == "":
            if "data" in fields:
                yield Message(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


async def take(response: aiohttp.ClientResponse, until: str, timeout: float = 10) -> list[Message]:
    """Messages up to and including the first whose event is `until`."""
    taken: list[Message] = []
    async with asyncio.timeout(timeout):
        async for message in messages(response):
            taken.append(message)
            if message.event == until:
                return taken
    raise AssertionError(f"the stream ended before {until}: {taken}")


@pytest.fixture
async def api(make_client: ClientFactory) -> Client:
    client = await make_client(workers=0)
    await wait_for(lambda: client.app[STREAMS].tailer.listening)
    return client


def service(user: str = "svc") -> dict[str, str]:
    return auth(user, (), roles=["service"])


async def test_a_project_stream_replays_from_last_event_id_then_goes_live(api: Client) -> None:
    log: EventLog = api.app[EVENTLOG]
    mine = await new_job(log, project="demo")
    await new_job(log, project="big")
    await log.append(mine, 2, [progress(10)])
    positions = [e.position for e in await log.tail(0, 100) if e.project_id == "demo"]

    response = await api.get("/v1/stream?projectId=demo&after=0", headers=auth())
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    first = await take(response, "caught-up")
    assert first[0].event == "status-sync"
    assert first[0].id is None
    events = [m for m in first if m.event.startswith("export:")]
    assert [m.id for m in events] == positions
    assert [m.data["seq"] for m in events] == [1, 2, 3]
    assert all(m.data["projectId"] == "demo" for m in events)
    head = first[-1].id
    assert head is not None
    assert head >= positions[-1]

    await log.append(mine, 3, [progress(20)])
    live = await take(response, "export:progress")
    assert live[-1].data["seq"] == 4
    last_id = live[-1].id
    response.close()

    # Offline: two more events; an EventSource reconnects with Last-Event-ID.
    await log.append(mine, 4, [progress(30), progress(40)])
    again = await api.get(
        "/v1/stream?projectId=demo", headers={**auth(), "Last-Event-ID": str(last_id)}
    )
    resumed = await take(again, "caught-up")
    assert [m.data["seq"] for m in resumed if m.event.startswith("export:")] == [5, 6]
    again.close()


async def test_the_whole_log_is_for_services_and_auditors(api: Client) -> None:
    log: EventLog = api.app[EVENTLOG]
    await new_job(log, project="demo")
    await new_job(log, project="big")
    refused = await api.get("/v1/stream", headers=auth())
    assert refused.status == 403
    assert "service or auditor" in (await refused.json())["error"]["message"]
    other = await api.get("/v1/stream?projectId=elsewhere", headers=auth())
    assert other.status == 403
    response = await api.get("/v1/stream?after=0", headers=service())
    taken = await take(response, "caught-up")
    assert [m.id for m in taken if m.event.startswith("export:")] == [
        e.position for e in await log.tail(0, 100)
    ]
    response.close()


@pytest.mark.parametrize(
    ("query", "headers", "reason"),
    [
        ("?projectId=demo&after=x", {}, "after must be"),
        ("?projectId=demo", {"Last-Event-ID": "-4"}, "cannot be negative"),
        ("?projectId=../etc", {}, "projectId"),
        ("?projectId=demo&consumer=no%20spaces", {}, "consumer"),
        ("?projectId=demo&consumer=unknown", {}, "no consumer"),
    ],
)
async def test_bad_stream_requests_are_refused_with_a_reason(
    api: Client, query: str, headers: dict[str, str], reason: str
) -> None:
    response = await api.get(f"/v1/stream{query}", headers={**auth(), **headers})
    assert 400 <= response.status < 500
    assert reason in (await response.json())["error"]["message"]


async def test_a_durable_consumer_resumes_after_its_last_acknowledged_position(
    api: Client,
) -> None:
    log: EventLog = api.app[EVENTLOG]
    job = await new_job(log, project="demo")
    created = await api.put("/v1/consumers/billing", json={"projectId": "demo"}, headers=auth())
    assert created.status == 201
    assert (await created.json())["position"] == 0
    same = await api.put("/v1/consumers/billing", json={"projectId": "demo"}, headers=auth())
    assert same.status == 200

    response = await api.get("/v1/stream?projectId=demo&consumer=billing", headers=auth())
    taken = await take(response, "caught-up")
    seen = [m for m in taken if m.event.startswith("export:")]
    assert [m.data["seq"] for m in seen] == [1, 2]
    response.close()
    acked = await api.post(
        "/v1/consumers/billing/ack", json={"position": seen[0].id}, headers=auth()
    )
    assert (await acked.json())["position"] == seen[0].id
    # A late ack of an older position changes nothing; positions never go back.
    await api.post("/v1/consumers/billing/ack", json={"position": 0}, headers=auth())
    state = await (await api.get("/v1/consumers/billing", headers=auth())).json()
    assert state["position"] == seen[0].id
    assert state["acks"] == 2

    await log.append(job, 2, [progress(50)])
    response = await api.get("/v1/stream?projectId=demo&consumer=billing", headers=auth())
    taken = await take(response, "caught-up")
    # At least once: the unacknowledged event comes again, then what is new.
    assert [m.data["seq"] for m in taken if m.event.startswith("export:")] == [2, 3]
    response.close()


async def test_consumers_are_private_and_validated(api: Client) -> None:
    headers = auth()
    bad_name = await api.put("/v1/consumers/-x", json={}, headers=headers)
    assert bad_name.status == 400
    whole_log = await api.put("/v1/consumers/all", json={}, headers=headers)
    assert whole_log.status == 403
    unknown_field = await api.put("/v1/consumers/c1", json={"project": "demo"}, headers=headers)
    assert unknown_field.status == 422
    await api.put("/v1/consumers/c1", json={"projectId": "demo"}, headers=headers)
    other_stream = await api.put("/v1/consumers/c1", json={"projectId": "big"}, headers=headers)
    assert other_stream.status == 409
    # Another user neither sees nor takes it.
    bob = auth("bob")
    assert (await api.get("/v1/consumers/c1", headers=bob)).status == 404
    assert (
        await api.put("/v1/consumers/c1", json={"projectId": "demo"}, headers=bob)
    ).status == 409
    assert (await api.delete("/v1/consumers/c1", headers=bob)).status == 404
    beyond = await api.post("/v1/consumers/c1/ack", json={"position": 10**9}, headers=headers)
    assert beyond.status == 422
    assert "beyond the log's head" in (await beyond.json())["error"]["message"]
    negative = await api.post("/v1/consumers/c1/ack", json={"position": -1}, headers=headers)
    assert negative.status == 422
    assert (await api.delete("/v1/consumers/c1", headers=headers)).status == 204
    assert (await api.get("/v1/consumers/c1", headers=headers)).status == 404


async def test_a_stream_that_cannot_keep_up_ends_and_resumes_without_loss(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.export import streams

    monkeypatch.setattr(streams, "SSE_QUEUE", 5)
    log: EventLog = api.app[EVENTLOG]
    job = await new_job(log, project="demo")
    response = await api.get("/v1/stream?projectId=demo&after=0", headers=auth())
    seen = [m for m in await take(response, "caught-up") if m.event.startswith("export:")]
    # A burst far larger than its queue, in one read of the tailer.
    await log.append(job, 2, [progress(i / 10) for i in range(40)])
    async with asyncio.timeout(10):
        async for message in messages(response):
            if message.event.startswith("export:"):
                seen.append(message)
    assert len(seen) < 42  # it was cut off
    again = await api.get(
        "/v1/stream?projectId=demo", headers={**auth(), "Last-Event-ID": str(seen[-1].id)}
    )
    seen += [m for m in await take(again, "caught-up") if m.event.startswith("export:")]
    again.close()
    assert [m.data["seq"] for m in seen] == list(range(1, 43))


async def test_concurrent_creations_of_one_consumer_all_succeed(api: Client) -> None:
    for round_ in range(5):
        answers = await asyncio.gather(
            *(
                api.put(f"/v1/consumers/race-{round_}", json={"projectId": "demo"}, headers=auth())
                for _ in range(8)
            )
        )
        assert sorted(a.status for a in answers) == [200] * 7 + [201]


async def test_a_stream_ends_when_its_token_expires(api: Client) -> None:
    short = {"Authorization": f"Bearer {token(ttl=1)}"}
    response = await api.get("/v1/stream?projectId=demo", headers=short)
    await take(response, "caught-up")
    async with asyncio.timeout(10):
        async for _ in messages(response):
            pass  # the stream ends by itself once the token has expired
    assert response.content.at_eof()


async def test_a_client_that_stops_reading_is_cut_off(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.export import streams

    monkeypatch.setattr(streams, "SSE_WRITE_TIMEOUT", 0.5)
    log: EventLog = api.app[EVENTLOG]
    jobs = [await new_job(log, project="demo") for _ in range(20)]
    for job in jobs:
        await log.append(job, 2, [progress(i / 100) for i in range(500)])
    # A raw client with a small receive buffer that asks for the whole replay and reads nothing.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", api.port))
    request = (
        "GET /v1/stream?projectId=demo&after=0 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token()}\r\n\r\n"
    )
    await asyncio.get_running_loop().sock_sendall(sock, request.encode())
    hub = api.app[STREAMS]
    await wait_for(lambda: bool(hub._followers), timeout=10)
    await wait_for(lambda: not hub._followers, timeout=30)
    sock.close()
