"""The load client of `bench.socketio_compare`, in a process of its own, on uvloop.

``python -m bench.socketio_load`` speaks the same request protocol as `bench.fanout_load` (open,
count, wait, record, close: it is that load client with another handshake and another frame
test), so `bench.fanout.Rig` drives both alike. Each connection speaks Engine.IO 4 / Socket.IO 5
directly over websockets' asyncio client (the gateway's load client's library, with the same
options), not python-socketio's AsyncClient: the AsyncClient starts a task per received message
and would be the bottleneck long before the server. A client opens
``/socket.io/?EIO=4&transport=websocket``, connects to the default namespace (``40``), sends
``join`` with its room, is ready at ``joined``, answers the server's pings (``2`` → ``3``) and
counts ``42["event",…]`` frames; when recording, it keeps the ``seq`` of each.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from . import fanout_load
from .control import raise_open_files, run_loop, serve

EVENT = b'42["event",'
JOINED = b'42["joined"'
PING = b"2"
PONG = "3"
PATH = "socket.io/?EIO=4&transport=websocket"


class _Seq(msgspec.Struct):
    seq: int


_event = msgspec.json.Decoder(tuple[str, _Seq])
_encoder = msgspec.json.Encoder()


def engineio_url(base: str) -> str:
    return base.rstrip("/") + "/" + PATH


async def handshake(base: str, room: str) -> ClientConnection:
    """One Socket.IO client, connected and in `room`."""
    ws = await connect(
        engineio_url(base),
        compression=None,
        ping_interval=None,
        max_queue=fanout_load._MAX_QUEUE,
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


def event_seq(message: bytes) -> int:
    return _event.decode(message[2:])[1].seq


class Load(fanout_load.Load):
    async def _handshake(
        self, url: str, kind: str, job: str, token: str | None, after_seq: int | None
    ) -> tuple[ClientConnection, float, int, int | None]:
        ws = await handshake(url, job)
        return ws, time.perf_counter(), 0, None

    async def _pump(self, client: fanout_load.Client) -> None:
        ws = client.ws
        recv = ws.recv
        try:
            while True:
                message = await recv(decode=False)
                if message.startswith(EVENT):
                    self.events += 1
                    if self.events >= self._target:
                        self._reached.set()
                    if self.recording is not None:
                        received = time.time()
                        self.recording.append((client.job, event_seq(message), received))
                elif message == PING:
                    await ws.send(PONG, text=True)
                else:
                    self.other += 1
        except websockets.ConnectionClosed as closed:
            if not client.closing:
                code = closed.rcvd.code if closed.rcvd is not None else "none"
                self.dropped[str(code)] += 1


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
