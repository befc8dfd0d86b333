"""The RFC 6455 pieces of the fan-out benchmark's lean WebSocket client (`bench.fanout_load`).

What a client needs and nothing more: the opening handshake (request, and the checks of the
server's answer), masked client frames, close payloads, and the errors a failed connection is
counted by. No extension is offered (no compression), no subprotocol; frames from the server are
parsed by the client's protocol itself (`bench.fanout_load.Connection`), where it counts them.

The error classes carry the names websockets gives the same failures, so that the benchmark's
error counts (by type name) read as before.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "PING",
    "PONG",
    "TEXT",
    "ConnectionClosedError",
    "InvalidHandshake",
    "InvalidMessage",
    "InvalidStatus",
    "ProtocolError",
    "Target",
    "WebSocketError",
    "accept_key",
    "check_upgrade",
    "close_payload",
    "frame",
    "new_key",
    "parse_close",
    "target",
    "upgrade_request",
]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""The key suffix of RFC 6455 1.3."""

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

NO_STATUS = 1005
"""The code of a close frame without a payload (RFC 6455 7.4.1)."""


class WebSocketError(Exception):
    """A WebSocket connection failed (the handshake, or the protocol)."""


class InvalidMessage(WebSocketError):
    """The server's answer to the upgrade request is not an HTTP response."""


class InvalidStatus(WebSocketError):
    """The server answered the upgrade request with another status than 101."""


class InvalidHandshake(WebSocketError):
    """A 101 response whose headers do not complete the WebSocket handshake."""


class ProtocolError(WebSocketError):
    """The server broke the framing rules."""


class ConnectionClosedError(WebSocketError):
    """The connection closed before the client was ready."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    host_header: str
    path: str


@functools.lru_cache(maxsize=64)
def target(url: str) -> Target:
    """Where a ``ws://`` URL points (``wss://`` is not supported: the benchmark is local)."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"not a ws:// URL: {url!r}")
    port = parts.port or 80
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(host, port, shown if port == 80 else f"{shown}:{port}", path)


def new_key() -> bytes:
    """A Sec-WebSocket-Key: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16))


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer `key` with."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def upgrade_request(where: Target, key: bytes) -> bytes:
    return (
        f"GET {where.path} HTTP/1.1\r\n"
        f"Host: {where.host_header}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()


def check_upgrade(head: bytes, key: bytes) -> None:
    """Check the head of the server's response (without its blank line) to an upgrade request
    sent with `key`; raises InvalidMessage, InvalidStatus or InvalidHandshake."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or not status[1].isdigit():
        raise InvalidMessage(f"not an HTTP response: {lines[0][:80]!r}")
    code = int(status[1])
    if code != 101:
        raise InvalidStatus(f"server rejected WebSocket connection: HTTP {code}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise InvalidMessage(f"malformed header line: {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())

    def tokens(name: bytes) -> set[bytes]:
        return {
            token.strip().lower() for value in headers.get(name, []) for token in value.split(b",")
        }

    if b"websocket" not in tokens(b"upgrade"):
        raise InvalidHandshake(f"Upgrade header: {headers.get(b'upgrade')}")
    if b"upgrade" not in tokens(b"connection"):
        raise InvalidHandshake(f"Connection header: {headers.get(b'connection')}")
    if headers.get(b"sec-websocket-accept") != [accept_key(key)]:
        raise InvalidHandshake(
            f"Sec-WebSocket-Accept: {headers.get(b'sec-websocket-accept')} for key {key!r}"
        )
    for name in (b"sec-websocket-extensions", b"sec-websocket-protocol"):
        if name in headers:
            raise InvalidHandshake(f"{name.decode()} not offered: {headers[name]}")


def _masked(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big")


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final client frame: masked with a random key, as RFC 6455 5.3 requires."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + _masked(payload, mask)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return b"" if code == NO_STATUS else code.to_bytes(2, "big") + reason


def parse_close(payload: bytes | bytearray) -> int:
    """The status code of a close frame's payload (1005 when it has none)."""
    if not payload:
        return NO_STATUS
    if len(payload) < 2:
        raise ProtocolError("close frame with a 1-byte payload")
    return int.from_bytes(payload[:2], "big")
