"""The gateway process: a websockets server whose HTTP side answers health, readiness and metrics.

The subscription protocol (status-sync replay, live fan-out) is built on the process's one
`Tailer`; until it lands, WebSocket upgrades are refused with 503 and a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
from collections.abc import Iterable

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from schemas.events import Event
from services.common.db import create_pool, pending_migrations
from services.common.eventlog import EventLog

from .config import GatewayConfig
from .tailer import Tailer

log = structlog.get_logger(__name__)


def _json(status: http.HTTPStatus, body: object) -> Response:
    payload = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return Response(status.value, status.phrase, headers, payload)


class Gateway:
    """Owns the server, the pool and the tailer; `close()` stops them in order, once."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self._events_read = Counter(
            "gateway_tail_events", "Events read from the log", registry=self.registry
        )
        self._position = Gauge(
            "gateway_tail_position", "Last log position read", registry=self.registry
        )
        self._pool: asyncpg.Pool | None = None
        self._server: Server | None = None
        self._tailer: Tailer | None = None
        self._tail_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def port(self) -> int:
        assert self._server is not None
        sockets: Iterable[object] = self._server.sockets
        return int(next(iter(sockets)).getsockname()[1])  # type: ignore[attr-defined]

    @property
    def tailer(self) -> Tailer:
        assert self._tailer is not None
        return self._tailer

    async def start(self) -> None:
        self._pool = await create_pool(
            self.config.database_url, min_size=1, max_size=self.config.pool_max
        )
        self._tailer = Tailer(
            EventLog(self._pool),
            self.config.database_url,
            self._on_events,
            batch_size=self.config.tail_batch,
            poll_interval=self.config.poll_interval,
        )
        self._tail_task = asyncio.create_task(self._tailer.run(), name="gateway-tailer")
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            compression=None,
        )
        log.info("gateway listening", host=self.config.host, port=self.port)

    async def close(self) -> None:
        """Stop accepting, then stop reading, then release the database. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tail_task is not None:
            self._tail_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail_task
        if self._pool is not None:
            await self._pool.close()

    def _on_events(self, events: list[Event]) -> None:
        self._events_read.inc(len(events))
        self._position.set(events[-1].position)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _json(http.HTTPStatus.OK, {"status": "ok"})
        if path == "/readyz":
            return await self._readiness()
        if path == "/metrics":
            body = generate_latest(self.registry)
            headers = Headers(
                [
                    ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                ]
            )
            return Response(200, "OK", headers, body)
        return _json(
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            {"error": {"code": "unavailable", "message": "subscriptions are not served yet"}},
        )

    async def _readiness(self) -> Response:
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=2) as conn:
                pending = await pending_migrations(conn)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            return _json(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": {"code": "database_unavailable", "message": type(exc).__name__}},
            )
        if pending:
            return _json(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": {"code": "migrations_pending", "message": f"not applied: {pending}"}},
            )
        if self._tailer is None or not self._tailer.listening:
            return _json(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": {"code": "not_listening", "message": "log wake-ups not connected"}},
            )
        return _json(http.HTTPStatus.OK, {"status": "ready", "position": self._tailer.position})

    async def _handle(self, connection: ServerConnection) -> None:
        # Unreachable until the protocol lands: every upgrade is answered in _process_request.
        await connection.close(1013, "try again later")
