"""One WebSocket client: its subscriptions, its bounded send queue, and the pump around them.

The protocol logic lives in `Subscription` (no I/O); this module carries out its actions: reads
from the log, and sends. Sends go through a bounded queue drained by one writer task; a client
that lets it fill up is closed with CLOSE_RESUME and resumes from its last seq (the log has
everything it missed). Live events arrive already encoded: one encoding per event per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Literal, TypeAlias

import structlog
import websockets
from prometheus_client import CollectorRegistry, Histogram
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from schemas.events import encode_event
from schemas.wire import (
    CaughtUp,
    EndOfStream,
    Error,
    StatusSync,
    server_encoder,
)
from services.common.auth import Principal

from .reader import Page, Reader, ReaderError
from .subscription import (
    Action,
    ReadPage,
    ReadSnapshot,
    ReadStreamPage,
    Send,
    SendCaughtUp,
    SendEndOfStream,
    SendPage,
    SendStatusSync,
    SendStreamCaughtUp,
    SendStreamSync,
    StreamSubscription,
    Subscription,
)

log = structlog.get_logger(__name__)

CLOSE_AUTH_FAILED = 4001
"""The token is missing, invalid or expired: get a fresh one and reconnect."""
CLOSE_RESUME = 4008
"""The client fell behind: reconnect and subscribe with the last seq seen; nothing is lost."""
CLOSE_RESTART = 1012
"""The gateway is restarting: reconnect (to another replica) and resume."""
CLOSE_TOKEN_EXPIRED = 4003
"""The token has expired: get a fresh one, reconnect and resume from the last seq."""
CLOSE_LIMIT = 4029
"""The client sent messages too fast or followed too many jobs (see the limits in the README)."""
CLOSE_UNAVAILABLE = 1011
"""The gateway could not read the log: reconnect after a pause and resume from the last seq."""
CLOSE_PROTOCOL_ERROR = 1002
"""The client broke the WebSocket protocol (RFC 6455); sent by the websockets library."""
CLOSE_NOT_UTF8 = 1007
"""A text frame that is not UTF-8; sent by the websockets library."""
MAX_CLOSE_REASON = 123
"""Bytes of UTF-8 a close frame's reason may hold (a control frame carries at most 125)."""
SUBPROTOCOL = "exportlog.v1"
"""Offer it (with `bearer.<token>` beside it, for browsers that cannot set headers)."""


StreamKey: TypeAlias = (
    tuple[Literal["job"], uuid.UUID] | tuple[Literal["project"], str] | tuple[Literal["log"], None]
)
"""What a subscription follows: ("job", id), ("project", id) or ("log", None)."""

LOG: StreamKey = ("log", None)


FLUSH_AT = 256
"""Frames pending for one client that are written at once rather than at the turn's end."""


def text_frame(payload: bytes) -> bytes:
    """`payload` as one whole WebSocket text frame from the server (FIN, unmasked, RFC 6455
    5.2): the bytes that go on the wire. A live event is framed once per process and the same
    frame written to each of its clients; compression is off, so the frame is the same for all.
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


async def close_connection(
    connection: ServerConnection, code: int, reason: str, timeout: float
) -> None:
    """Close with `code`, waiting at most `timeout` for the client's part of the handshake.

    `ServerConnection.close()` first waits for the socket to take the close frame, and a client
    that has stopped reading never lets it: a slow client, the very one being closed, would
    hold its handler (and a shutdown) for as long as it stays frozen. Here the close frame is
    written without waiting, and the connection is aborted when the client does not answer.
    A reason too long for a close frame is cut: the frame would be refused, and the client
    would see the connection drop (1006) instead of the code."""
    if connection.protocol.state is State.OPEN:
        with contextlib.suppress(Exception):
            connection.protocol.send_close(code, close_reason(reason))
            connection.send_data()
    try:
        async with asyncio.timeout(timeout):
            await connection.wait_closed()
    except TimeoutError:
        connection.transport.abort()
        await connection.wait_closed()


def close_reason(reason: str) -> str:
    """`reason`, cut to what a close frame holds, at a character boundary."""
    return reason.encode("utf-8", "replace")[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


def stream_names(key: StreamKey) -> tuple[uuid.UUID | None, str | None, bool]:
    """(jobId, projectId, log): the fields that name the stream in every marker sent for it."""
    if key[0] == "job":
        return key[1], None, False
    if key[0] == "project":
        return None, key[1], False
    return None, None, True


class ReplayMetrics:
    """How long subscriptions take from subscribe to caught-up, and how many events they
    replay on the way (status-sync snapshots not counted), in a registry of the gateway's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            "gateway_replay_seconds",
            "Time from a subscribe to its caught-up marker",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.events = Histogram(
            "gateway_replay_events",
            "Events replayed to a subscription before its caught-up marker",
            buckets=(0, 1, 10, 100, 1_000, 10_000, 100_000),
            registry=registry,
        )

    def replayed(self, seconds: float, events: int) -> None:
        self.seconds.observe(seconds)
        self.events.observe(events)


