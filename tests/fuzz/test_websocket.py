"""The gateway's WebSocket protocol fuzzed with hypothesis, against a real gateway.

One gateway serves the whole module, from a loop thread of its own. Beside it runs a
well-behaved client: it follows one job from seq 0 while a writer appends an event to that job
every 50 ms. Each example opens a fresh connection and sends what hypothesis draws: valid
client messages with fields removed, retyped, made huge or nested deep; random JSON; text that
is not JSON; binary frames; text frames that are not UTF-8; fragmented messages; floods; raw
frames that break the WebSocket protocol. Then it pings and reads until the pong, or until the
gateway closes the connection. The properties, after every example:

- everything the gateway sends is a server message or an event envelope of the protocol, and
  every `error` carries a documented code (`schemas.asyncapi.ERROR_CODES`);
- a connection the gateway closes is closed with a documented code
  (`schemas.asyncapi.CLOSE_CODES`), never dropped without one, and never with 1011 (the log
  could not be read: the database is up, so only input can have broken the read);
- the gateway logs no error and no unhandled exception, and keeps running;
- the well-behaved client has received every event appended so far, once, in order, within
  two seconds of its commit, and its connection was never closed.

The examples are derandomized (no example database), so a CI run tries the same inputs every
time; the module runs in about 15 s. Inputs that once broke the gateway are tried first, as
explicit examples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import operator
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import websockets
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from schemas.asyncapi import CLOSE_CODES, ERROR_CODES
from schemas.events import decode_event
from schemas.wire import Error, ServerMessage
from services.common.auth import issue_token
from services.common.db import create_pool
from services.common.eventlog import EventLog
from services.gateway.clients import CLOSE_UNAVAILABLE
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.fuzz.conftest import ErrorLog, LoopThread
from tests.support import new_job, progress, unpack

SECRET = "fuzz-gateway-secret-long-enough-for-hs256"
MAX_MESSAGE = 16384
"""Larger than the default: nesting deep enough to overflow the stack must fit in a message even
while hypothesis runs, which raises the interpreter's recursion limit by 2,000 frames."""
BURST = 40
PROJECT = "p1"
LATENCY = 2.0
"""Seconds within which the well-behaved client must receive each event."""
WRITE_EVERY = 0.05
"""Seconds between two events of the well-behaved client's job."""
DOCUMENTED_CLOSES = frozenset(code.code for code in CLOSE_CODES) - {CLOSE_UNAVAILABLE}
"""What the gateway may close a fuzzing connection with. 1011 says the log could not be read:
the database is up throughout, so here it could only mean that input broke a read."""
QUIET = 0.03
QUIET_MAX = 0.3
"""Seconds of silence after the pong that end an exchange, and the most it waits for them."""
SETTINGS = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

_server_messages = msgspec.json.Decoder(ServerMessage)

# The gateway's thread draws from `random` (websockets' keepalive pings) while hypothesis draws
# examples in this one; hypothesis takes that for a strategy using `random`, which none does.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)


def _token(user: str, **kwargs: Any) -> str:
    return issue_token(SECRET, user, **{"projects": [PROJECT], **kwargs})


# -- the well-behaved client and the job it follows ----------------------------------------------


