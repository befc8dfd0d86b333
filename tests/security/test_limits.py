"""The limits on what clients send that tests/gateway does not already check, each at its edge:
the HTTP request body, the request line, text the database cannot store, and the connections
of one user to a gateway. (Message size, message rate and subscriptions per connection are in
tests/gateway/test_protocol.py.)"""

from __future__ import annotations

import json
import logging

import asyncpg
import pytest
import websockets

from services.export.openapi import build_openapi
from services.gateway.clients import CLOSE_LIMIT
from services.gateway.server import Gateway
from tests.export.conftest import Client, auth, token
from tests.security.conftest import Refused, close_code, open_socket, running_gateway
from tests.support import wait_for

MAX_BODY = 1024 * 1024
"""1 MiB, as README.md and deploy/CONFIGURATION.md say."""
MAX_LINE = 8190


def _padded(body: bytes, size: int) -> bytes:
    """`body` after enough spaces to make `size` bytes (JSON allows leading white space)."""
    return b" " * (size - len(body)) + body


@pytest.mark.parametrize(
    ("method", "path", "body", "accepted"),
    [
        ("POST", "/projects/demo/export", b"{}", 202),
        ("PUT", "/v1/consumers/padded", b'{"projectId": "demo"}', 201),
        ("POST", "/v1/consumers/padded/ack", b'{"position": 0}', 200),
    ],
)
async def test_a_body_over_one_mebibyte_is_refused_with_413(
    api: Client, method: str, path: str, body: bytes, accepted: int
) -> None:
    headers = {**auth(), "Content-Type": "application/json"}
    if path.endswith("/ack"):
        created = await api.put("/v1/consumers/padded", headers=auth(), json={"projectId": "demo"})
        assert created.status == 201
    response = await api.request(method, path, headers=headers, data=_padded(body, MAX_BODY + 1))
    assert response.status == 413, await response.text()
    assert (await response.json())["error"]["code"] == "too_large"
    # At the limit, the same body is read.
    response = await api.request(method, path, headers=headers, data=_padded(body, MAX_BODY))
    assert response.status == accepted, await response.text()


def test_every_operation_that_reads_a_body_documents_413() -> None:
    operations = [
        (path, method, operation)
        for path, item in build_openapi()["paths"].items()
        for method, operation in item.items()
        if "requestBody" in operation
    ]
    assert len(operations) == 3
    for path, method, operation in operations:
        assert "413" in operation["responses"], (method, path)
        assert f"{MAX_BODY} bytes" in operation["responses"]["413"]["description"]


async def test_a_request_line_over_8190_bytes_is_refused_before_any_route(
    api: Client, caplog: pytest.LogCaptureFixture
) -> None:
    base = "/projects/demo/export/history?limit=5&pad="
    fits = base + "x" * (MAX_LINE - len(base) - len("GET  HTTP/1.1") - 10)
    response = await api.get(fits, headers=auth())
    assert response.status == 200
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        response = await api.get(base + "x" * MAX_LINE, headers=auth())
    assert response.status == 400
    assert response.content_type == "text/plain"
    # The client's mistake, not the server's: one line at INFO with the reason, no traceback.
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [(r.levelname, r.exc_info) for r in logged] == [("INFO", None)], logged
    assert "400" in logged[0].getMessage()
    assert "8190 bytes" in logged[0].getMessage(), logged[0].getMessage()
    documented = build_openapi()["paths"]["/projects/{project_id}/export/history"]["get"]
    assert "text/plain" in documented["responses"]["400"]["content"]


@pytest.mark.parametrize(
    "url",
    [
        "/projects/demo/export/history?cursor=%00",
        "/v1/audit/events?actor=user%00alice",
        "/v1/audit/events?%00=1",
        "/projects/de%00mo/export/history",
    ],
)
async def test_a_nul_character_in_the_path_or_query_is_a_bad_request(
    api: Client, pool: asyncpg.Pool, url: str
) -> None:
    """PostgreSQL cannot store a NUL in text: an auditor's read, recorded before it is served,
    was refused with a 503 that no retry could cure. Now it is a 400, for every caller."""
    for headers in (auth(), auth("audra", (), roles=("auditor",))):
        response = await api.get(url, headers=headers)
        assert response.status == 400, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "bad_request"
        assert "NUL" in error["message"]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_reads") == 0


async def test_connections_beyond_the_per_user_limit_are_closed_with_4029(
    api: Client, database_url: str
) -> None:
    async with running_gateway(database_url, api, max_connections_per_user=2) as gateway:
        first = await open_socket(gateway, token("alice"))
        second = await open_socket(gateway, token("alice"), subprotocol=True)
        # A third connection of the same user, however it authenticates, is refused before it
        # is told `authenticated`; with a token of its own, that is the same user too.
        for subprotocol in (False, True):
            with pytest.raises(Refused) as refused:
                await open_socket(gateway, token("alice", ("big",)), subprotocol=subprotocol)
            assert refused.value.code == CLOSE_LIMIT
        # Another user is not counted against Alice.
        bob = await open_socket(gateway, token("bob"))
        # A closed connection frees its place.
        await first.close()
        await wait_for(lambda: gateway._per_user["alice"] < 2, timeout=5)
        third = await open_socket(gateway, token("alice"))
        for ws in (second, third, bob):
            await ws.close()


async def test_the_connection_limit_is_counted_by_each_gateway_process(
    api: Client, database_url: str
) -> None:
    """As documented: two replicas each take the limit's worth of one user's connections."""
    async with (
        running_gateway(database_url, api, max_connections_per_user=1) as one,
        running_gateway(database_url, api, max_connections_per_user=1) as other,
    ):
        held = [await open_socket(one, token("alice")), await open_socket(other, token("alice"))]
        with pytest.raises(Refused) as refused:
            await open_socket(one, token("alice"))
        assert refused.value.code == CLOSE_LIMIT
        for ws in held:
            await ws.close()


async def test_without_a_connection_limit_a_user_may_open_many(
    api: Client, gateway: Gateway
) -> None:
    assert gateway.config.max_connections_per_user == 0
    held = [await open_socket(gateway, token("alice")) for _ in range(30)]
    for ws in held:
        await ws.close()


async def test_a_refused_connection_is_told_why(api: Client, database_url: str) -> None:
    async with running_gateway(database_url, api, max_connections_per_user=1) as gateway:
        held = await open_socket(gateway, token("alice"))
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
            await ws.send(json.dumps({"type": "auth", "token": token("alice")}))
            assert await close_code(ws) == CLOSE_LIMIT
            assert ws.close_reason == "connections per user: at most 1"
        await held.close()
