"""Following the log over plain HTTP, and the durable consumers that remember where they were.

`GET /v1/stream` is a Server-Sent Events stream of a project's events (`?projectId=`) or of the
whole log (the service or auditor role), from a log position: the `Last-Event-ID` header (what a
reconnecting EventSource sends), else `?after=`, else the position of a named consumer
(`?consumer=`), else the head (live only). Each event is an SSE message whose `id` is its log
position, whose `event` is its type and whose `data` is the event envelope; `caught-up` carries
the position the replay reached (its `id` too, so a reconnect resumes after it even when the
stream had no event). The hand-over from replay to live is the gateway's `StreamSubscription`,
so nothing is skipped or sent twice; the process has one tailer for all its streams, and a
stream that cannot keep up is ended (its client reconnects with `Last-Event-ID` and misses
nothing).

Durable consumers (`/v1/consumers/{name}`) are named cursors in PostgreSQL: a consumer
acknowledges the position of the last event it has processed and, after a restart, resumes after
it. Delivery is at least once: events processed but not yet acknowledged come again.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import TypeVar

import asyncpg
import msgspec
import structlog
from aiohttp import web

from schemas.events import Event, encode_event
from services.common.auth import Principal
from services.common.eventlog import EventLog, event_from_row
from services.common.queries import QUERIES
from services.common.tailer import Tailer
from services.common.timing import within
from services.common.web import json_response
from services.gateway.subscription import (
    Action,
    ReadSnapshot,
    ReadStreamPage,
    SendPage,
    SendStreamCaughtUp,
    SendStreamSync,
    StreamSubscription,
)

from .api import PRINCIPAL, PROJECT_ID
from .keys import EVENTLOG, POOL, STREAMS

log = structlog.get_logger(__name__)

CONSUMER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
STREAM_ROLES = frozenset({"service", "auditor"})
SSE_PAGE = 500
SSE_QUEUE = 2000
"""Live messages waiting for one SSE client before its stream is ended (it resumes)."""
SSE_HEARTBEAT = 15.0
SSE_RETRY_MS = 2000
SSE_WRITE_TIMEOUT = 30.0
"""Seconds one write may wait for a client that has stopped reading before it is cut off."""


# -- wire types ------------------------------------------------------------------------------


class ConsumerSpec(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    """Create a consumer: of one project (`projectId`) or of the whole log (no `projectId`,
    the service or auditor role), starting after `startPosition` (0: the log's beginning)."""

    project_id: str | None = None
    start_position: int = 0


class Ack(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """Every event of the consumer's stream up to `position` has been processed."""

    position: int


class Consumer(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    name: str
    project_id: str | None
    position: int
    """Resume after this position: everything at or below it was acknowledged."""
    acks: int
    created_at: datetime
    updated_at: datetime


BodyT = TypeVar("BodyT")

_spec_decoder = msgspec.json.Decoder(ConsumerSpec)
_ack_decoder = msgspec.json.Decoder(Ack)


def _consumer(row: asyncpg.Record) -> Consumer:
    return Consumer(
        name=row["name"],
        project_id=row["project_id"],
        position=row["position"],
        acks=row["acks"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _may_follow(principal: Principal, project_id: str | None) -> bool:
    if project_id is None:
        return bool(principal.roles & STREAM_ROLES)
    return principal.can_read(project_id)


def _refuse(project_id: str | None) -> web.HTTPForbidden:
    if project_id is None:
        return web.HTTPForbidden(reason="the whole log is for the service or auditor role")
    return web.HTTPForbidden(reason=f"this token may not read project {project_id}")


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not CONSUMER_NAME.fullmatch(name):
        raise web.HTTPBadRequest(
            reason="a consumer name is 1 to 100 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


async def _owned(request: web.Request, name: str) -> asyncpg.Record:
    """The consumer of that name if the caller owns it; 404 otherwise (even if it exists)."""
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(QUERIES["consumer_get"], name)
    if row is None or row["owner_id"] != request[PRINCIPAL].user_id:
        raise web.HTTPNotFound(reason=f"no consumer {name} of yours")
    return row


async def _body(request: web.Request, decoder: msgspec.json.Decoder[BodyT]) -> BodyT:
    raw = await request.read()
    try:
        return decoder.decode(raw or b"{}")
    except msgspec.DecodeError as exc:
        raise web.HTTPUnprocessableEntity(reason=f"invalid body: {exc}") from None


# -- consumers -------------------------------------------------------------------------------


async def put_consumer(request: web.Request) -> web.Response:
    """Create a durable consumer; the same request again returns it (200, not 201)."""
    name = _name(request)
    spec = await _body(request, _spec_decoder)
    principal = request[PRINCIPAL]
    if spec.project_id is not None and not PROJECT_ID.fullmatch(spec.project_id):
        raise web.HTTPUnprocessableEntity(reason="projectId is not a valid project id")
    if spec.start_position < 0:
        raise web.HTTPUnprocessableEntity(reason="startPosition cannot be negative")
    if not _may_follow(principal, spec.project_id):
        raise _refuse(spec.project_id)
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(
            QUERIES["consumer_create"],
            name,
            principal.user_id,
            spec.project_id,
            spec.start_position,
        )
    assert row is not None
    if row["owner_id"] != principal.user_id:
        raise web.HTTPConflict(reason=f"the consumer name {name} is taken")
    if not row["created"] and row["project_id"] != spec.project_id:
        raise web.HTTPConflict(
            reason=f"consumer {name} follows {row['project_id'] or 'the whole log'}: "
            "delete it first to follow another stream"
        )
    return json_response(_consumer(row), status=201 if row["created"] else 200)


async def get_consumer(request: web.Request) -> web.Response:
    return json_response(_consumer(await _owned(request, _name(request))))


async def ack_consumer(request: web.Request) -> web.Response:
    """Acknowledge a position. Positions only move forward; acknowledging beyond the log's head
    is refused (it would skip events not yet written)."""
    name = _name(request)
    ack = await _body(request, _ack_decoder)
    if ack.position < 0:
        raise web.HTTPUnprocessableEntity(reason="position cannot be negative")
    await _owned(request, name)
    head = await request.app[EVENTLOG].head_position()
    if ack.position > head:
        raise web.HTTPUnprocessableEntity(
            reason=f"position {ack.position} is beyond the log's head ({head})"
        )
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(
            QUERIES["consumer_ack"], name, ack.position, request[PRINCIPAL].user_id
        )
    if row is None:  # deleted meanwhile
        raise web.HTTPNotFound(reason=f"no consumer {name} of yours")
    return json_response(_consumer(row))


async def delete_consumer(request: web.Request) -> web.Response:
    name = _name(request)
    async with request.app[POOL].acquire() as conn:
        deleted = await conn.fetchval(QUERIES["consumer_delete"], name, request[PRINCIPAL].user_id)
    if deleted is None:
        raise web.HTTPNotFound(reason=f"no consumer {name} of yours")
    return web.Response(status=204)


# -- Server-Sent Events ----------------------------------------------------------------------


def sse_event(event: Event) -> bytes:
    """One event as an SSE message: id = log position, event = type, data = the envelope."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.position,
        event.type.encode(),
        encode_event(event),
    )


def _sse_marker(kind: str, position: int, *, with_id: bool) -> bytes:
    data = b'{"position":%d}' % position
    head = b"id: %d\n" % position if with_id else b""
    return head + b"event: %s\ndata: %s\n\n" % (kind.encode(), data)


class Follower:
    """One SSE client: its subscription machine and its bounded queue of live messages."""

    def __init__(self, project_id: str | None, after: int | None) -> None:
        self.project_id = project_id
        self.subscription = StreamSubscription(after, page_size=SSE_PAGE)
        self.live: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=SSE_QUEUE)
        self.overflowed = False
        self.closed = False

    def on_live(self, event: Event, message: bytes) -> None:
        if self.overflowed:
            return
        if self.subscription.on_live(event):
            try:
                self.live.put_nowait(message)
            except asyncio.QueueFull:
                self.overflowed = True
                self._end()

    def _end(self) -> None:
        self.closed = True
        # Make room for the sentinel: what is dropped, the client reads again after reconnecting.
        while not self.live.empty():
            self.live.get_nowait()
        self.live.put_nowait(None)

    def close(self) -> None:
        self._end()


class StreamHub:
    """The export process's one tailer, fanning new events out to its SSE followers."""

    def __init__(self, eventlog: EventLog, dsn: str, *, poll_interval: float = 1.0) -> None:
        self._eventlog = eventlog
        self._followers: dict[str | None, set[Follower]] = {}
        self.tailer = Tailer(eventlog, dsn, self._on_events, poll_interval=poll_interval)

    async def run(self, *, start: int) -> None:
        """Follow the log from `start`, read before the service takes requests: a stream that
        went live before the tailer had read where to begin could miss what came between."""
        await self.tailer.run(start=start)

    def follow(self, project_id: str | None, after: int | None) -> Follower:
        # Registered before its first read: every event is then in a page or arrives live.
        follower = Follower(project_id, after)
        self._followers.setdefault(project_id, set()).add(follower)
        return follower

    def leave(self, follower: Follower) -> None:
        followers = self._followers.get(follower.project_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[follower.project_id]

    def close_all(self) -> None:
        for followers in self._followers.values():
            for follower in followers:
                follower.close()

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            message: bytes | None = None
            for key in (event.project_id, None):
                for follower in self._followers.get(key, ()):
                    if message is None:
                        message = sse_event(event)
                    follower.on_live(event, message)

    async def head_position(self) -> int:
        return await self._eventlog.head_position()

    async def read_page(self, project_id: str | None, after: int, limit: int) -> list[Event]:
        if project_id is None:
            return await self._eventlog.tail(after, limit)
        async with self._eventlog.pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["project_tail"], project_id, after, limit)
        return [event_from_row(row) for row in rows]


def _start_position(request: web.Request, project_id: str | None) -> int | str | None:
    """The cursor named by the request: Last-Event-ID, else ?after=, else ?consumer= (a name,
    resolved by the caller), else None (live only)."""
    for raw, name in (
        (request.headers.get("Last-Event-ID"), "Last-Event-ID"),
        (request.query.get("after"), "after"),
    ):
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise web.HTTPBadRequest(reason=f"{name} must be a log position (an integer)") from None
        if value < 0:
            raise web.HTTPBadRequest(reason=f"{name} cannot be negative")
        return value
    consumer = request.query.get("consumer")
    if consumer:
        return consumer
    return None


async def event_stream(request: web.Request) -> web.StreamResponse:
    """A project's events, or the whole log's, as Server-Sent Events (see the module doc)."""
    principal = request[PRINCIPAL]
    project_id = request.query.get("projectId") or None
    if project_id is not None and not PROJECT_ID.fullmatch(project_id):
        raise web.HTTPBadRequest(reason="projectId is not a valid project id")
    if not _may_follow(principal, project_id):
        raise _refuse(project_id)
    start = _start_position(request, project_id)
    if isinstance(start, str):
        if not CONSUMER_NAME.fullmatch(start):
            raise web.HTTPBadRequest(reason="consumer is not a valid consumer name")
        row = await _owned(request, start)
        if row["project_id"] != project_id:
            raise web.HTTPBadRequest(
                reason=f"consumer {start} follows {row['project_id'] or 'the whole log'}, "
                "not this stream"
            )
        start = int(row["position"])

    hub = request.app[STREAMS]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not hold the stream back
        }
    )
    await response.prepare(request)
    follower = hub.follow(project_id, start)
    # The token is checked at connect only: the stream ends when it expires, and the client
    # reconnects with a fresh one and Last-Event-ID.
    expiry = asyncio.get_running_loop().call_later(
        max(principal.expires_at - time.time(), 0.0), follower.close
    )
    try:
        await _write(response, b"retry: %d\n\n" % SSE_RETRY_MS)
        await _pump(hub, follower, response)
        await within(response.write_eof(), SSE_WRITE_TIMEOUT)
    except (ConnectionResetError, TimeoutError):
        # Gone, or stopped reading: cut it off; it resumes from its last id.
        if request.transport is not None:
            request.transport.abort()
    finally:
        expiry.cancel()
        hub.leave(follower)
    return response


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Write, or give up (TimeoutError) on a client that has not taken anything for a while."""
    await within(response.write(data), SSE_WRITE_TIMEOUT)


async def _pump(hub: StreamHub, follower: Follower, response: web.StreamResponse) -> None:
    subscription = follower.subscription
    pending: list[Action] = subscription.start()
    while pending:
        if follower.closed:
            return  # the server is stopping, the token expired, or it fell behind
        action = pending.pop(0)
        match action:
            case ReadSnapshot():
                head = await hub.head_position()
                pending += subscription.on_snapshot(head)
            case SendStreamSync(position=position):
                # No id: the client's own cursor may be far below the head.
                await _write(response, _sse_marker("status-sync", position, with_id=False))
            case ReadStreamPage(after_position=after, limit=limit):
                events = await hub.read_page(follower.project_id, after, limit)
                actions = subscription.on_page(events)
                chunk = b"".join(
                    sse_event(event)
                    for a in actions
                    if isinstance(a, SendPage)
                    for event in a.events
                )
                if chunk:
                    await _write(response, chunk)
                pending += [a for a in actions if not isinstance(a, SendPage)]
            case SendStreamCaughtUp(position=position):
                await _write(response, _sse_marker("caught-up", position, with_id=True))
    # Live: whatever the tailer queued, and a comment now and then so that proxies and the
    # client can tell a quiet stream from a dead one.
    while True:
        try:
            message = await within(follower.live.get(), SSE_HEARTBEAT)
        except TimeoutError:
            await _write(response, b": keepalive\n\n")
            continue
        if message is None:
            return  # too slow, or the server is stopping: the client resumes from its last id
        batch = [message]
        while not follower.live.empty():
            queued = follower.live.get_nowait()
            if queued is None:
                await _write(response, b"".join(batch))
                return
            batch.append(queued)
        await _write(response, b"".join(batch))


def routes() -> Iterable[web.RouteDef]:
    return [
        web.get("/v1/stream", event_stream),
        web.put("/v1/consumers/{name}", put_consumer),
        web.get("/v1/consumers/{name}", get_consumer),
        web.post("/v1/consumers/{name}/ack", ack_consumer),
        web.delete("/v1/consumers/{name}", delete_consumer),
    ]
