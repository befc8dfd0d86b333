"""The gateway under test, on a free port, and a test client's helpers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from schemas.events import Event
from services.common.auth import issue_token
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from services.gateway.subscription import Action, Send, SendPage
from tests.support import unpack, wait_for

SECRET = "gateway-test-secret-long-enough-for-hs256"


def token(
    user: str = "alice", projects: tuple[str, ...] = ("p1",), roles: tuple[str, ...] = ("user",)
) -> str:
    return issue_token(SECRET, user, projects=projects, roles=roles)


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[Gateway]:
    config = GatewayConfig(
        database_url=database_url, port=0, jwt_secret=SECRET, poll_interval=0.5, max_queue=1000
    )
    gateway = Gateway(config)
    await gateway.start()
    await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
    try:
        yield gateway
    finally:
        await gateway.close()


async def connect(
    gateway: Gateway,
    user: str = "alice",
    projects: tuple[str, ...] = ("p1",),
    roles: tuple[str, ...] = ("user",),
) -> ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws")
    await ws.send(json.dumps({"type": "auth", "token": token(user, projects, roles)}))
    assert json.loads(await ws.recv())["type"] == "authenticated"
    return ws


async def receive_until(
    ws: ClientConnection, done: Any, timeout: float = 10
) -> list[dict[str, Any]]:
    """Messages until `done(message)` holds for one (included)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            for message in unpack(json.loads(await ws.recv())):
                messages.append(message)
                if done(message):
                    return messages


async def drain(ws: ClientConnection, seen: list[int]) -> websockets.ConnectionClosed:
    """Read event seqs into `seen` until the server closes (within 15 s); the close."""
    async with asyncio.timeout(15):
        while True:
            try:
                messages = unpack(json.loads(await ws.recv()))
            except websockets.ConnectionClosed as closed:
                return closed
            seen += [message["seq"] for message in messages if "eventId" in message]


async def connect_stalling(gateway: Gateway, user: str = "alice") -> ClientConnection:
    """A client that reads only when the test says so: a small receive buffer, and no messages
    buffered ahead, so that the gateway sees a full socket soon after it stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    ws = await websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws", sock=sock, max_queue=1)
    await ws.send(json.dumps({"type": "auth", "token": token(user)}))
    assert json.loads(await ws.recv())["type"] == "authenticated"
    return ws


def events_sent(actions: Sequence[Action]) -> list[Event]:
    """The events a subscription's actions send, live (one by one) or replayed (by pages)."""
    events: list[Event] = []
    for action in actions:
        if isinstance(action, Send):
            events.append(action.event)
        elif isinstance(action, SendPage):
            events += action.events
    return events


def slow_clients_closed(gateway: Gateway) -> float:
    """How many clients the gateway has closed for falling behind (its metric)."""
    value = gateway.registry.get_sample_value("gateway_slow_clients_closed_total")
    return value or 0.0
