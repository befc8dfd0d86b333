"""Cancel over the socket: the gateway forwards it to the export API as the user, answers with
export:cancel-ack, and the cancelled event arrives through the subscription like any other."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from schemas.events import Cancelled, decode_event
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.export.conftest import SECRET, Client, ClientFactory, auth, token
from tests.support import unpack, wait_for


@pytest.fixture
async def api(make_client: ClientFactory) -> Client:
    return await make_client(workers=0)  # nothing runs: jobs stay queued until cancelled


@pytest.fixture
async def gateway(database_url: str, api: Client) -> AsyncIterator[Gateway]:
    config = GatewayConfig(
        database_url=database_url,
        port=0,
        jwt_secret=SECRET,
        export_url=str(api.make_url("")),
        poll_interval=0.5,
    )
    gateway = Gateway(config)
    await gateway.start()
    await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
    try:
        yield gateway
    finally:
        await gateway.close()


async def next_message(ws: Any, wanted: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            for message in unpack(json.loads(await ws.recv())):
                if message["type"] == wanted:
                    return message


async def messages_until(ws: Any, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The first message of each wanted type, in whatever order they come."""
    found: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(10):
        while not wanted <= found.keys():
            for message in unpack(json.loads(await ws.recv())):
                if message["type"] in wanted:
                    found.setdefault(message["type"], message)
    return found


async def test_a_cancel_over_the_socket_is_acknowledged_and_then_seen(
    api: Client, gateway: Gateway
) -> None:
    started = await api.post("/projects/demo/export", headers=auth())
    job_id = (await started.json())["jobId"]
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        await ws.send(json.dumps({"type": "auth", "token": token()}))
        await ws.send(json.dumps({"type": "subscribe", "jobId": job_id, "afterSeq": 0}))
        await next_message(ws, "export:caught-up")
        await ws.send(json.dumps({"type": "export:cancel", "jobId": job_id}))
        # The ack (after the export service's answer) and the events (through the log) race:
        # either may come first.
        seen = await messages_until(
            ws, {"export:cancel-ack", "export:cancelled", "export:end-of-stream"}
        )
        ack = seen["export:cancel-ack"]
        assert ack == {"type": "export:cancel-ack", "jobId": job_id, "accepted": True, "seq": 2}
        cancelled = seen["export:cancelled"]
        assert cancelled["seq"] == 3
        event = decode_event(json.dumps(cancelled))
        assert isinstance(event.data, Cancelled)
        assert event.data.cancelled_by == "user"
        assert seen["export:end-of-stream"]["seq"] == 3

        # Once it has ended, a second cancel is refused with the outcome.
        await ws.send(json.dumps({"type": "export:cancel", "jobId": job_id}))
        again = await next_message(ws, "export:cancel-ack")
        assert again["accepted"] is False
        assert again["outcome"] == "cancelled"


async def test_a_cancel_of_someone_elses_export_is_refused(api: Client, gateway: Gateway) -> None:
    started = await api.post("/projects/demo/export", headers=auth())
    job_id = (await started.json())["jobId"]
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        await ws.send(json.dumps({"type": "auth", "token": token("mallory", ("other",))}))
        await ws.send(json.dumps({"type": "export:cancel", "jobId": job_id}))
        error = await next_message(ws, "error")
        assert error["code"] == "not_found"
    status = await api.get(f"/projects/demo/export/{job_id}/status", headers=auth())
    assert (await status.json())["state"]["status"] == "queued"