@dataclass
class Bystander:
    """A client that follows one job while events are appended to it, and what it saw."""

    url: str
    database_url: str
    job_id: uuid.UUID | None = None
    appended: dict[int, float] = field(default_factory=dict)
    """seq → when its append committed (monotonic)."""
    received: list[tuple[int, float]] = field(default_factory=list)
    """(seq, when it arrived), in arrival order."""
    closed: BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        pool = await create_pool(self.database_url, min_size=1, max_size=2)
        try:
            log = EventLog(pool)
            self.job_id = await new_job(log, project=PROJECT, owner="bystander")
            async with websockets.connect(self.url) as ws:
                await ws.send(json.dumps({"type": "auth", "token": _token("bystander")}))
                await ws.send(
                    json.dumps({"type": "subscribe", "jobId": str(self.job_id), "afterSeq": 0})
                )
                writer = asyncio.create_task(self._write(log))
                try:
                    await self._read(ws)
                finally:
                    writer.cancel()
        finally:
            await pool.close()

    async def _write(self, log: EventLog) -> None:
        assert self.job_id is not None
        await self.ready.wait()
        seq = 2
        while True:
            await log.append(self.job_id, seq, [progress(min(seq / 100, 99.0))])
            seq += 1
            self.appended[seq] = time.monotonic()
            await asyncio.sleep(WRITE_EVERY)

    async def _read(self, ws: websockets.ClientConnection) -> None:
        try:
            async for raw in ws:
                for message in unpack(json.loads(raw)):
                    if "eventId" in message:
                        self.received.append((message["seq"], time.monotonic()))
                    elif message["type"] == "export:caught-up":
                        self.ready.set()
        except websockets.ConnectionClosed as exc:
            self.closed = exc
            raise
        self.closed = ConnectionError("the gateway ended the connection")

    def latencies(self) -> list[float]:
        appended = dict(self.appended)
        return [at - appended[seq] for seq, at in list(self.received) if seq in appended]

    def check(self) -> None:
        """Everything appended so far has arrived once, in order, and in time."""
        assert self.closed is None, f"the well-behaved client was disconnected: {self.closed!r}"
        appended = dict(self.appended)
        received = list(self.received)
        seqs = [seq for seq, _ in received]
        assert seqs == list(range(1, len(seqs) + 1)), f"a gap or a duplicate: {seqs}"
        now = time.monotonic()
        for seq, at in received:
            if seq in appended:
                assert at - appended[seq] < LATENCY, f"seq {seq} took {at - appended[seq]:.2f} s"
        late = [seq for seq, at in appended.items() if seq > len(seqs) and now - at > LATENCY]
        assert not late, f"appended more than {LATENCY} s ago and not received: {late}"


@dataclass
class Stack:
    gateway: Gateway
    thread: LoopThread
    bystander: Bystander
    errors: ErrorLog
    url: str

    def check(self) -> None:
        """The gateway runs, has logged no error since the last check, and the well-behaved
        client is served."""
        assert self.thread.alive, "the gateway's event loop has stopped"
        errors = self.errors.take()
        assert not errors, "\n".join(errors)
        self.bystander.check()


@pytest.fixture(scope="module")
def stack(module_database_url: str, error_log: ErrorLog) -> Iterator[Stack]:
    thread = LoopThread("gateway")
    config = GatewayConfig(
        database_url=module_database_url,
        port=0,
        jwt_secret=SECRET,
        poll_interval=0.2,
        # Nothing listens there: a forwarded cancel is answered `unavailable`.
        export_url="http://127.0.0.1:9",
        max_message_bytes=MAX_MESSAGE,
        message_burst=BURST,
        max_subscriptions=10,
        max_connections_per_user=20,
        close_timeout=1.0,
        auth_timeout=5.0,
    )
    gateway = Gateway(config)
    thread.run(gateway.start())
    url = f"ws://127.0.0.1:{gateway.port}/ws"
    bystander = Bystander(url, module_database_url)
    running = thread.submit(bystander.run())
    deadline = time.monotonic() + 10
    while len(bystander.received) < 3:  # caught up, and live events arriving
        assert not running.done(), running.exception()
        assert time.monotonic() < deadline, "the well-behaved client never caught up"
        time.sleep(0.02)
    stack = Stack(gateway, thread, bystander, error_log, url)
    try:
        yield stack
        stack.check()
    finally:
        running.cancel()
        thread.run(gateway.close())
        thread.close()


# -- what the fuzzing client sends ---------------------------------------------------------------

UNKNOWN_JOB = uuid.UUID("5e1f0000-0000-4000-8000-000000000000")
OTHER_PROJECT = "p2"
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["", "subscribe", "export:cancel", "*", "../p1", "p1\x00", "\ud800"])
)
JSON = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class Nested:
    """JSON text nested deeper than Python's own json module can write (or read)."""

    text: str


