"""The raw baseline of the fan-out benchmark: a minimal websockets server, in a process of its own.

``python -m bench.fanout_raw [--backlog N ...]`` listens once per backlog given (default: 100,
asyncio's default, which the gateway's `serve()` keeps), prints ``{"ports": {backlog: port},
"pid": …}`` and then answers requests on stdin (see `bench.control`). It is what the gateway
would be with nothing of its own: the same library, event loop (uvloop), compression (none) and
ping interval, and no authentication, log, queue or per-client task. A client sends one message
naming its room (a `subscribe` with a `jobId`), gets `{"type":"subscribed"}` back and then only
listens.

Requests:

    send    rooms, frame, count, mode
                                    the frame `count` times to the rooms in turn, by
                                    `websockets.broadcast` or batched per connection (see
                                    `RawServer.send`); answers the deliveries
    paced   rooms, template, rate, seconds
                                    one event per 1/rate seconds, rooms in turn, each event its
                                    own frame (the template with the room's job and next seq);
                                    answers the wall-clock time each was sent
    stats                           connections and rooms

`send` does no flow control of its own: the benchmark calls it only while the load client has
received all but a bounded number of frames, as it does with the gateway's events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections import Counter
from typing import Any

import msgspec
import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.protocol import State

from schemas.events import decode_event, encode_event

from .control import raise_open_files, run_loop
from .control import serve as serve_requests

SUBSCRIBED = b'{"type":"subscribed"}'
PING_INTERVAL = 10.0
"""The gateway's default (GATEWAY_PING_INTERVAL): the same keepalive work on both servers."""
_OPEN_FILES = 65536
DEFAULT_BACKLOG = 100
_TICK_SECONDS = 0.001


class _Subscribe(msgspec.Struct, rename="camel"):
    job_id: str


_subscribe = msgspec.json.Decoder(_Subscribe)


class RawServer:
    def __init__(self) -> None:
        self.rooms: dict[str, set[ServerConnection]] = {}
        self.connections = 0

    async def handle(self, connection: ServerConnection) -> None:
        try:
            first = await connection.recv(decode=False)
            room_name = _subscribe.decode(first).job_id
        except (websockets.ConnectionClosed, msgspec.DecodeError):
            return
        room = self.rooms.setdefault(room_name, set())
        room.add(connection)
        self.connections += 1
        try:
            await connection.send(SUBSCRIBED, text=True)
            await connection.wait_closed()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            room.discard(connection)
            if not room:
                self.rooms.pop(room_name, None)

    def _targets(self, rooms: list[str]) -> list[list[ServerConnection]]:
        return [list(self.rooms.get(name, ())) for name in rooms]

    async def send(self, rooms: list[str], frame: str, count: int, mode: str) -> dict[str, Any]:
        """`count` copies of the frame to the rooms in turn. "broadcast": one
        `websockets.broadcast` per frame, every socket written once per frame. "batched": each
        connection gets all of its copies, framed by websockets, in one write; the least a
        websockets server can spend per frame (a client then reads many frames at once too)."""
        targets = self._targets(rooms)
        data = frame.encode()
        deliveries = 0
        if mode == "broadcast":
            for turn in range(count):
                connections = targets[turn % len(targets)]
                broadcast(connections, data, text=True)
                deliveries += len(connections)
        elif mode == "batched":
            copies = Counter(turn % len(targets) for turn in range(count))
            for index, times in copies.items():
                for connection in targets[index]:
                    if connection.protocol.state is not State.OPEN:
                        continue
                    for _ in range(times):
                        connection.protocol.send_text(data)
                    connection.send_data()
                    deliveries += times
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return {"deliveries": deliveries}

    async def paced(
        self, rooms: list[str], template: str, rate: float, seconds: float
    ) -> dict[str, Any]:
        """Events at `rate` per second over the rooms in turn; each frame is encoded once, the
        time is read just before it is written (the raw analogue of a commit)."""
        targets = self._targets(rooms)
        event = decode_event(template)
        job_ids = [uuid.UUID(name) for name in rooms]
        seqs = [event.seq] * len(rooms)
        times: list[tuple[int, int, float]] = []
        started = time.perf_counter()
        due = started
        number = 0
        while True:
            now = time.perf_counter()
            if now - started >= seconds:
                break
            while due <= now:
                index = number % len(rooms)
                seqs[index] += 1
                frame = encode_event(
                    msgspec.structs.replace(
                        event, job_id=job_ids[index], seq=seqs[index], position=number + 1
                    )
                )
                times.append((index, seqs[index], time.time()))
                broadcast(targets[index], frame, text=True)
                number += 1
                due = started + number / rate
            # Not less than the event loop's timer resolution (1 ms): a shorter sleep returns at
            # once and the loop would spin, stealing a core from the processes measured. Events
            # due meanwhile go out together, timed when they are written.
            await asyncio.sleep(max(_TICK_SECONDS, due - time.perf_counter()))
        return {"sent": number, "times": times}

    async def stats(self) -> dict[str, Any]:
        return {"connections": self.connections, "rooms": len(self.rooms)}


async def main(backlogs: list[int]) -> None:
    raise_open_files(_OPEN_FILES)
    raw = RawServer()
    async with contextlib.AsyncExitStack() as stack:
        ports: dict[str, int] = {}
        for backlog in backlogs:
            server = await stack.enter_async_context(
                serve(
                    raw.handle,
                    "127.0.0.1",
                    0,
                    compression=None,
                    ping_interval=PING_INTERVAL,
                    ping_timeout=PING_INTERVAL,
                    backlog=backlog,
                )
            )
            ports[str(backlog)] = next(iter(server.sockets)).getsockname()[1]
        await serve_requests(
            {"send": raw.send, "paced": raw.paced, "stats": raw.stats},
            hello={"ports": ports, "pid": os.getpid()},
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_raw")
    parser.add_argument(
        "--backlog",
        type=int,
        action="append",
        help="listen backlog; repeat to listen on one port per backlog (default: 100, "
        "asyncio's default, which the gateway's serve() keeps)",
    )
    run_loop(main(parser.parse_args().backlog or [DEFAULT_BACKLOG]))
