"""The gateway process: a websockets server whose HTTP side answers health, readiness and metrics.

A client authenticates (first message `{"type": "auth", "token": …}`), then subscribes to jobs
with the last seq it saw; each subscription gets a status-sync, the events it missed, a caught-up
marker and then live events. The process's one `Tailer` reads each new event once; the event is
encoded once and the same bytes go to every subscriber of its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import re
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import msgspec
import structlog
import websockets
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from schemas.events import Event, encode_event
from schemas.wire import (
    Authenticate,
    Authenticated,
    CancelAck,
    CancelExport,
    ClientMessage,
    Heartbeat,
    Ping,
    Pong,
    Subscribe,
    Unsubscribe,
    client_decoder,
    server_encoder,
)
from services.common.auth import AuthError, Principal, TokenVerifier
from services.common.db import create_pool, pending_migrations
from services.common.eventlog import EventLog
from services.common.gcpacer import GcPacer
from services.common.looplag import LoopLag
from services.common.queries import QUERIES
from services.common.tailer import Tailer
from services.common.timing import within

from .clients import (
    CLOSE_AUTH_FAILED,
    CLOSE_LIMIT,
    CLOSE_RESTART,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_UNAVAILABLE,
    LOG,
    SUBPROTOCOL,
    Client,
    ReplayMetrics,
    StreamKey,
    close_connection,
    stream_names,
    text_frame,
)
from .config import GatewayConfig
from .reader import Reader

log = structlog.get_logger(__name__)


_PONG = server_encoder.encode(Pong())


def _select_subprotocol(
    connection: ServerConnection, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in subprotocols else None


def _offered_token(connection: ServerConnection) -> str | None:
    """A token offered as `bearer.<token>` in Sec-WebSocket-Protocol (browsers cannot send an
    Authorization header on a WebSocket)."""
    request = connection.request
    if request is None:
        return None
    for header in request.headers.get_all("Sec-WebSocket-Protocol"):
        for value in header.split(","):
            value = value.strip()
            if value.startswith("bearer."):
                return value.removeprefix("bearer.")
    return None


CANCEL_REQUEST = "export:cancel"
"""The `request` named by errors that answer an `export:cancel`."""

PRINCIPAL_CACHE = 10_000
"""Verified tokens remembered (least recently used dropped first)."""

STREAM_ROLES = frozenset({"service", "auditor"})
"""Roles that may follow the whole log."""

PROJECT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
"""A project id, as the export service accepts them (services/export/api.py): no project has
another, so a `projectId` that is not one is refused before it reaches the database."""


def decode_message(raw: str | bytes) -> ClientMessage | str:
    """The client message in a frame, or why it is not one."""
    try:
        message: ClientMessage = client_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return str(exc)
    except RecursionError:
        # msgspec decodes nested arrays and objects recursively, even those of a field it
        # skips: a few kilobytes of brackets go deeper than the interpreter's stack allows.
        return "JSON nested too deeply"
    return message


def stream_key(message: Subscribe | Unsubscribe) -> StreamKey | str:
    """The stream a subscribe or unsubscribe names, or what is wrong with it."""
    named = (message.job_id is not None) + (message.project_id is not None) + message.log
    if named != 1:
        return "name exactly one of jobId, projectId or log"
    if message.job_id is not None:
        return ("job", message.job_id)
    if message.project_id is not None:
        if not message.project_id:
            return "projectId cannot be empty"
        if not PROJECT_ID.fullmatch(message.project_id):
            return (
                "projectId must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
            )
        return ("project", message.project_id)
    return LOG


def _report_death(task: asyncio.Task[None]) -> None:
    """A background task must run until close(); if one ends, say so (readiness fails too)."""
    if task.cancelled():
        return
    log.error("gateway task stopped", task=task.get_name(), exc_info=task.exception())


def _limit_send_buffer(connection: ServerConnection, size: int) -> None:
    """Cap the kernel's send buffer of one connection. Left to autotuning it grows to megabytes
    per stalled client, which would both hold that much memory and hide a client that has
    stopped reading from the gateway's flow control for just as long."""
    sock = connection.transport.get_extra_info("socket")
    if sock is not None and size > 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _json(status: http.HTTPStatus, body: object) -> Response:
    payload = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return Response(status.value, status.phrase, headers, payload)


