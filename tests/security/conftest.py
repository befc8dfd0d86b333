"""An export service and a gateway that forwards cancels to it, on real sockets, and the
helpers of a WebSocket client that expects to be refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from services.gateway.clients import SUBPROTOCOL
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.export.conftest import (
    SECRET,
    Client,
    ClientFactory,
    demo_projects,
    export_config,
    make_client,
)
from tests.support import unpack, wait_for

__all__ = ["demo_projects", "export_config", "make_client"]


@pytest.fixture
async def api(make_client: ClientFactory) -> Client:
    return await make_client(workers=0)  # nothing runs: exports stay queued until cancelled


@contextlib.asynccontextmanager
async def running_gateway(database_url: str, api: Client, **changes: Any) -> AsyncIterator[Gateway]:
    """A gateway on a free port that forwards cancels to `api`."""
    config = GatewayConfig(
        database_url=database_url,
        port=0,
        jwt_secret=SECRET,
        export_url=str(api.make_url("")),
        poll_interval=0.5,
        **changes,
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
        yield gateway
    finally:
        await gateway.close()


@pytest.fixture
async def gateway(database_url: str, api: Client) -> AsyncIterator[Gateway]:
    async with running_gateway(database_url, api) as gateway:
        yield gateway


class Refused(Exception):
    """The gateway closed the connection instead of accepting it."""

    def __init__(self, code: int | None, messages: list[dict[str, Any]]) -> None:
        super().__init__(f"closed with {code} after {messages}")
        self.code = code
        self.messages = messages


async def open_socket(
    gateway: Gateway, token: str, *, subprotocol: bool = False
) -> ClientConnection:
    """An authenticated connection (by an `auth` message, or by the subprotocols a browser
    offers); `Refused` with the close code when the gateway closes it instead."""
    url = f"ws://127.0.0.1:{gateway.port}/ws"
    if subprotocol:
        offered = [Subprotocol(SUBPROTOCOL), Subprotocol(f"bearer.{token}")]
        ws = await websockets.connect(url, subprotocols=offered)
    else:
        ws = await websockets.connect(url)
        await ws.send(json.dumps({"type": "auth", "token": token}))
    try:
        async with asyncio.timeout(10):
            first = json.loads(await ws.recv())
    except websockets.ConnectionClosed as closed:
        raise Refused(closed.rcvd.code if closed.rcvd else None, []) from None
    if first != {"type": "authenticated", "user": first.get("user")}:
        await ws.close()
        raise AssertionError(f"expected `authenticated` first, got {first}")
    return ws


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the gateway closes the connection (within 10 s); its close code."""
    async with asyncio.timeout(10):
        while True:
            try:
                await ws.recv()
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None


async def until_pong(ws: ClientConnection) -> list[dict[str, Any]]:
    """Ping, and every message that arrives before the pong (the answers to what was sent
    before the ping that have no read to wait for)."""
    await ws.send(json.dumps({"type": "ping"}))
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while True:
            for message in unpack(json.loads(await ws.recv())):
                if message["type"] == "pong":
                    return seen
                seen.append(message)


async def answer_to(
    ws: ClientConnection, message: dict[str, Any], wanted: set[str]
) -> dict[str, Any]:
    """Send `message`; the first message back whose type is in `wanted` (10 s at most)."""
    await ws.send(json.dumps(message))
    async with asyncio.timeout(10):
        while True:
            for received in unpack(json.loads(await ws.recv())):
                if received["type"] in wanted:
                    return received