def nested(depth: int, kind: str, leaf: Any = 0) -> Nested:
    """`leaf` inside `depth` lists, objects, or both in turn."""
    opening = "".join(
        "[" if kind == "list" or (kind == "both" and level % 2 == 0) else '{"a":'
        for level in range(depth)
    )
    closing = "".join("]" if c == "[" else "}" for c in reversed(opening.replace('{"a":', "{")))
    return Nested(opening + _encode(leaf) + closing)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested deeply: lists, objects or both, up to (and beyond) what fits in a message."""
    depth = draw(st.integers(1, MAX_MESSAGE // 2))
    return nested(depth, draw(st.sampled_from(["list", "object", "both"])), draw(LEAVES))


@st.composite
def valid_messages(
    draw: st.DrawFn, job_id: uuid.UUID, tokens: st.SearchStrategy[str]
) -> dict[str, Any]:
    jobs = st.sampled_from([str(job_id), str(UNKNOWN_JOB)])
    projects = st.sampled_from([PROJECT, OTHER_PROJECT])
    cursors = st.integers(0, 2**31)
    return draw(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("subscribe"), "jobId": jobs})
            | st.fixed_dictionaries(
                {"type": st.just("subscribe"), "jobId": jobs, "afterSeq": cursors}
            ),
            st.fixed_dictionaries(
                {"type": st.just("subscribe"), "projectId": projects, "afterPosition": cursors}
            ),
            st.fixed_dictionaries(
                {"type": st.just("subscribe"), "log": st.just(True), "afterPosition": cursors}
            ),
            st.fixed_dictionaries({"type": st.just("unsubscribe"), "jobId": jobs}),
            st.fixed_dictionaries({"type": st.just("unsubscribe"), "projectId": projects}),
            st.fixed_dictionaries({"type": st.just("export:cancel"), "jobId": jobs}),
            st.just({"type": "ping"}),
            st.fixed_dictionaries({"type": st.just("auth"), "token": tokens}),
        )
    )


@st.composite
def mutated(draw: st.DrawFn, job_id: uuid.UUID, tokens: st.SearchStrategy[str]) -> Any:
    """A valid message, then a few changes: a field removed, retyped, huge, nested or added."""
    message = draw(valid_messages(job_id, tokens))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*message, "type", "extra"]))
        change = draw(st.sampled_from(["remove", "retype", "huge", "deep", "number"]))
        if change == "remove":
            message.pop(key, None)
        elif change == "retype":
            message[key] = draw(JSON)
        elif change == "huge":
            message[key] = draw(st.sampled_from(["x", "é", "\u2603"])) * draw(
                st.integers(1000, MAX_MESSAGE)
            )
        elif change == "deep":
            message[key] = draw(deep())
        else:
            message[key] = draw(st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**40, 1e308]))
    return message


@dataclass(frozen=True)
class Frame:
    """One thing to put on the socket: a message, or bytes written as they are."""

    data: str | bytes | list[bytes]
    text: bool | None = None
    raw: bool = False
    """`data` is written to the socket as it is: a frame the client library would never send."""
    client_close: int | None = None
    """The code of a raw close frame: the gateway answers it with the same code."""

    def send(self, ws: ClientConnection) -> None:
        if self.raw:
            assert isinstance(self.data, bytes)
            ws.socket.sendall(self.data)
        elif isinstance(self.data, list):
            ws.send(iter(self.data), text=self.text)
        elif isinstance(self.data, str):
            # A lone surrogate has no UTF-8: it goes out as the bytes Python would give it.
            ws.send(_utf8(self.data), text=True)
        else:
            ws.send(self.data, text=self.text)


def _encode(value: Any) -> str:
    """JSON text of `value`, with the text of any `Nested` in it spliced in."""
    spliced: list[str] = []

    def placeholder(node: Any) -> Any:
        if isinstance(node, Nested):
            spliced.append(node.text)
            return f"\u0000nested-{len(spliced) - 1}"
        if isinstance(node, dict):
            return {key: placeholder(value) for key, value in node.items()}
        if isinstance(node, list):
            return [placeholder(value) for value in node]
        return node

    text = json.dumps(placeholder(value), ensure_ascii=False, allow_nan=True)
    for index, inner in enumerate(spliced):
        text = text.replace(json.dumps(f"\u0000nested-{index}"), inner, 1)
    return text


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def raw_frames(draw: st.DrawFn) -> Frame:
    """A frame written by hand: any opcode, reserved bits, masked or not, fragmented or not,
    a length that says more than the limit allows."""
    fin = draw(st.booleans())
    rsv = draw(st.integers(0, 7))
    opcode = draw(st.integers(0, 15))
    masked = draw(st.booleans())
    payload = draw(st.binary(max_size=200))
    first = (fin << 7) | (rsv << 4) | opcode
    length = len(payload)
    client_close = int.from_bytes(payload[:2], "big") if opcode == 8 and length >= 2 else None
    if draw(st.integers(0, 9)) == 0:
        header = struct.pack("!BBQ", first, 0x80 | 127, 2**40)  # a length far over the limit
        return Frame(header, raw=True)
    if length < 126:
        header = struct.pack("!BB", first, (masked << 7) | length)
    else:
        header = struct.pack("!BBH", first, (masked << 7) | 126, length)
    if masked:
        key = draw(st.binary(min_size=4, max_size=4))
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        header += key
    return Frame(header + payload, raw=True, client_close=client_close)


def frames(job_id: uuid.UUID, tokens: st.SearchStrategy[str]) -> st.SearchStrategy[Frame]:
    valid = valid_messages(job_id, tokens)
    changed = mutated(job_id, tokens)
    return st.one_of(
        # As a client would send them, then changed, as text and as binary frames.
        valid.map(lambda v: Frame(_encode(v))),
        changed.map(lambda v: Frame(_encode(v))),
        changed.map(lambda v: Frame(_encode(v))),
        changed.map(lambda v: Frame(_utf8(_encode(v)), text=False)),
        # Any JSON, deep JSON, text that is not JSON, bytes.
        (JSON | deep()).map(lambda v: Frame(_encode(v))),
        st.text(max_size=100).map(Frame),
        st.binary(max_size=200).map(lambda b: Frame(b, text=False)),
        # Not UTF-8, in a text frame.
        st.binary(min_size=1, max_size=50).map(lambda b: Frame(b + b"\xff\xfe", text=True)),
        # A message in fragments, possibly over the limit once put together.
        st.lists(st.binary(max_size=3000), min_size=2, max_size=4).map(
            lambda parts: Frame(parts, text=False)
        ),
        st.integers(MAX_MESSAGE + 1, 4 * MAX_MESSAGE).map(lambda n: Frame("x" * n)),
    )


# -- one fuzzing connection ----------------------------------------------------------------------


@dataclass
class Exchange:
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    """The code the gateway closed the connection with; None while it is open."""


def _check_message(raw: str | bytes) -> list[dict[str, Any]]:
    assert isinstance(raw, str), f"a binary frame from the gateway: {raw!r}"
    decoded = json.loads(raw)
    assert isinstance(decoded, dict), raw
    if "eventId" in decoded:
        decode_event(raw)
    elif decoded.get("type") == "export:replay":
        # Events in a replay frame are envelopes, each read as a live event would be.
        for event in decoded["events"]:
            decode_event(json.dumps(event))
        assert set(decoded) <= {"type", "jobId", "projectId", "log", "events"}, decoded
    else:
        message = _server_messages.decode(raw)
        if isinstance(message, Error):
            assert message.code in ERROR_CODES, f"undocumented error code: {raw}"
    return unpack(decoded)


def exchange(url: str, first: Frame | None, token: str | None, sent: list[Frame]) -> Exchange:
    """Connect, authenticate (or send `first` instead), send `sent`, ping, and read until the
    pong or the close; every message read is checked."""
    result = Exchange()
    with connect(url, open_timeout=5, close_timeout=2, max_size=None) as ws:
        reset = False
        try:
            if first is not None:
                first.send(ws)
            if token is not None:
                ws.send(_encode({"type": "auth", "token": token}))
            for frame in sent:
                frame.send(ws)
            ws.send('{"type": "ping"}')
        except websockets.ConnectionClosed:
            pass  # the gateway closed the connection: what it sent before is read below
        except OSError:
            # The gateway closed the connection while a long message was still being written:
            # the kernel answers the rest with a reset, which may discard what the gateway
            # sent last, its close frame included.
            reset = True
        try:
            deadline = time.monotonic() + 5
            while True:
                remaining = deadline - time.monotonic()
                try:
                    messages = _check_message(ws.recv(timeout=max(remaining, 0)))
                except TimeoutError:
                    raise AssertionError("neither a pong nor a close within 5 s") from None
                result.messages += messages
                if any(m.get("type") == "pong" for m in messages):
                    break
            # What the subscriptions answer after their reads comes after the pong: read on
            # until the gateway has been quiet for a moment.
            deadline = time.monotonic() + QUIET_MAX
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < deadline:
                    result.messages += _check_message(ws.recv(timeout=QUIET))
        except websockets.ConnectionClosed:
            rcvd = ws.protocol.close_rcvd
            if rcvd is None:
                assert reset, "the gateway dropped the connection without a close code"
            else:
                result.close_code = rcvd.code
    return result


SEEN: collections.Counter[str] = collections.Counter()
"""What the fuzzing provoked: "close 4029", "error invalid_message", "export:status-sync"…"""


def _assert_documented_close(result: Exchange, *, client_closed: int | None = None) -> None:
    SEEN.update(
        f"error {m['code']}" if m.get("type") == "error" else str(m.get("type"))
        for m in result.messages
    )
    SEEN[f"close {result.close_code}"] += 1
    if result.close_code is not None and result.close_code != client_closed:
        assert result.close_code in DOCUMENTED_CLOSES, f"undocumented close {result.close_code}"


USER = _token("fuzzer")
"""Reads and changes project p1, where the well-behaved client's job is."""
AUDITOR = _token("fuzz-auditor", projects=[], roles=["auditor"])
SERVICE = _token("fuzz-service", projects=["*"], roles=["service"])
TOKENS = st.sampled_from([USER, AUDITOR, SERVICE])
BAD_TOKENS = st.sampled_from(
    [
        _token("fuzzer", ttl=-60),
        issue_token("another-secret-that-is-long-enough!", "fuzzer", projects=[PROJECT]),
        "not.a.token",
        "",
    ]
)

