"""The load client of the fan-out benchmark, in a process of its own.

``python -m bench.fanout_load`` prints ``{"pid": …}`` and answers requests on stdin (see
`bench.control`). It holds groups of WebSocket connections (websockets' asyncio client on uvloop,
no compression, no pings of its own) to the gateway or to the raw server, and one task per
connection that counts what arrives, cheaply: a live event is a frame that starts with
``{"jobId":`` (an event envelope); nothing else is parsed unless receive times are recorded.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections import Counter
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from .control import raise_open_files, run_loop, serve

EVENT = b'{"jobId":'
REPLAY = b'{"type":"export:replay"'
CAUGHT_UP = b'{"type":"export:caught-up"'
SUBSCRIBED = b'{"type":"subscribed"}'
EVENT_ID = b'"eventId"'
_OPEN_FILES = 65536
# Frames a connection buffers before websockets pauses reading: more than the default 16, so a
# fast stream is not paused and resumed every few frames (a cost of the client, not the server).
_MAX_QUEUE = 1024

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


class Client:
    __slots__ = ("closing", "job", "task", "ws")

    def __init__(self, ws: ClientConnection, job: int) -> None:
        self.ws = ws
        self.job = job
        self.closing = False
        self.task: asyncio.Task[None] | None = None


class Load:
    def __init__(self) -> None:
        self.groups: dict[str, list[Client]] = {}
        self.events = 0
        self.other = 0
        self.recording: list[tuple[int, int, float]] | None = None
        self.dropped: Counter[str] = Counter()
        """Connections the server closed while they were listening, by close code."""
        self._target = math.inf
        self._reached = asyncio.Event()

    # -- opening ---------------------------------------------------------------------------

    async def _handshake(
        self, url: str, kind: str, job: str, token: str | None, after_seq: int | None
    ) -> tuple[ClientConnection, float, int, int | None]:
        """One client: connected, subscribed and caught up. Returns the connection, when its
        WebSocket handshake completed, the events replayed to it and its caught-up seq."""
        ws = await connect(
            url,
            compression=None,
            ping_interval=None,
            max_queue=_MAX_QUEUE,
            proxy=None,
            open_timeout=30,
            close_timeout=10,
        )
        opened = time.perf_counter()
        try:
            if kind == "raw":
                await ws.send(_encoder.encode({"type": "subscribe", "jobId": job}), text=True)
                if await ws.recv(decode=False) != SUBSCRIBED:
                    raise Refused("the raw server did not confirm the room")
                return ws, opened, 0, None
            await ws.send(_encoder.encode({"type": "auth", "token": token}), text=True)
            answer = _control.decode(await ws.recv(decode=False))
            if answer.type != "authenticated":
                raise Refused(f"auth answered {answer.type}: {answer.message}")
            subscribe: dict[str, Any] = {"type": "subscribe", "jobId": job}
            if after_seq is not None:
                subscribe["afterSeq"] = after_seq
            await ws.send(_encoder.encode(subscribe), text=True)
            replayed = 0
            while True:
                message = await ws.recv(decode=False)
                if message.startswith(REPLAY):
                    replayed += message.count(EVENT_ID)
                elif message.startswith(CAUGHT_UP):
                    return ws, opened, replayed, _control.decode(message).seq
                elif message.startswith(b'{"type":"error"'):
                    error = _control.decode(message)
                    raise Refused(f"{error.code}: {error.message}")
        except BaseException:
            ws.transport.abort()
            raise

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
                            ws, opened, events, seq = await self._handshake(
                                url, kind, jobs[job], token, after_seq
                            )
                except (OSError, TimeoutError, websockets.WebSocketException, Refused) as exc:
                    errors[type(exc).__name__] += 1
                    if not retry or time.perf_counter() - started >= deadline:
                        return
                    # What a browser does: back off a little, with jitter, and try again.
                    await asyncio.sleep(0.1 + 0.4 * random.random())
                    continue
                break
            now = time.perf_counter()
            handshakes.append(opened - started)
            ready.append(now - started)
            replayed += events
            if seq is not None:
                seqs.append(seq)
                # Caught up at `seq` after `after_seq`: every seq in between must have come.
                if events < seq - (after_seq or seq):
                    short += 1
            client = Client(ws, job)
            client.task = asyncio.create_task(self._pump(client))
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

    # -- listening -------------------------------------------------------------------------

    async def _pump(self, client: Client) -> None:
        recv = client.ws.recv
        try:
            while True:
                message = await recv(decode=False)
                if message.startswith(EVENT):
                    self.events += 1
                    if self.events >= self._target:
                        self._reached.set()
                    if self.recording is not None:
                        received = time.time()
                        self.recording.append((client.job, _seq.decode(message).seq, received))
                else:
                    self.other += 1
        except websockets.ConnectionClosed as closed:
            if not client.closing:
                code = closed.rcvd.code if closed.rcvd is not None else "none"
                self.dropped[str(code)] += 1

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
        for client in clients:
            client.closing = True

        async def one(client: Client) -> None:
            with contextlib.suppress(OSError, websockets.WebSocketException):
                await client.ws.close()
            if client.task is not None:
                client.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client.task

        started = time.perf_counter()
        await asyncio.gather(*(one(client) for client in clients))
        return {"closed": len(clients), "seconds": time.perf_counter() - started}

    async def close_all(self) -> None:
        for group in list(self.groups):
            await self.close(group)


async def main() -> None:
    raise_open_files(_OPEN_FILES)
    load = Load()
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