class Gateway:
    """Owns the server, the pool and the tailer; `close()` stops them in order, once."""

    def __init__(self, config: GatewayConfig, *, gc_pacer: GcPacer | None = None) -> None:
        """`gc_pacer`, installed for the process, is told of every connection that ends, and
        run (and reported on /metrics) while the gateway runs; without it CPython's schedule
        of full collections stays (tests run several gateways in one process)."""
        self.config = config
        self.registry = CollectorRegistry()
        self._gc_pacer = gc_pacer
        self._gc_task: asyncio.Task[None] | None = None
        self._loop_lag = LoopLag(self.registry, "gateway")
        self._lag_task: asyncio.Task[None] | None = None
        self._open_connections = 0
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
        self._eventlog: EventLog | None = None
        self._http: aiohttp.ClientSession | None = None
        self._subscribers: dict[StreamKey, set[Client]] = {}
        self._clients: set[Client] = set()
        self._principals: OrderedDict[str, Principal] = OrderedDict()
        self._dirty: list[Client] = []
        self._flush_scheduled = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reader: Reader | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._replay_queries = Counter(
            "gateway_replay_queries",
            "Queries sent for replays (coalesced across clients)",
            ["query"],
            registry=self.registry,
        )
        self._replay_requests = Counter(
            "gateway_replay_requests",
            "Replay reads asked for by clients",
            registry=self.registry,
        )
        self._connections = Gauge(
            "gateway_connections", "Authenticated connections", registry=self.registry
        )
        self._delivered = Counter(
            "gateway_events_sent", "Live events queued to clients", registry=self.registry
        )
        self._resumes = Counter(
            "gateway_slow_clients_closed",
            "Clients closed because they fell behind (told to resume)",
            registry=self.registry,
        )
        Gauge(
            "gateway_subscriptions",
            "Streams followed by this gateway's connections (jobs, projects, the log)",
            registry=self.registry,
        ).set_function(lambda: sum(len(client.subscriptions) for client in self._clients))
        self._lag = Histogram(
            "gateway_event_lag_seconds",
            "From an event's occurredAt (its writer's clock) to the gateway handing it to its "
            "subscribers: the append, the commit, the wake-up and the read",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self._replay_metrics = ReplayMetrics(self.registry)
        if gc_pacer is not None:
            gc_pacer.expose(self.registry, "gateway", "after connections closed")
        self._verifier = TokenVerifier(
            secret=config.jwt_secret or None,
            public_key=config.jwt_public_key or None,
            audience=config.jwt_audience or None,
            issuer=config.jwt_issuer or None,
        )
        self._per_user: dict[str, int] = {}
        """Open authenticated connections of each user (`sub`) to this process."""

    @property
    def port(self) -> int:
        assert self._server is not None
        sockets: Iterable[object] = self._server.sockets
        return int(next(iter(sockets)).getsockname()[1])  # type: ignore[attr-defined]

    @property
    def tailer(self) -> Tailer:
        assert self._tailer is not None
        return self._tailer

    @property
    def reader(self) -> Reader:
        assert self._reader is not None
        return self._reader

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._pool = await create_pool(
            self.config.database_url, min_size=1, max_size=self.config.pool_max
        )
        self._eventlog = EventLog(self._pool)
        self._reader = Reader(
            self._pool,
            snapshot_jobs=self.config.snapshot_jobs,
            cache_events=self.config.replay_cache_events,
            on_query=lambda name: self._replay_queries.labels(name).inc(),
            on_request=self._replay_requests.inc,
        )
        self._reader_task = asyncio.create_task(self._reader.run(), name="gateway-reader")
        cache = self._reader.cache
        Gauge(
            "gateway_replay_cache_events",
            "Events kept in memory for replays (by job and seq)",
            registry=self.registry,
        ).set_function(lambda: len(cache))
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="gateway-heartbeats")
        self._lag_task = asyncio.create_task(self._loop_lag.run(), name="gateway-loop-lag")
        if self._gc_pacer is not None:
            self._gc_task = asyncio.create_task(
                self._gc_pacer.run(lambda: self._open_connections), name="gateway-gc"
            )
        self._tailer = Tailer(
            self._eventlog,
            self.config.database_url,
            self._on_events,
            batch_size=self.config.tail_batch,
            poll_interval=self.config.poll_interval,
        )
        self._tail_task = asyncio.create_task(self._tailer.run(), name="gateway-tailer")
        for task in self._background_tasks():
            task.add_done_callback(_report_death)
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            # Progress events are a few hundred bytes: compressing them would triple the memory
            # of a connection and halve the fan-out rate (LIMITS.md), for little gain.
            compression=None,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            select_subprotocol=_select_subprotocol,
            max_size=self.config.max_message_bytes,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_interval,
            close_timeout=self.config.close_timeout,
            # A reconnect storm brings thousands of connections at once: with the default
            # queue of 100 the kernel drops SYNs and clients wait 1, 3, 7 s to retry.
            backlog=self.config.backlog,
        )
        log.info("gateway listening", host=self.config.host, port=self.port)

    def _background_tasks(self) -> list[asyncio.Task[None]]:
        """The tasks the gateway runs beside its connections, those started so far."""
        tasks = (
            self._tail_task,
            self._reader_task,
            self._heartbeat_task,
            self._gc_task,
            self._lag_task,
        )
        return [task for task in tasks if task is not None]

    async def close(self) -> None:
        """Stop accepting, then stop reading, then release the database. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            # Clients are told to reconnect (to another replica) and resume: nothing is lost.
            self._server.close(close_connections=False)
            timeout = self.config.close_timeout
            # All at once: thousands of closing handshakes one after the other would take
            # minutes; each is bounded by the close timeout. Again until none is left open: a
            # handshake that was completing while the first round started is not in it.
            while connections := list(self._server.connections):
                await asyncio.gather(
                    *(
                        close_connection(
                            connection, CLOSE_RESTART, "gateway restarting: resume", timeout
                        )
                        for connection in connections
                    ),
                    return_exceptions=True,
                )
            try:
                async with asyncio.timeout(timeout + 1.0):
                    await self._server.wait_closed()
            except TimeoutError:
                # Connections stuck in a closing handshake the client never finishes (it stopped
                # reading, say) would hold the shutdown: cut them.
                for client in list(self._clients):
                    client.connection.transport.abort()
                await self._server.wait_closed()
        for task in self._background_tasks():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pool is not None:
            await self._pool.close()
        if self._http is not None:
            await self._http.close()

    def _on_events(self, events: list[Event]) -> None:
        """Fan a page of new events out: each encoded once, the same bytes for every client."""
        self._events_read.inc(len(events))
        self._position.set(events[-1].position)
        now = datetime.now(UTC)
        for event in events:
            self._lag.observe(max(0.0, (now - event.occurred_at).total_seconds()))
        subscribers = self._subscribers
        sent = 0
        for event in events:
            encoded: bytes | None = None
            for key in (("job", event.job_id), ("project", event.project_id), LOG):
                clients = subscribers.get(key)
                if not clients:
                    continue
                if encoded is None:
                    encoded = text_frame(encode_event(event))
                for client in list(clients):
                    subscription = client.subscriptions.get(key)
                    if subscription is not None:
                        actions = subscription.on_live(event)
                        if actions:
                            client.dispatch(key, actions, encoded)
                            sent += 1
        if sent:
            self._delivered.inc(sent)

    def _schedule_flush(self, client: Client) -> None:
        """Flush `client` at the end of this turn of the loop, with every other one."""
        self._dirty.append(client)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            try:
                client.flush()
            except Exception:  # one broken connection must not stop the others' frames
                log.exception("writing to a client failed")
                client.close_soon(CLOSE_UNAVAILABLE, "internal error: resume later")

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _json(http.HTTPStatus.OK, {"status": "ok"})
        if path == "/readyz":
            return await self._readiness()
        if path == "/ws":
            return None  # the WebSocket handshake goes on
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
            http.HTTPStatus.NOT_FOUND,
            {"error": {"code": "not_found", "message": "WebSocket clients connect to /ws"}},
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
        tasks = {
            "tailer": self._tail_task,
            "reader": self._reader_task,
            "heartbeats": self._heartbeat_task,
        }
        stopped = [name for name, task in tasks.items() if task is None or task.done()]
        if stopped:
            return _json(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": {"code": "stopped", "message": f"stopped: {', '.join(stopped)}"}},
            )
        if self._tailer is None or not self._tailer.listening:
            return _json(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": {"code": "not_listening", "message": "log wake-ups not connected"}},
            )
        return _json(http.HTTPStatus.OK, {"status": "ready", "position": self._tailer.position})

    async def _handle(self, connection: ServerConnection) -> None:
        self._open_connections += 1
        try:
            await self._connected(connection)
        finally:
            self._open_connections -= 1
            if self._gc_pacer is not None:
                self._gc_pacer.connection_closed()

    async def _connected(self, connection: ServerConnection) -> None:
        # Every log line of this connection's task carries its id (and its user, once known).
        structlog.contextvars.bind_contextvars(connection_id=connection.id.hex[:16])
        authenticated = await self._authenticate(connection)
        if authenticated is None:
            return
        principal, token = authenticated
        user = principal.user_id
        structlog.contextvars.bind_contextvars(user=user)
        limit = self.config.max_connections_per_user
        if limit and self._per_user.get(user, 0) >= limit:
            await self._close(connection, CLOSE_LIMIT, f"connections per user: at most {limit}")
            return
        self._per_user[user] = self._per_user.get(user, 0) + 1
        try:
            await self._serve(connection, principal, token)
        finally:
            if self._per_user[user] > 1:
                self._per_user[user] -= 1
            else:
                del self._per_user[user]

    async def _serve(self, connection: ServerConnection, principal: Principal, token: str) -> None:
        """An authenticated connection, from its `authenticated` answer to its end."""
        _limit_send_buffer(connection, self.config.send_buffer)
        # The opening handshake's headers (a browser's run to kilobytes with its cookies) have
        # been read: an idle connection need not keep them, nor the response's, for its life.
        # (The request itself stays: websockets tells the handshake from frames by it.)
        for handshake in (connection.request, connection.response):
            if handshake is not None:
                handshake.headers.clear()
        assert self._reader is not None
        client = Client(
            connection,
            principal,
            token,
            self._reader,
            max_queue=self.config.max_queue,
            max_queue_bytes=self.config.max_queue_bytes,
            close_timeout=self.config.close_timeout,
            page_size=self.config.page_size,
            unregister=self._unregister,
            schedule=self._schedule_flush,
            metrics=self._replay_metrics,
        )
        client.send(server_encoder.encode(Authenticated(user=principal.user_id)))
        expiry = asyncio.get_running_loop().call_later(
            max(principal.expires_at - time.time(), 0.0),
            client.close_soon,
            CLOSE_TOKEN_EXPIRED,
            "token expired: get a fresh one and resume",
        )
        self._clients.add(client)
        self._connections.inc()
        try:
            await self._receive(client)
        except websockets.ConnectionClosed:
            pass
        finally:
            expiry.cancel()
            self._clients.discard(client)
            self._connections.dec()
            if client.overflowed:
                self._resumes.inc()
            for key in list(client.subscriptions):
                self._unregister(key, client)
            await client.stop()

    def _verify(self, token: str) -> Principal:
        """The token's principal. Verified principals are kept (while unexpired) by token: a
        reconnect storm verifies each distinct token once, and its connections share one
        Principal instead of one each."""
        principal = self._principals.get(token)
        if principal is not None and principal.expires_at > time.time():
            self._principals.move_to_end(token)
            return principal
        principal = self._verifier.verify(token)
        self._principals[token] = principal
        if len(self._principals) > PRINCIPAL_CACHE:
            self._principals.popitem(last=False)
        return principal

    async def _close(self, connection: ServerConnection, code: int, reason: str) -> None:
        await close_connection(connection, code, reason, self.config.close_timeout)

    async def _authenticate(self, connection: ServerConnection) -> tuple[Principal, str] | None:
        offered = _offered_token(connection)
        if offered is not None:
            try:
                return self._verify(offered), offered
            except AuthError as exc:
                await self._close(connection, CLOSE_AUTH_FAILED, str(exc)[:120])
                return None
        try:
            raw = await within(connection.recv(), self.config.auth_timeout)
        except TimeoutError:
            await self._close(connection, CLOSE_AUTH_FAILED, "authenticate first")
            return None
        except websockets.ConnectionClosed:
            return None
        message = decode_message(raw)
        if isinstance(message, str):
            await self._close(connection, CLOSE_AUTH_FAILED, f"invalid message: {message}")
            return None
        if not isinstance(message, Authenticate):
            await self._close(connection, CLOSE_AUTH_FAILED, "the first message must be auth")
            return None
        try:
            return self._verify(message.token), message.token
        except AuthError as exc:
            await self._close(connection, CLOSE_AUTH_FAILED, str(exc)[:120])
            return None

    async def _receive(self, client: Client) -> None:
        """Messages from the client; a bad one gets an error message and the connection stays.

        A client over the message rate or the subscription limit is closed with CLOSE_LIMIT.
        What it sends after that is read and dropped: a connection that stops reading cannot
        receive the client's half of the closing handshake."""
        allowance = float(self.config.message_burst)
        last = time.monotonic()
        async for raw in client.connection:
            if client.closing:
                continue
            now = time.monotonic()
            allowance = min(
                allowance + (now - last) * self.config.message_rate,
                float(self.config.message_burst),
            )
            last = now
            if allowance < 1.0:
                client.close_soon(CLOSE_LIMIT, "too many messages")
                continue
            allowance -= 1.0
            await self._on_message(client, raw)
            # Not kept while the next message is awaited: an idle connection holds no message.
            del raw

    async def _on_message(self, client: Client, raw: str | bytes) -> None:
        """Answer one message from an authenticated client."""
        message = decode_message(raw)
        if isinstance(message, str):
            client.error("invalid_message", message)
            return
        match message:
            case Subscribe():
                await self._subscribe(client, message)
            case CancelExport(job_id=job_id):
                await self._cancel(client, job_id)
            case Unsubscribe():
                key = stream_key(message)
                if isinstance(key, str):
                    client.error("invalid_message", key)
                elif key not in client.subscriptions:
                    client.error("not_subscribed", "not following that stream")
                else:
                    client.drop(key)
            case Authenticate():
                client.error("invalid_message", "already authenticated")
            case Ping():
                client.send(_PONG)

    async def _subscribe(self, client: Client, message: Subscribe) -> bool:
        """Start a subscription, or answer why not; False when the client was closed."""
        key = stream_key(message)
        if isinstance(key, str):
            client.error("invalid_message", key)
            return True
        if key[0] == "job":
            cursor, wrong = message.after_seq, message.after_position
            names = ("afterSeq", "afterPosition")
        else:
            cursor, wrong = message.after_position, message.after_seq
            names = ("afterPosition", "afterSeq")
        if wrong is not None:
            client.error("invalid_message", f"{names[1]} does not apply here; use {names[0]}")
            return True
        if cursor is not None and cursor < 0:
            client.error("invalid_message", f"{names[0]} cannot be negative")
            return True
        principal = client.principal
        if key[0] == "project" and not principal.can_read(key[1]):
            client.error("forbidden", f"this token may not read project {key[1]}")
            return True
        if key[0] == "log" and not (principal.roles & STREAM_ROLES):
            client.error("forbidden", "following the whole log takes the service or auditor role")
            return True
        if key not in client.subscriptions and (
            len(client.subscriptions) >= self.config.max_subscriptions
        ):
            client.close_soon(CLOSE_LIMIT, f"at most {self.config.max_subscriptions} subscriptions")
            return False
        recorded = (
            not principal.is_auditor
            or key in client.subscriptions
            or await self._record_audit(client, key, cursor)
        )
        if not recorded:
            client.error("unavailable", "the read could not be recorded; try again")
            return True
        subscription = client.subscribe(key, cursor)
        if subscription is None:
            return True
        # Registered before it starts: every event is then in a replay page or arrives live
        # (see Subscription).
        self._subscribers.setdefault(key, set()).add(client)
        client.dispatch(key, subscription.start())
        return True

    async def _record_audit(self, client: Client, key: StreamKey, cursor: int | None) -> bool:
        """Auditors' reads are recorded (`audit_reads`), through the gateway too: a
        subscription is recorded when it starts, before anything of it is sent."""
        assert self._pool is not None
        job_id, project_id, whole_log = stream_names(key)
        filters = {
            "jobId": [str(job_id)] if job_id else [],
            "projectId": [project_id] if project_id else [],
            "log": ["true"] if whole_log else [],
            "after": [str(cursor)] if cursor is not None else [],
        }
        principal = client.principal
        try:
            async with self._pool.acquire(timeout=5) as conn:
                await conn.fetchval(
                    QUERIES["audit_subscription"],
                    principal.user_id,
                    sorted(principal.roles),
                    json.dumps({k: v for k, v in filters.items() if v}),
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("auditor read not recorded", user=principal.user_id, error=repr(exc))
            return False
        log.info("auditor read", user=principal.user_id, stream=key[0], filters=filters)
        return True

    async def _heartbeats(self) -> None:
        """One timer for every client: each gets a heartbeat every interval."""
        interval = self.config.heartbeat_interval
        beat = text_frame(server_encoder.encode(Heartbeat(interval=interval)))
        while True:
            await asyncio.sleep(interval)
            for client in list(self._clients):
                client.send_frame(beat)

    async def _cancel(self, client: Client, job_id: uuid.UUID) -> None:
        """Forward a cancel to the export service with the user's own token: the export service
        decides (and checks access); the answer comes back as export:cancel-ack."""
        assert self._eventlog is not None
        assert self._http is not None
        about: dict[str, Any] = {"job_id": job_id, "request": CANCEL_REQUEST}
        state = await self._eventlog.job_state(job_id)
        if state is None or not client.principal.can_read(state.project_id):
            client.error("not_found", f"no export {job_id} you may follow", **about)
            return
        url = (
            f"{self.config.export_url.rstrip('/')}/projects/{state.project_id}"
            f"/export/{job_id}/cancel"
        )
        try:
            async with self._http.post(
                url, headers={"Authorization": f"Bearer {client.token}"}
            ) as response:
                body = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("cancel not forwarded", job_id=str(job_id), error=repr(exc))
            client.error("unavailable", "the export service did not answer; try again", **about)
            return
        if status == 202:
            ack = CancelAck(job_id=job_id, accepted=True, seq=body.get("seq"))
        elif status == 409:
            error = body.get("error", {})
            ack = CancelAck(
                job_id=job_id, accepted=False, seq=error.get("seq"), outcome=error.get("outcome")
            )
        elif status == 403:
            client.error("forbidden", "this token may not cancel that export", **about)
            return
        else:
            client.error("unavailable", f"the export service answered {status}", **about)
            return
        client.send(server_encoder.encode(ack))

    def _unregister(self, key: StreamKey, client: Client) -> None:
        clients = self._subscribers.get(key)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._subscribers[key]