# Inputs that once crashed a connection's handler, lost its close code or failed a read of the
# log, tried first every time.
TOO_DEEP = Frame(_encode({"type": "subscribe", "log": True, "x": nested(6000, "list")}))
NOT_UTF8 = Frame(b'{"type": "ping"}\xff', text=True)
LONG_REASON = Frame(_encode({"type": "\u00e9" * 200}))
"""Refused before authentication with a reason longer than a close frame holds in UTF-8."""
NUL_PROJECT = Frame(_encode({"type": "subscribe", "projectId": "p1\u0000", "afterPosition": 0}))
"""A project id PostgreSQL cannot take as text."""


# -- the tests -----------------------------------------------------------------------------------


def test_messages_after_authentication(stack: Stack) -> None:
    job_id = stack.bystander.job_id
    assert job_id is not None

    # A few valid messages first (subscriptions for what follows to meet), then anything.
    opening = st.lists(valid_messages(job_id, TOKENS).map(lambda v: Frame(_encode(v))), max_size=3)
    anything = st.lists(frames(job_id, TOKENS), min_size=1, max_size=5)

    @settings(SETTINGS, max_examples=300)
    @given(token=TOKENS, sent=st.builds(operator.add, opening, anything))
    @example(token=USER, sent=[TOO_DEEP])
    @example(token=USER, sent=[NOT_UTF8])
    @example(token=SERVICE, sent=[NUL_PROJECT])
    def fuzz(token: str, sent: list[Frame]) -> None:
        result = exchange(stack.url, None, token, sent)
        if result.messages:
            assert result.messages[0]["type"] == "authenticated", result.messages[0]
        _assert_documented_close(result)
        stack.check()

    fuzz()


