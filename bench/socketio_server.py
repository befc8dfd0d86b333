"""The python-socketio side of `bench.socketio_compare`: an AsyncServer on aiohttp, in a process
of its own, on uvloop.

``python -m bench.socketio_server [--backlog N]`` listens on a free port, prints
``{"ports": {"<backlog>": port}, "pid": …}`` (the shape of `bench.fanout_raw`'s hello, so
`bench.fanout.Rig` can drive it)
and answers requests on stdin (see `bench.control`). It is what a Python team would write for
live job progress: python-socketio's defaults (websocket transport allowed, no compression of
small packets, its own 25 s pings), a client sends ``join`` with a room name and gets ``joined``
back, and every event goes out with ``AsyncServer.emit(…, room=…)``.

Requests:

    send    rooms, frame, count, mode ("socketio")
                    the event (the JSON of `frame`, its ``seq`` numbered per emit) `count` times
                    to the rooms in turn, one `emit` each; the wall-clock time of each emit is
                    kept by seq until `times` is asked for
    times           answers and forgets {seq: time} of the emits so far
    paced   room, rate, seconds
                    one event per 1/rate seconds to the room, seq 1, 2, …; answers how many
    stats           connections
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import socketio
from aiohttp import web

from .control import raise_open_files, run_loop
from .control import serve as serve_requests

_OPEN_FILES = 65536
DEFAULT_BACKLOG = 1024
EVENT = "event"


class SocketIOServer:
    def __init__(self) -> None:
        self.sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins=[])
        self.connections = 0
        self.seq = 0
        self.times: dict[int, float] = {}
        self.sio.on("connect", self._connect)
        self.sio.on("disconnect", self._disconnect)
        self.sio.on("join", self._join)

    async def _connect(self, sid: str, environ: Any, auth: Any = None) -> None:
        self.connections += 1

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        self.connections -= 1

    async def _join(self, sid: str, room: str) -> None:
        await self.sio.enter_room(sid, room)
        await self.sio.emit("joined", room, to=sid)

    async def send(self, rooms: list[str], frame: str, count: int, mode: str) -> dict[str, Any]:
        if mode != "socketio":
            raise ValueError(f"unknown mode {mode!r}")
        template = json.loads(frame)
        for turn in range(count):
            self.seq += 1
            self.times[self.seq] = time.time()
            await self.sio.emit(EVENT, {**template, "seq": self.seq}, room=rooms[turn % len(rooms)])
        return {"deliveries": None}

    async def take_times(self) -> dict[str, Any]:
        times, self.times = self.times, {}
        return {"times": list(times.items())}

    async def paced(self, room: str, rate: float, seconds: float) -> dict[str, Any]:
        started = time.perf_counter()
        sent = 0
        while time.perf_counter() - started < seconds:
            sent += 1
            await self.sio.emit(EVENT, {"seq": sent, "sentAt": time.time()}, room=room)
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        return {"sent": sent}

    async def stats(self) -> dict[str, Any]:
        return {"connections": self.connections}


async def main(backlog: int) -> None:
    raise_open_files(_OPEN_FILES)
    server = SocketIOServer()
    app = web.Application()
    server.sio.attach(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=backlog)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await serve_requests(
            {
                "send": server.send,
                "times": server.take_times,
                "paced": server.paced,
                "stats": server.stats,
            },
            hello={"ports": {str(backlog): port}, "pid": os.getpid()},
        )
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.socketio_server")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="listen backlog")
    run_loop(main(parser.parse_args().backlog))