class Client:
    """A connected, authenticated client and everything it follows.

    Sending never awaits. `send` appends to the client's pending frames and asks the gateway for
    a flush; the gateway flushes every client with pending frames once per turn of the event
    loop, each with one write to its socket (a burst is written as it builds up). While the
    socket's buffer is over its high-water mark the client is blocked: frames wait in `pending`
    (at most `max_queue` of them and `max_queue_bytes`, beyond which the client is closed with
    CLOSE_RESUME) and one task waits for the socket to drain. Reads wait for it too before they
    send (flow control). An idle client costs its connection, this object
    and no task of its own; a reader task exists only while reads are pending."""

    __slots__ = (
        "_blocked",
        "_close_timeout",
        "_closing",
        "_draining",
        "_flush_at",
        "_max_queue",
        "_max_queue_bytes",
        "_page_size",
        "_reader",
        "_reading",
        "_replays",
        "_schedule",
        "_snapshot_jobs",
        "_unregister",
        "connection",
        "lost",
        "metrics",
        "overflowed",
        "pending",
        "pending_bytes",
        "principal",
        "reads",
        "subscriptions",
        "token",
    )

    def __init__(
        self,
        connection: ServerConnection,
        principal: Principal,
        token: str,
        reader: Reader,
        *,
        max_queue: int,
        max_queue_bytes: int = 4 * 1024 * 1024,
        close_timeout: float = 5.0,
        page_size: int,
        unregister: Callable[[StreamKey, Client], None],
        schedule: Callable[[Client], None],
        metrics: ReplayMetrics | None = None,
    ) -> None:
        self.connection = connection
        self.metrics = metrics
        # Per subscription still catching up: when it started and how many events it replayed.
        self._replays: dict[StreamKey, list[float]] | None = None  # made when first needed
        self.principal = principal
        self.token = token
        self._reader = reader
        self._page_size = page_size
        self._max_queue = max_queue
        self._unregister = unregister
        self._schedule = schedule
        self.pending: list[bytes] | None = None  # whole frames, as `text_frame` makes them
        self.pending_bytes = 0
        self.lost = False
        self._max_queue_bytes = max_queue_bytes
        self._close_timeout = close_timeout
        # Only a client whose socket is full can overflow: before that, a burst is written.
        self._flush_at = min(FLUSH_AT, max_queue)
        self.reads: deque[tuple[StreamKey, Subscription | StreamSubscription, Action]] | None = (
            None  # made when first needed
        )
        self.subscriptions: dict[StreamKey, Subscription | StreamSubscription] = {}
        self.overflowed = False
        self._blocked = False
        self._draining: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._snapshot_jobs: dict[StreamKey, bytes | None] | None = None

    # -- life ------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether a close has been asked for."""
        return self._closing is not None

    def close_soon(self, code: int, reason: str) -> None:
        """Close the connection with `code` (the first reason asked for wins)."""
        if self._closing is None:
            self._closing = asyncio.create_task(
                close_connection(self.connection, code, reason, self._close_timeout),
                name="client-close",
            )

    async def stop(self) -> None:
        """Stop the tasks and wait for the closing handshake (bounded by the close timeout)."""
        tasks = [t for t in (self._draining, self._reading) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, websockets.ConnectionClosed):
            return
        if isinstance(exc, ReaderError):
            log.warning("replay read failed", error=str(exc))
            self.close_soon(CLOSE_UNAVAILABLE, "log unavailable: resume later")
        else:
            log.error("client connection failed", exc_info=exc)
            self.close_soon(CLOSE_UNAVAILABLE, "internal error: resume later")

    # -- sending ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue `data` as one text frame; it is written at the end of this turn of the event
        loop (or at once when many are waiting and the socket takes them)."""
        if not self.overflowed:
            self.send_frame(text_frame(data))

    def send_frame(self, data: bytes) -> None:
        """Queue one whole frame, made by `text_frame` (once for every client it goes to)."""
        if self.overflowed:
            return
        pending = self.pending
        if pending is None:
            self.pending = [data]
            self.pending_bytes = len(data)
            if not self._blocked:
                self._schedule(self)
            return
        pending.append(data)
        self.pending_bytes += len(data)
        if not self._blocked:
            if len(pending) >= self._flush_at or self.pending_bytes >= self._max_queue_bytes:
                self.flush()  # a burst: write now rather than hold it all until the turn ends
            # A client whose socket takes what it is given is never too slow, however much one
            # turn of the loop sends it (a large replay frame, a large page of the tail).
        elif len(pending) > self._max_queue or self.pending_bytes > self._max_queue_bytes:
            # What it could not take is dropped: the log keeps it, the client resumes.
            self.overflowed = True
            self.pending = None
            self.pending_bytes = 0
            self.close_soon(CLOSE_RESUME, "too slow: resume from your last seq")
            log.info("client too slow; asking it to resume", user=self.principal.user_id)

    def error(
        self,
        code: str,
        message: str,
        *,
        job_id: uuid.UUID | None = None,
        request: str | None = None,
    ) -> None:
        error = Error(code=code, message=message, job_id=job_id, request=request)
        self.send(server_encoder.encode(error))

    def flush(self) -> None:
        """Write every pending frame with one write to the socket (unless it is blocked).

        The frames are written as they are, past the protocol object of websockets, which would
        frame each again for each client; it has nothing of its own waiting (its frames are
        written as it makes them), and a frame it writes later goes after these."""
        pending = self.pending
        if pending is None or self._blocked:
            return
        self.pending = None
        self.pending_bytes = 0
        connection = self.connection
        if connection.protocol.state is not State.OPEN:
            return  # closing: what was pending is dropped, the client resumes
        connection.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if connection.paused:
            self._blocked = True
            self._draining = asyncio.create_task(self._drain(), name="client-drain")

    async def _drain(self) -> None:
        try:
            await self.connection.drain()
        except Exception:
            # The connection is lost: nothing more can be written; its handler cleans up.
            self.lost = True
            self.pending = None
            self.pending_bytes = 0
        finally:
            self._blocked = False
        if not self.lost:
            self.flush()

    async def _writable(self) -> bool:
        """Wait until the socket has taken what was written before; False if it never will."""
        while self._blocked:
            draining = self._draining
            if draining is None or draining.done():
                break
            await asyncio.shield(draining)
        return not (self.lost or self.overflowed) and (self.connection.protocol.state is State.OPEN)

    # -- carrying out a subscription's actions ----------------------------------------------

    def dispatch(self, key: StreamKey, actions: list[Action], live: bytes | None = None) -> None:
        """Carry out actions: sends now, reads by the reader task. `live` is the live event the
        actions came from, already encoded and framed (`text_frame`)."""
        for action in actions:
            match action:
                case Send(event=event):
                    if live is not None:
                        self.send_frame(live)
                    else:
                        self.send(encode_event(event))
                case SendPage():
                    raise AssertionError("a replay page is carried out by _replay")
                case SendStatusSync(state=state, seq=seq):
                    assert key[0] == "job"
                    self.send(
                        server_encoder.encode(StatusSync(job_id=key[1], seq=seq, state=state))
                    )
                case SendStreamSync(position=position):
                    self.send(self._stream_sync(key, position))
                case SendCaughtUp(seq=seq):
                    assert key[0] == "job"
                    self.send(server_encoder.encode(CaughtUp(job_id=key[1], seq=seq)))
                    self._caught_up(key)
                case SendStreamCaughtUp(position=position):
                    _, project_id, whole_log = stream_names(key)
                    marker = CaughtUp(project_id=project_id, log=whole_log, position=position)
                    self.send(server_encoder.encode(marker))
                    self._caught_up(key)
                case SendEndOfStream(seq=seq):
                    assert key[0] == "job"
                    self.send(server_encoder.encode(EndOfStream(job_id=key[1], seq=seq)))
                    self.drop(key)
                case ReadSnapshot() | ReadPage() | ReadStreamPage():
                    subscription = self.subscriptions.get(key)
                    if subscription is None:
                        continue
                    if self.reads is None:
                        self.reads = deque()
                    # The read remembers whose it is: a stream unsubscribed and subscribed
                    # again while it runs gets a new machine, which must not see its answer.
                    self.reads.append((key, subscription, action))
                    if self._reading is None or self._reading.done():
                        self._reading = asyncio.create_task(self.read(), name="client-read")
                        self._reading.add_done_callback(self._task_done)

    def _stream_sync(self, key: StreamKey, position: int) -> bytes:
        _, project_id, whole_log = stream_names(key)
        sync = server_encoder.encode(
            StatusSync(project_id=project_id, log=whole_log, position=position)
        )
        jobs = self._snapshot_jobs.pop(key, None) if self._snapshot_jobs else None
        if jobs is None:
            return sync
        # The projection's JSON is spliced in as stored: states are not decoded per client.
        return sync[:-1] + b',"jobs":' + jobs + b"}"

    def drop(self, key: StreamKey) -> None:
        """Forget a subscription (ended, unsubscribed, refused), and the reads it had queued."""
        subscription = self.subscriptions.pop(key, None)
        self._unregister(key, self)
        if self._replays is not None:
            self._replays.pop(key, None)
            if not self._replays:
                self._replays = None
        if subscription is not None and self.reads:
            self.reads = deque(r for r in self.reads if r[1] is not subscription) or None

    def _current(self, key: StreamKey, subscription: Subscription | StreamSubscription) -> bool:
        return self.subscriptions.get(key) is subscription

    async def read(self) -> None:
        """The reader task: the log reads the subscriptions ask for, one at a time, until none
        is left (the next read starts a new task).

        After each read it waits until the socket has taken what was sent before (flow
        control), and only then feeds the answer to the machine and sends what comes of it,
        with no wait in between: a live event can never get ahead of the replay it follows."""
        while self.reads:
            key, subscription, action = self.reads.popleft()
            if not self.reads:
                self.reads = None  # an idle client keeps no empty deque
            if not self._current(key, subscription):
                continue
            if isinstance(subscription, Subscription):
                assert key[0] == "job"
                await self._read_job(key, key[1], subscription, action)
            else:
                await self._read_stream(key, subscription, action)

    async def _read_job(
        self, key: StreamKey, job_id: uuid.UUID, subscription: Subscription, action: Action
    ) -> None:
        if isinstance(action, ReadSnapshot):
            state = await self._reader.job_state(job_id)
            if not await self._writable() or not self._current(key, subscription):
                return
            if state is None or not self.principal.can_read(state.project_id):
                # The same answer for "no such job" and "not yours": existence is not
                # revealed. Nothing of the job was sent: live events wait for the snapshot.
                self.drop(key)
                self.error(
                    "not_found",
                    f"no export {job_id} you may follow",
                    job_id=job_id,
                    request="subscribe",
                )
                return
            self.dispatch(key, subscription.on_snapshot(state))
        elif isinstance(action, ReadPage):
            page = await self._reader.job_page(job_id, action.after_seq, action.limit)
            if not await self._writable() or not self._current(key, subscription):
                return
            self._replay(key, page, subscription.on_page(page.events))

    async def _read_stream(
        self, key: StreamKey, subscription: StreamSubscription, action: Action
    ) -> None:
        project_id = key[1] if key[0] == "project" else None
        assert project_id is None or isinstance(project_id, str)
        if isinstance(action, ReadSnapshot):
            snapshot = await self._reader.stream_snapshot(project_id)
            if not await self._writable() or not self._current(key, subscription):
                return
            if self._snapshot_jobs is None:
                self._snapshot_jobs = {}
            self._snapshot_jobs[key] = snapshot.jobs_json
            self.dispatch(key, subscription.on_snapshot(snapshot.head))
        elif isinstance(action, ReadStreamPage):
            page = await self._reader.stream_page(project_id, action.after_position, action.limit)
            if not await self._writable() or not self._current(key, subscription):
                return
            self._replay(key, page, subscription.on_page(page.events))

    def _replay(self, key: StreamKey, page: Page, actions: list[Action]) -> None:
        """Carry out the machine's actions on a page: its new events go as one frame."""
        for n, action in enumerate(actions):
            if isinstance(action, SendPage):
                self.send(page.frame(action.start, action.stop))
                if self._replays is not None and key in self._replays:
                    self._replays[key][1] += action.stop - action.start
            else:
                self.dispatch(key, actions[n:])  # a page's events come first, the rest after
                return

    def subscribe(
        self, key: StreamKey, after: int | None
    ) -> Subscription | StreamSubscription | None:
        """A new subscription, not started; None (with an error sent) when it exists."""
        if key in self.subscriptions:
            self.error("already_subscribed", "already following that stream")
            return None
        subscription: Subscription | StreamSubscription
        if key[0] == "job":
            subscription = Subscription(key[1], after, page_size=self._page_size)
        else:
            subscription = StreamSubscription(after, page_size=self._page_size)
        self.subscriptions[key] = subscription
        if self.metrics is not None:
            if self._replays is None:
                self._replays = {}
            self._replays[key] = [time.perf_counter(), 0]
        return subscription

    def _caught_up(self, key: StreamKey) -> None:
        """A subscription has caught up: record how long its replay took and how big it was."""
        if self._replays is None or self.metrics is None:
            return
        started = self._replays.pop(key, None)
        if started is not None:
            self.metrics.replayed(time.perf_counter() - started[0], int(started[1]))
        if not self._replays:
            self._replays = None