def test_the_first_message_must_authenticate(stack: Stack) -> None:
    job_id = stack.bystander.job_id
    assert job_id is not None

    @settings(SETTINGS, max_examples=60)
    @given(first=frames(job_id, BAD_TOKENS), token=st.none() | BAD_TOKENS)
    @example(first=TOO_DEEP, token=None)
    @example(first=LONG_REASON, token=None)
    def fuzz(first: Frame, token: str | None) -> None:
        result = exchange(stack.url, first, token, [])
        # Nothing is accepted before a valid token: the only answer is a close.
        assert all(m.get("type") != "authenticated" for m in result.messages), result
        assert result.close_code is not None, "an unauthenticated connection stayed open"
        _assert_documented_close(result)
        stack.check()

    fuzz()


def test_raw_frames_that_break_the_websocket_protocol(stack: Stack) -> None:
    @settings(SETTINGS, max_examples=80)
    @given(token=TOKENS, frame=raw_frames())
    def fuzz(token: str, frame: Frame) -> None:
        result = exchange(stack.url, None, token, [frame])
        # A well-formed close frame of the client's own is answered with its code.
        _assert_documented_close(result, client_closed=frame.client_close)
        stack.check()

    fuzz()


def test_text_that_is_not_utf8_is_closed_with_1007(stack: Stack) -> None:
    job_id = stack.bystander.job_id
    message = '{"type": "\ud800", "jobId": "' + str(job_id) + '"}'  # a lone surrogate
    assert not _is_utf8(message)
    result = exchange(stack.url, None, USER, [Frame(message)] * 3)
    assert result.close_code == 1007, result.close_code
    _assert_documented_close(result)
    stack.check()


