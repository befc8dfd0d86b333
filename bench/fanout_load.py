"""The load client of the fan-out benchmark, in a process of its own.

``python -m bench.fanout_load`` prints ``{"pid": …}`` and answers requests on stdin (see
`bench.control`). It holds groups of WebSocket connections to the gateway or to the raw server
and counts what arrives. The client must cost next to nothing, or its own queueing would be what
the latencies measure: each connection is a lean RFC 6455 client written on `asyncio.Protocol`
(uvloop; `Connection`, with `bench.wsclient`), no compression, no pings of its own, no task or
future per frame. A live event is a frame that starts with ``{"jobId":`` (an event envelope),
counted where the bytes arrive (`Connection.data_received`); nothing else is parsed unless
receive times are recorded.

Requests:

    open    group, url, count, kind ("gateway" or "raw"), jobs, token, after_seq,
            concurrency (0: every connection at once), retry, deadline
            connect `count` clients, client i following jobs[i % len(jobs)]; a gateway client
            authenticates, subscribes with `after_seq` and is ready at `export:caught-up`, a raw
            client is ready when its room answers. Answers how long it took (every client's
            time to ready, from the start of the request), retries and errors, the events
            replayed, and how many clients were replayed fewer events than their caught-up
            seq says they have (`short`: a gap in the replay).
    count   live events and other frames received so far, with this process's CPU time
    wait    until `events` live events have arrived (or `timeout`)
    record  on=true: from now keep (job index, seq, receive time) of every live event;
            on=false: stop and answer them
    close   group: close its connections (concurrently)

`Connection` and `FrameLoad` have hooks for another protocol over the same client (`live_prefix`,
`live_seq`, `_other`, `_start`, `_message`; `FrameLoad._client`): `bench.socketio_load` speaks
Engine.IO / Socket.IO through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections import Counter
from typing import Any, ClassVar, Generic, TypeVar, cast

import msgspec

from . import wsclient
from .control import raise_open_files, run_loop, serve
from .wsclient import (
    ConnectionClosedError,
    InvalidMessage,
    ProtocolError,
    WebSocketError,
)

EVENT = b'{"jobId":'
REPLAY = b'{"type":"export:replay"'
CAUGHT_UP = b'{"type":"export:caught-up"'
ERROR = b'{"type":"error"'
SUBSCRIBED = b'{"type":"subscribed"}'
EVENT_ID = b'"eventId"'
_OPEN_FILES = 65536
_OPEN_SECONDS = 30.0
"""Time to connect and complete the WebSocket handshake (websockets' open_timeout, as before)."""
_CLOSE_SECONDS = 2.0
"""How long closing a group waits for the servers to close, before aborting what remains."""
_MAX_HEAD = 1 << 16
_COMPACT = 1 << 16
"""Bytes consumed at the front of a connection's buffer before they are dropped."""

_encoder = msgspec.json.Encoder()


class _Control(msgspec.Struct):
    type: str
    seq: int | None = None
    code: str | None = None
    message: str | None = None


class _Seq(msgspec.Struct):
    seq: int


_control = msgspec.json.Decoder(_Control)
_seq = msgspec.json.Decoder(_Seq)


class Refused(Exception):
    """The server answered, but not what a client of the protocol waits for."""


_ERRORS = (OSError, TimeoutError, WebSocketError, Refused)
"""What a failed client is counted by (type name) in `open`'s errors, and retried after."""

C = TypeVar("C")


class Requests(Generic[C]):
    """The request API over connections of type C: what opening, counting and closing do,
    whatever the connection layer (`_connect`, `_close`)."""

    def __init__(self) -> None:
        self.groups: dict[str, list[C]] = {}
        self.events = 0
        self.other = 0
        self.recording: list[tuple[int, int, float]] | None = None
        self.dropped: Counter[str] = Counter()
        """Connections the server closed while they were listening, by close code."""
        self._target: float = math.inf
        self._reached = asyncio.Event()

    async def _connect(
        self,
        url: str,
        kind: str,
        job: int,
        job_id: str,
        token: str | None,
        after_seq: int | None,
    ) -> tuple[C, float, float, int, int | None]:
        """One client, connected, subscribed to `job_id` and caught up, listening. Returns it,
        when its WebSocket handshake completed, when it was ready (perf_counter), the events
        replayed to it and its caught-up seq."""
        raise NotImplementedError

    async def _close(self, clients: list[C]) -> None:
        raise NotImplementedError

    async def open(
        self,
        group: str,
        url: str,
        count: int,
        kind: str,
        jobs: list[str],
        token: str | None = None,
        after_seq: int | None = None,
        concurrency: int = 64,
        retry: bool = False,
        deadline: float = 60.0,
    ) -> dict[str, Any]:
        clients = self.groups.setdefault(group, [])
        gate = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        errors: Counter[str] = Counter()
        handshakes: list[float] = []
        ready: list[float] = []
        seqs: list[int] = []
        replayed = attempts = short = 0
        started = time.perf_counter()

        async def one(index: int) -> None:
            nonlocal replayed, attempts, short
            job = index % len(jobs)
            while True:
                attempts += 1
                try:
                    async with gate if gate is not None else contextlib.nullcontext():
                        remaining = deadline - (time.perf_counter() - started)
                        async with asyncio.timeout(max(remaining, 0.001)):
                            client, opened, at, events, seq = await self._connect(
                                url, kind, job, jobs[job], token, after_seq
                            )
                except _ERRORS as exc:
                    errors[type(exc).__name__] += 1
                    if not retry or time.perf_counter() - started >= deadline:
                        return
                    # What a browser does: back off a little, with jitter, and try again.
                    await asyncio.sleep(0.1 + 0.4 * random.random())
                    continue
                break
            handshakes.append(opened - started)
            ready.append(at - started)
            replayed += events
            if seq is not None:
                seqs.append(seq)
                # Caught up at `seq` after `after_seq`: every seq in between must have come.
                if events < seq - (after_seq or seq):
                    short += 1
            clients.append(client)

        await asyncio.gather(*(one(i) for i in range(count)))
        ready.sort()
        return {
            "opened": len(ready),
            "failed": count - len(ready),
            "attempts": attempts,
            "errors": dict(errors),
            "seconds": time.perf_counter() - started,
            "last_handshake": max(handshakes, default=None),
            "ready": ready,
            "replayed": replayed,
            "short": short,
            "caught_up_seq": [min(seqs), max(seqs)] if seqs else None,
        }

    async def count(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "other": self.other,
            "time": time.time(),
            "cpu": time.process_time(),
            "connections": sum(len(clients) for clients in self.groups.values()),
            "dropped": dict(self.dropped),
        }

    async def wait(self, events: int, timeout: float) -> dict[str, Any]:
        if self.events < events:
            self._target = events
            self._reached.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._reached.wait()
            except TimeoutError:
                pass
            finally:
                self._target = math.inf
        return {"events": self.events, "reached": self.events >= events}

    async def record(self, on: bool) -> dict[str, Any]:
        if on:
            self.recording = []
            return {}
        records, self.recording = self.recording or [], None
        return {"records": records}

    async def close(self, group: str) -> dict[str, Any]:
        clients = self.groups.pop(group, [])
        started = time.perf_counter()
        await self._close(clients)
        return {"closed": len(clients), "seconds": time.perf_counter() - started}

    async def close_all(self) -> None:
        for group in list(self.groups):
            await self.close(group)


# --------------------------------------------------------------------------- the lean client

# Where a connection is: waiting for the 101, then (gateway) for `authenticated` and for
# `export:caught-up`, or (raw) for `subscribed`; then listening, until closed.
_HTTP, _AUTH, _CATCHING_UP, _SUBSCRIBING, _LISTENING, _CLOSED = range(6)


class Connection(asyncio.Protocol):
    """One client connection of `FrameLoad`: the handshake, then counting frames.

    Hooks for another protocol: `live_prefix` and `live_seq` (what a live event starts with,
    and its seq), `_other` (a whole message that is not one, while listening), `_start` (the
    WebSocket is open) and `_message` (the messages of the handshake phases)."""

    live_prefix: ClassVar[bytes] = EVENT
    """What the payload of a live event starts with: the one test per frame."""

    __slots__ = (
        "buf",
        "close_sent",
        "closing",
        "first",
        "fragments",
        "job",
        "key",
        "kind",
        "load",
        "lost",
        "opened",
        "pos",
        "ready",
        "ready_at",
        "replayed",
        "request",
        "seq",
        "state",
        "subscribe",
        "transport",
        "upgraded",
    )

    def __init__(
        self,
        load: FrameLoad,
        request: bytes,
        key: bytes,
        job: int,
        first: bytes,
        subscribe: bytes | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.load = load
        self.request: bytes | None = request
        self.key = key
        self.job = job
        self.first = first
        """The message sent on upgrade: the auth (gateway), or the subscribe (raw)."""
        self.subscribe = subscribe
        """The gateway's subscribe, sent once authenticated."""
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pos = 0
        """Where the unparsed bytes of `buf` start."""
        self.state = _HTTP
        self.fragments: bytearray | None = None
        """The message being reassembled from continuation frames."""
        self.closing = False
        """Closed on our side: the server's close is not a drop."""
        self.close_sent = False
        self.opened = 0.0
        self.ready_at = 0.0
        self.replayed = 0
        self.seq: int | None = None
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    @staticmethod
    def live_seq(payload: bytes | bytearray) -> int:
        """The seq of a live event (only decoded while recording)."""
        return _seq.decode(payload).seq

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        if self.request is not None:
            self.transport.write(self.request)
            self.request = None

    def data_received(self, data: bytes) -> None:
        state = self.state
        buf = self.buf
        view: bytes | bytearray
        if state == _LISTENING and not buf:
            # The usual case: whole frames, parsed where uvloop put them.
            view, pos = data, 0
        elif state == _CLOSED:
            return
        else:
            buf += data
            view, pos = buf, self.pos
            if state == _HTTP:
                if not self._upgrade():
                    return
                pos = self.pos
        end = len(view)
        load = self.load
        recording = load.recording
        prefix = self.live_prefix
        received = 0.0
        events = other = 0
        plain = self.state == _LISTENING and self.fragments is None
        while True:
            left = end - pos
            if left < 2:
                break
            head = view[pos]
            size = view[pos + 1]
            if size < 126:
                start = pos + 2
            elif size == 126:
                if left < 4:
                    break
                size = view[pos + 2] << 8 | view[pos + 3]
                start = pos + 4
            elif size == 127:
                if left < 10:
                    break
                size = int.from_bytes(view[pos + 2 : pos + 10], "big")
                start = pos + 10
            else:
                self._violation("masked frame from the server")
                break
            stop = start + size
            if stop > end:
                break
            if plain and (head == 0x81 or head == 0x82):
                if view.startswith(prefix, start, stop):
                    events += 1
                    if recording is not None:
                        if not received:
                            received = time.time()
                        seq = self.live_seq(view[start:stop])
                        recording.append((self.job, seq, received))
                elif self._other(view[start:stop]):
                    other += 1
            else:
                self._frame(head, view[start:stop])
                if self.state == _CLOSED:
                    break
                plain = self.state == _LISTENING and self.fragments is None
            pos = stop
        if events:
            load.events += events
            if load.events >= load._target:
                load._reached.set()
        if other:
            load.other += other
        if self.state == _CLOSED:
            buf.clear()
        elif view is buf:
            if pos >= end:
                buf.clear()
                self.pos = 0
            elif pos > _COMPACT:
                del buf[:pos]
                self.pos = 0
            else:
                self.pos = pos
        elif pos < end:
            buf += memoryview(data)[pos:]
            self.pos = 0

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if state == _HTTP:
            self._fail(exc or InvalidMessage("connection closed before the upgrade response"))
        elif state < _LISTENING:
            self._fail(exc or ConnectionClosedError("closed by the server during the handshake"))
        elif state == _LISTENING and not self.closing:
            self.load.dropped["none"] += 1
        self.state = _CLOSED
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    # -- frames and messages (not the per-frame path of live events) -----------------------

    def _upgrade(self) -> bool:
        """Parse the server's answer to the upgrade request once whole: True when the
        connection is open (the unparsed bytes of `buf` start at `pos`)."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._fail(InvalidMessage("response head too long"))
            return False
        try:
            wsclient.check_upgrade(bytes(buf[:end]), self.key)
        except WebSocketError as exc:
            self._fail(exc)
            return False
        self.opened = time.perf_counter()
        self.pos = end + 4
        self._start()
        if not self.upgraded.done():
            self.upgraded.set_result(None)
        return True

    def _start(self) -> None:
        """The WebSocket is open: the first step of the handshake."""
        self.state = _AUTH if self.subscribe is not None else _SUBSCRIBING
        self._send(wsclient.TEXT, self.first)

    def _other(self, message: bytes | bytearray) -> bool:
        """A whole message that is not a live event, while listening: True to count it."""
        return True

    def _frame(self, head: int, payload: bytes | bytearray) -> None:
        """A frame other than a whole text or binary message while listening."""
        if head & 0x70:
            self._violation("reserved bits set without an extension")
            return
        opcode = head & 0x0F
        final = head & 0x80
        if opcode >= 0x8:
            if not final or len(payload) > 125:
                self._violation("fragmented or long control frame")
            elif opcode == wsclient.PING:
                self._send(wsclient.PONG, bytes(payload))
            elif opcode == wsclient.CLOSE:
                self._closed_by_server(payload)
            elif opcode != wsclient.PONG:
                self._violation(f"unknown opcode {opcode}")
            return
        if opcode == wsclient.CONTINUATION:
            if self.fragments is None:
                self._violation("continuation frame without a message")
                return
            self.fragments += payload
            if final:
                payload, self.fragments = self.fragments, None
                self._message(payload)
        elif opcode == wsclient.TEXT or opcode == wsclient.BINARY:
            if self.fragments is not None:
                self._violation("new message inside a fragmented one")
            elif final:
                self._message(payload)
            else:
                self.fragments = bytearray(payload)
        else:
            self._violation(f"unknown opcode {opcode}")

    def _message(self, message: bytes | bytearray) -> None:
        state = self.state
        load = self.load
        if state == _LISTENING:
            if message.startswith(self.live_prefix):
                load.events += 1
                if load.events >= load._target:
                    load._reached.set()
                if load.recording is not None:
                    load.recording.append((self.job, self.live_seq(message), time.time()))
            elif self._other(message):
                load.other += 1
            return
        try:
            if state == _CATCHING_UP:
                if message.startswith(REPLAY):
                    self.replayed += message.count(EVENT_ID)
                elif message.startswith(CAUGHT_UP):
                    self.seq = _control.decode(message).seq
                    self._ready()
                elif message.startswith(ERROR):
                    error = _control.decode(message)
                    self._fail(Refused(f"{error.code}: {error.message}"))
            elif state == _AUTH:
                answer = _control.decode(message)
                if answer.type != "authenticated":
                    self._fail(Refused(f"auth answered {answer.type}: {answer.message}"))
                elif self.subscribe is not None:
                    self._send(wsclient.TEXT, self.subscribe)
                    self.state = _CATCHING_UP
            elif state == _SUBSCRIBING:
                if message == SUBSCRIBED:
                    self._ready()
                else:
                    self._fail(Refused("the raw server did not confirm the room"))
        except msgspec.DecodeError as exc:
            self._fail(Refused(f"unexpected answer {bytes(message[:80])!r}: {exc}"))

    def _ready(self) -> None:
        self.ready_at = time.perf_counter()
        self.state = _LISTENING
        if not self.ready.done():
            self.ready.set_result(None)

    def _closed_by_server(self, payload: bytes | bytearray) -> None:
        try:
            code = wsclient.parse_close(payload)
        except ProtocolError as exc:
            self._violation(str(exc))
            return
        if self.state < _LISTENING:
            self._fail(ConnectionClosedError(f"closed by the server: {code}"))
            return
        if not self.closing:
            self.load.dropped[str(code)] += 1
        if not self.close_sent:
            self._send(wsclient.CLOSE, wsclient.close_payload(code))
            self.close_sent = True
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def _violation(self, what: str) -> None:
        if self.state < _LISTENING:
            self._fail(ProtocolError(what))
            return
        if self.state == _LISTENING and not self.closing:
            self.load.dropped["protocol error"] += 1
        self._send(wsclient.CLOSE, wsclient.close_payload(1002))
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wsclient.frame(opcode, payload))

    def _fail(self, exc: BaseException) -> None:
        """The handshake failed: the waiting `_connect` raises `exc`."""
        for waiter in (self.upgraded, self.ready):
            if not waiter.done():
                waiter.set_exception(exc)
                break
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    # -- the load's side -------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now (nobody waits for it any longer)."""
        for waiter in (self.upgraded, self.ready):
            waiter.cancel()
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Start the closing handshake (code 1000); `lost` is done once the server closed."""
        self.closing = True
        if self.state == _CLOSED or self.transport is None:
            return
        if not self.close_sent:
            self._send(wsclient.CLOSE, wsclient.close_payload(1000))
            self.close_sent = True


class FrameLoad(Requests[Connection]):
    """The requests over lean connections (`Connection`): this module's load client. `_client`
    is the hook of another protocol: the connection to open, and where."""

    def _client(
        self,
        url: str,
        kind: str,
        job: int,
        job_id: str,
        token: str | None,
        after_seq: int | None,
    ) -> tuple[Connection, wsclient.Target]:
        where = wsclient.target(url)
        key = wsclient.new_key()
        subscribe: dict[str, Any] = {"type": "subscribe", "jobId": job_id}
        if kind == "raw":
            first, then = _encoder.encode(subscribe), None
        else:
            if after_seq is not None:
                subscribe["afterSeq"] = after_seq
            first = _encoder.encode({"type": "auth", "token": token})
            then = _encoder.encode(subscribe)
        client = Connection(self, wsclient.upgrade_request(where, key), key, job, first, then)
        return client, where

    async def _connect(
        self,
        url: str,
        kind: str,
        job: int,
        job_id: str,
        token: str | None,
        after_seq: int | None,
    ) -> tuple[Connection, float, float, int, int | None]:
        client, where = self._client(url, kind, job, job_id, token, after_seq)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_OPEN_SECONDS):
                await loop.create_connection(lambda: client, where.host, where.port)
                await client.upgraded
            await client.ready
        except BaseException:
            client.abort()
            raise
        return client, client.opened, client.ready_at, client.replayed, client.seq

    async def _close(self, clients: list[Connection]) -> None:
        for client in clients:
            client.close()
        pending = [client.lost for client in clients if not client.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_SECONDS)
        for client in clients:
            if not client.lost.done():
                client.abort()


async def main() -> None:
    raise_open_files(_OPEN_FILES)
    load = FrameLoad()
    try:
        await serve(
            {
                "open": load.open,
                "count": load.count,
                "wait": load.wait,
                "record": load.record,
                "close": load.close,
            },
            hello={"pid": os.getpid()},
        )
    finally:
        await load.close_all()


if __name__ == "__main__":
    run_loop(main())
