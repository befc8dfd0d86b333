"""The load client of `bench.socketio_compare`, in a process of its own, on uvloop.

``python -m bench.socketio_load`` speaks the same request protocol as `bench.fanout_load` (open,
count, wait, record, close): it is that load client, the same lean RFC 6455 client on
`asyncio.Protocol` (`fanout_load.FrameLoad`, `fanout_load.Connection`), with another handshake
and another live-frame prefix, so `bench.fanout.Rig` drives both alike and each server is
measured with the same client machinery. Each connection speaks Engine.IO 4 / Socket.IO 5
directly, not through python-socketio's AsyncClient, which starts a task per received message
and would be the bottleneck long before the server. A client opens
``/socket.io/?EIO=4&transport=websocket``, waits for the Engine.IO open packet (``0{…}``),
connects to the default namespace (``40``), sends ``join`` with its room, is ready at
``joined``, answers the server's pings (``2`` → ``3``) and counts ``42["event",…]`` frames (one
prefix test per frame); when recording, it keeps the ``seq`` of each.

`handshake` is the same client over websockets' asyncio client, for a test that reads a
connection's messages one by one (`bench.socketio_compare`'s disconnect test).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from . import fanout_load, wsclient
from .control import raise_open_files, run_loop, serve

EVENT = b'42["event",'
JOINED = b'42["joined"'
PING = b"2"
PONG = "3"
PATH = "socket.io/?EIO=4&transport=websocket"
_CONNECT = b"40"
_PONG = PONG.encode()
# Frames websockets' connection (`handshake`) buffers before it pauses reading: more than the
# default 16, so a fast stream is not paused and resumed every few frames.
_MAX_QUEUE = 1024


class _Seq(msgspec.Struct):
    seq: int


_event = msgspec.json.Decoder(tuple[str, _Seq])
_encoder = msgspec.json.Encoder()


def engineio_url(base: str) -> str:
    return base.rstrip("/") + "/" + PATH


async def handshake(base: str, room: str) -> ClientConnection:
    """One Socket.IO client over websockets' client, connected and in `room` (for a test that
    reads messages one by one; the load client is `Load`)."""
    ws = await connect(
        engineio_url(base),
        compression=None,
        ping_interval=None,
        max_queue=_MAX_QUEUE,
        proxy=None,
        open_timeout=30,
        close_timeout=10,
    )
    try:
        opened = await ws.recv(decode=False)
        if not opened.startswith(b"0"):
            raise fanout_load.Refused(f"no Engine.IO open packet: {opened[:40]!r}")
        await ws.send("40", text=True)
        while True:
            answer = await ws.recv(decode=False)
            if answer.startswith(b"40"):
                break
            if answer.startswith(b"44"):
                raise fanout_load.Refused(f"namespace refused: {answer[:80]!r}")
        await ws.send("42" + _encoder.encode(["join", room]).decode(), text=True)
        while True:
            answer = await ws.recv(decode=False)
            if answer.startswith(JOINED):
                return ws
            if answer == PING:
                await ws.send(PONG, text=True)
    except BaseException:
        ws.transport.abort()
        raise


def event_seq(payload: bytes | bytearray) -> int:
    """The seq of a ``42["event",{…}]`` message."""
    return _event.decode(payload[2:])[1].seq


# The handshake phases of a Socket.IO connection, on `fanout_load.Connection`'s handshake states
# (all before listening, so its failure and close handling apply as they are).
_OPENING = fanout_load._AUTH
"""Waiting for the Engine.IO open packet (``0{…}``)."""
_CONNECTING = fanout_load._CATCHING_UP
"""``40`` sent: waiting for the default namespace's ``40{…}``."""
_JOINING = fanout_load._SUBSCRIBING
"""``join`` sent: waiting for ``joined``."""


class Connection(fanout_load.Connection):
    """One Socket.IO client on the lean client: `first` is its ``join`` message."""

    __slots__ = ()

    live_prefix = EVENT
    live_seq = staticmethod(event_seq)

    def _start(self) -> None:
        self.state = _OPENING  # the server speaks first

    def _other(self, message: bytes | bytearray) -> bool:
        if message == PING:
            self._send(wsclient.TEXT, _PONG)
            return False
        return True

    def _message(self, message: bytes | bytearray) -> None:
        state = self.state
        if state == _OPENING:
            if not message.startswith(b"0"):
                self._fail(fanout_load.Refused(f"no Engine.IO open packet: {message[:40]!r}"))
                return
            self._send(wsclient.TEXT, _CONNECT)
            self.state = _CONNECTING
        elif message == PING:
            self._send(wsclient.TEXT, _PONG)
        elif state == _CONNECTING:
            if message.startswith(b"40"):
                self._send(wsclient.TEXT, self.first)
                self.state = _JOINING
            elif message.startswith(b"44"):
                self._fail(fanout_load.Refused(f"namespace refused: {message[:80]!r}"))
        elif state == _JOINING:
            if message.startswith(JOINED):
                self._ready()
        else:
            super()._message(message)


class Load(fanout_load.FrameLoad):
    """`fanout_load`'s requests and lean client, speaking Socket.IO: ``jobs`` are rooms."""

    def _client(
        self,
        url: str,
        kind: str,
        job: int,
        job_id: str,
        token: str | None,
        after_seq: int | None,
    ) -> tuple[fanout_load.Connection, wsclient.Target]:
        where = wsclient.target(engineio_url(url))
        key = wsclient.new_key()
        join = b"42" + _encoder.encode(["join", job_id])
        request = wsclient.upgrade_request(where, key)
        return Connection(self, request, key, job, join, None), where


async def main() -> None:
    raise_open_files(fanout_load._OPEN_FILES)
    load = Load()
    handlers: dict[str, Any] = {
        "open": load.open,
        "count": load.count,
        "wait": load.wait,
        "record": load.record,
        "close": load.close,
    }
    try:
        await serve(handlers, hello={"pid": os.getpid()})
    finally:
        await load.close_all()


if __name__ == "__main__":
    run_loop(main())