def test_floods_are_closed_with_the_limit_code(stack: Stack) -> None:
    job_id = stack.bystander.job_id
    assert job_id is not None

    @settings(SETTINGS, max_examples=8)
    @given(
        token=TOKENS,
        message=mutated(job_id, TOKENS).map(_encode),
        count=st.integers(3 * BURST, 5 * BURST),
    )
    def fuzz(token: str, message: str, count: int) -> None:
        assume(len(_utf8(message)) <= MAX_MESSAGE)
        # A text frame that is not UTF-8 (a lone surrogate) is closed with 1007 at the first
        # frame, before any rate is counted (test_text_that_is_not_utf8_is_closed_with_1007).
        assume(_is_utf8(message))
        result = exchange(stack.url, None, token, [Frame(message)] * count)
        assert result.close_code == 4029, result.close_code
        _assert_documented_close(result)
        stack.check()

    fuzz()


def test_json_nested_deeper_than_the_stack_is_an_invalid_message(stack: Stack) -> None:
    """Outside hypothesis, at the interpreter's usual recursion limit: 1,500 levels (3 kB) are
    deeper than a decoder can follow, and must be refused like any malformed message."""
    deep_subscribe = Frame(_encode({"type": "subscribe", "log": True, "x": nested(1500, "list")}))
    for first, token in ((None, USER), (deep_subscribe, None)):
        result = exchange(stack.url, first, token, [deep_subscribe] if token else [])
        if token:
            assert result.close_code is None
            assert result.messages[1] == {
                "type": "error",
                "code": "invalid_message",
                "message": "JSON nested too deeply",
            }
        else:
            assert result.close_code == 4001
    stack.check()


def test_the_fuzzing_provoked_every_kind_of_refusal(stack: Stack) -> None:
    """Inputs that never got past the decoder would prove little: the fuzzing reached each
    refusal below, and subscriptions that were served."""
    if not SEEN:
        pytest.skip("runs after the fuzzing tests, in the same session")
    expected = {
        *(f"close {code}" for code in (1002, 1007, 1009, 4001, 4029)),
        *(f"error {code}" for code in ("invalid_message", "forbidden", "not_found")),
        *("error already_subscribed", "error not_subscribed", "export:status-sync"),
    }
    assert expected <= set(SEEN), sorted(SEEN.items())
    latencies = stack.bystander.latencies()
    print(f"provoked: {dict(sorted(SEEN.items()))}")
    print(f"well-behaved client: {len(latencies)} live events, slowest {max(latencies):.3f} s")
