"""The gateway's WebSocket protocol over real sockets: authenticate, status-sync, replay, live."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from schemas.state import replay
from services.common.auth import issue_token
from services.common.eventlog import EventLog
from services.gateway.clients import (
    CLOSE_AUTH_FAILED,
    CLOSE_LIMIT,
    CLOSE_RESTART,
    CLOSE_TOKEN_EXPIRED,
    SUBPROTOCOL,
)
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.gateway.conftest import (
    SECRET,
    connect,
    connect_stalling,
    drain,
    receive_until,
    slow_clients_closed,
    token,
)
from tests.support import cancelled, new_job, progress, wait_for


async def test_status_sync_replays_then_goes_live(gateway: Gateway, eventlog: EventLog) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(10), progress(20)])
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 1}))
        first = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        assert first[0]["type"] == "export:status-sync"
        assert first[0]["seq"] == 4
        assert [m["seq"] for m in first[1:-1]] == [2, 3, 4]
        assert first[-1]["seq"] == 4
        await eventlog.append(job_id, 4, [progress(30), cancelled()])
        live = await receive_until(ws, lambda m: m["type"] == "export:end-of-stream")
        assert [m["seq"] for m in live[:-1]] == [5, 6]
        assert live[-1]["seq"] == 6
    state = replay(await eventlog.read_stream(job_id))
    assert state is not None
    assert state.status == "cancelled"


async def test_a_reconnecting_client_misses_nothing(gateway: Gateway, eventlog: EventLog) -> None:
    job_id = await new_job(eventlog)
    seen: list[int] = []
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
        messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        seen += [m["seq"] for m in messages if m["type"].startswith("export:") and "eventId" in m]
    # Offline while the job moves on.
    await eventlog.append(job_id, 2, [progress(i) for i in range(1, 6)])
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": seen[-1]}))
        messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        sync = messages[0]
        assert sync["type"] == "export:status-sync"
        assert sync["state"]["progress"] == 5.0
        seen += [m["seq"] for m in messages if "eventId" in m]
        await eventlog.append(job_id, 7, [progress(50)])
        messages = await receive_until(ws, lambda m: m.get("seq") == 8)
        seen += [m["seq"] for m in messages if "eventId" in m]
    assert seen == list(range(1, 9))


async def test_a_user_never_receives_a_job_they_may_not_see(
    gateway: Gateway, eventlog: EventLog
) -> None:
    job_id = await new_job(eventlog, project="p1")
    async with await connect(gateway, "mallory", ("other",)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
        (error,) = await receive_until(ws, lambda m: True)
        assert error == {
            "type": "error",
            "code": "not_found",
            "message": f"no export {job_id} you may follow",
            "jobId": str(job_id),
            "request": "subscribe",
        }
        await eventlog.append(job_id, 2, [progress(1)])
        # The same answer for a job that does not exist: nothing is revealed.
        ghost = uuid.uuid4()
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(ghost)}))
        (again,) = await receive_until(ws, lambda m: True)
        assert again == {
            **error,
            "message": f"no export {ghost} you may follow",
            "jobId": str(ghost),
        }


async def test_bad_messages_get_an_error_and_the_connection_stays(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        for bad in ("not json", '{"type": "dance"}', '{"type": "subscribe", "jobId": "x"}'):
            await ws.send(bad)
            (error,) = await receive_until(ws, lambda m: True)
            assert error["type"] == "error"
            assert error["code"] == "invalid_message"
            assert error["message"]
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(uuid.uuid4()), "afterSeq": -1}))
        (error,) = await receive_until(ws, lambda m: True)
        assert "negative" in error["message"]


@pytest.mark.parametrize(
    "first",
    [
        '{"type": "subscribe", "jobId": "00000000-0000-0000-0000-000000000000"}',
        "{",
        '{"type": "auth", "token": "nope"}',
    ],
)
async def test_a_connection_must_authenticate_first(gateway: Gateway, first: str) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        await ws.send(first)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == CLOSE_AUTH_FAILED


async def test_a_client_that_falls_behind_is_told_to_resume_and_loses_nothing(
    database_url: str, eventlog: EventLog
) -> None:
    config = GatewayConfig(
        database_url=database_url,
        port=0,
        jwt_secret=SECRET,
        poll_interval=0.5,
        max_queue=8,
        send_buffer=4096,  # a stalled client fills its socket after a few kilobytes
        close_timeout=0.5,
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
        job_id = await new_job(eventlog)
        seen: list[int] = []
        async with await connect_stalling(gateway) as ws:
            await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
            messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
            seen += [m["seq"] for m in messages if "eventId" in m]
            # It stops reading while the job moves on: its socket fills, then its queue.
            seq = 2
            while slow_clients_closed(gateway) == 0:
                await eventlog.append(job_id, seq, [progress(i / 10) for i in range(20)])
                seq += 20
            await drain(ws, seen)
        assert seen == list(range(1, len(seen) + 1))
        assert len(seen) < seq
        async with await connect(gateway) as ws:
            await ws.send(
                json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": seen[-1]})
            )
            messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
            seen += [m["seq"] for m in messages if "eventId" in m]
        assert seen == list(range(1, seq + 1))
    finally:
        await gateway.close()


async def test_a_fast_client_takes_a_burst_far_larger_than_its_queue(
    database_url: str, eventlog: EventLog
) -> None:
    config = GatewayConfig(database_url=database_url, port=0, jwt_secret=SECRET, max_queue=3)
    gateway = Gateway(config)
    await gateway.start()
    try:
        job_id = await new_job(eventlog)
        async with await connect(gateway) as ws:
            await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
            await receive_until(ws, lambda m: m["type"] == "export:caught-up")
            await eventlog.append(job_id, 2, [progress(i / 10) for i in range(300)])
            live = await receive_until(ws, lambda m: m.get("seq") == 302)
        assert [m["seq"] for m in live if "eventId" in m] == list(range(3, 303))
        assert slow_clients_closed(gateway) == 0
    finally:
        await gateway.close()


async def test_a_browser_can_authenticate_with_the_subprotocol_header(
    gateway: Gateway, eventlog: EventLog
) -> None:
    job_id = await new_job(eventlog)
    async with websockets.connect(
        f"ws://127.0.0.1:{gateway.port}/ws",
        subprotocols=[Subprotocol(SUBPROTOCOL), Subprotocol(f"bearer.{token()}")],
    ) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        assert json.loads(await ws.recv())["type"] == "authenticated"
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
        messages = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        assert [m["seq"] for m in messages if "eventId" in m] == [1, 2]


async def test_an_expiring_token_closes_with_a_code_that_says_refresh(gateway: Gateway) -> None:
    short = issue_token(SECRET, "alice", projects=["p1"], ttl=1)
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        await ws.send(json.dumps({"type": "auth", "token": short}))
        seen: list[int] = []
        closed = await drain(ws, seen)
    assert closed.rcvd is not None
    assert closed.rcvd.code == CLOSE_TOKEN_EXPIRED


async def test_a_flooding_client_is_closed_with_the_limit_code(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        for _ in range(200):
            try:
                await ws.send(json.dumps({"type": "unsubscribe", "jobId": str(uuid.uuid4())}))
            except websockets.ConnectionClosed:
                break
        closed = await drain(ws, [])
    assert closed.rcvd is not None
    assert closed.rcvd.code == CLOSE_LIMIT


async def test_too_many_subscriptions_close_with_the_limit_code(
    database_url: str, eventlog: EventLog
) -> None:
    config = GatewayConfig(
        database_url=database_url, port=0, jwt_secret=SECRET, max_subscriptions=3
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        # Jobs the user may follow: subscriptions to them stay (unknown jobs would be dropped).
        jobs = [await new_job(eventlog) for _ in range(4)]
        async with await connect(gateway) as ws:
            for job_id in jobs:
                await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id)}))
            closed = await drain(ws, [])
        assert closed.rcvd is not None
        assert closed.rcvd.code == CLOSE_LIMIT
    finally:
        await gateway.close()


async def test_an_oversized_message_closes_with_1009(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": "x" * 10_000}))
        closed = await drain(ws, [])
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1009


async def test_heartbeats_and_pings_let_a_browser_see_the_server_is_alive(
    database_url: str,
) -> None:
    config = GatewayConfig(
        database_url=database_url, port=0, jwt_secret=SECRET, heartbeat_interval=0.2
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        async with await connect(gateway) as ws:
            (beat,) = await receive_until(ws, lambda m: m["type"] == "heartbeat")
            assert beat == {"type": "heartbeat", "interval": 0.2}
            await ws.send(json.dumps({"type": "ping"}))
            messages = await receive_until(ws, lambda m: m["type"] == "pong")
            assert messages[-1] == {"type": "pong"}
    finally:
        await gateway.close()


async def test_an_authenticated_connection_keeps_no_handshake_headers(
    gateway: Gateway, eventlog: EventLog
) -> None:
    """A browser's handshake brings kilobytes of headers (cookies): once the connection is
    authenticated, the gateway keeps none of them for the connection's life, and it goes on
    working, with a token offered in the headers as well as in a message."""
    job = await new_job(eventlog)
    cookie = "session=" + "c" * 4000
    async with (
        await connect(gateway) as by_message,
        websockets.connect(
            f"ws://127.0.0.1:{gateway.port}/ws",
            additional_headers={"Cookie": cookie},
            subprotocols=[Subprotocol(SUBPROTOCOL), Subprotocol(f"bearer.{token()}")],
        ) as by_header,
    ):
        assert json.loads(await by_header.recv())["type"] == "authenticated"
        await wait_for(lambda: len(gateway._clients) == 2)
        for client in gateway._clients:
            request, response = client.connection.request, client.connection.response
            assert request is not None
            assert response is not None
            assert not request.headers
            assert not response.headers
        for ws in (by_message, by_header):
            await ws.send(json.dumps({"type": "subscribe", "jobId": str(job)}))
            await receive_until(ws, lambda m: m["type"] == "export:caught-up")
            await ws.send(json.dumps({"type": "ping"}))
            await receive_until(ws, lambda m: m["type"] == "pong")


async def silent_client(gateway: Gateway) -> asyncio.StreamWriter:
    """A client that completes the handshake, authenticates and then goes silent: it never
    reads again, so it answers neither pings nor a closing handshake (a laptop shut
    mid-export)."""
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{gateway.port}/ws"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    async with asyncio.timeout(5):
        while protocol.handshake_exc is None and protocol.state is not State.OPEN:
            protocol.receive_data(await reader.read(4096))
    protocol.send_text(json.dumps({"type": "auth", "token": token()}).encode())
    writer.write(b"".join(protocol.data_to_send()))
    return writer


def open_connections(gateway: Gateway) -> int:
    server = gateway._server
    return len(server.connections) if server is not None else 0


async def test_a_dead_client_is_dropped_by_the_ping_timeout(database_url: str) -> None:
    config = GatewayConfig(database_url=database_url, port=0, jwt_secret=SECRET, ping_interval=0.3)
    gateway = Gateway(config)
    await gateway.start()
    try:
        writer = await silent_client(gateway)
        await wait_for(lambda: open_connections(gateway) == 1)
        # Within two ping intervals the server gives up on it and frees the connection.
        await wait_for(lambda: open_connections(gateway) == 0, timeout=5)
        writer.close()
    finally:
        await gateway.close()


async def test_shutdown_closes_clients_with_1012_within_the_close_timeout(
    database_url: str, eventlog: EventLog
) -> None:
    config = GatewayConfig(database_url=database_url, port=0, jwt_secret=SECRET, close_timeout=0.5)
    gateway = Gateway(config)
    await gateway.start()
    job_id = await new_job(eventlog)
    silent = [await silent_client(gateway) for _ in range(3)]
    live = [await connect(gateway) for _ in range(3)]
    for ws in live:
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id)}))
        await receive_until(ws, lambda m: m["type"] == "export:caught-up")
    await wait_for(lambda: open_connections(gateway) == 6)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(gateway.close(), 10)
    # The silent clients never answer the closing handshake: the close timeout bounds it.
    assert loop.time() - began < 3
    for ws in live:
        closed = await drain(ws, [])
        assert closed.rcvd is not None
        assert closed.rcvd.code == CLOSE_RESTART
    for writer in silent:
        writer.close()
