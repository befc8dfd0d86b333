"""Guarantees 6 and 7 end to end: clients cut off at any moment come back to exactly the log.

Jobs move on in bursts while their followers are disconnected at random: by themselves (some in
the middle of their own replay), by a gateway restart (1012), and by the gateway because they
fell behind (4008, a send queue of a few messages against bursts of many events). Each follower
reconnects with the last seq (or log position) it saw and checks every message as it comes: no
gap, no duplicate, status-sync first. At the end each has seq 1..n and the fold of what it
received equals the fold of the log; a follower of another project has received nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets

from schemas.events import Cancelled, decode_event
from schemas.state import replay
from services.common.eventlog import EventLog, NewEvent
from services.gateway.clients import CLOSE_RESTART
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.gateway.conftest import SECRET, slow_clients_closed, token
from tests.support import new_job, progress, unpack, wait_for

SELF_CLOSE = 0  # our own key in the tally of closes


@dataclass
class Follower:
    """A client that follows one stream through every disconnect, checking as it goes."""

    url: Callable[[], str]
    subscribe: dict[str, Any]
    rng: random.Random
    user_token: str
    job_id: uuid.UUID | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    closes: Counter[int] = field(default_factory=Counter)
    closed_mid_replay: int = 0
    syncs: int = 0
    stalls: int = 0
    stalled: bool = False
    """Not reading right now (the writer then feeds its stream, so the gateway cuts it off)."""
    ended: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    writer_done: asyncio.Event = field(default_factory=asyncio.Event)
    cut_off: Callable[[], float] = lambda: 0.0

    @property
    def cursor(self) -> int:
        if self.job_id is not None:
            return int(self.received[-1]["seq"]) if self.received else 0
        return self._position

    _position: int = 0

    async def run(self) -> None:
        while not self.ended and not self.stop.is_set():
            try:
                # A small receive buffer: when it stops reading, the gateway soon sees it.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                address = self.url().removeprefix("ws://").split("/")[0].split(":")
                await asyncio.get_running_loop().sock_connect(sock, (address[0], int(address[1])))
                async with websockets.connect(
                    self.url(), max_size=None, sock=sock, max_queue=1, close_timeout=0.5
                ) as ws:
                    await self._session(ws)
            except websockets.ConnectionClosed as closed:
                self.closes[closed.rcvd.code if closed.rcvd else -1] += 1
            except (OSError, websockets.InvalidHandshake):
                # The gateway is restarting (refused, or 503 while it shuts down): back off a
                # little and try again.
                await asyncio.sleep(0.02)

    async def _session(self, ws: websockets.ClientConnection) -> None:
        await ws.send(json.dumps({"type": "auth", "token": self.user_token}))
        cursor_field = "afterSeq" if self.job_id is not None else "afterPosition"
        await ws.send(json.dumps({**self.subscribe, cursor_field: self.cursor}))
        synced = False
        replaying = False
        while not self.stop.is_set():
            try:
                async with asyncio.timeout(0.5):
                    frame = json.loads(await ws.recv())
            except TimeoutError:
                continue
            kind = frame["type"]
            if kind == "export:status-sync":
                assert not synced, "one status-sync per subscription"
                synced = True
                self.syncs += 1
                if self.job_id is not None:
                    assert frame["seq"] >= self.cursor, "the server's state went back"
                continue
            if kind in ("authenticated", "heartbeat"):
                continue
            assert kind != "error", frame
            assert synced, f"{kind} before status-sync"
            if kind == "export:replay":
                replaying = True
            for message in unpack(frame):
                if "eventId" in message:
                    self._take(message)
                elif message["type"] == "export:caught-up":
                    replaying = False
                    if self.job_id is not None:
                        assert message["seq"] == self.cursor
                    else:
                        assert message["position"] >= self._position
                        self._position = message["position"]
                elif message["type"] == "export:end-of-stream":
                    assert message["seq"] == self.cursor
                    self.ended = True
                    return
            if not replaying and self.rng.random() < 0.03:
                # Stalled (a frozen tab): it stops reading until the gateway gives up on it.
                # (A stalled client cannot see its own connection being dropped: the gateway's
                # count of clients cut off as slow says when it happened.)
                self.stalls += 1
                before = self.cut_off()

                def released(before: float = before) -> bool:
                    return self.cut_off() > before or self.writer_done.is_set()

                self.stalled = True
                try:
                    with contextlib.suppress(AssertionError):
                        await wait_for(released, timeout=10)
                finally:
                    self.stalled = False
                continue
            if self.rng.random() < (0.15 if replaying else 0.01):
                self.closed_mid_replay += replaying
                self.closes[SELF_CLOSE] += 1
                return

    def _take(self, event: dict[str, Any]) -> None:
        if self.job_id is not None:
            assert event["jobId"] == str(self.job_id)
            assert event["seq"] == self.cursor + 1, f"after {self.cursor} came {event['seq']}"
        else:
            assert event["position"] > self._position, "a position came twice or went back"
            self._position = event["position"]
        self.received.append(event)


async def test_clients_cut_off_at_any_moment_end_with_the_log_exactly(
    database_url: str, eventlog: EventLog
) -> None:
    rng = random.Random(60611)
    config = GatewayConfig(
        database_url=database_url,
        port=0,
        jwt_secret=SECRET,
        poll_interval=0.2,
        page_size=5,  # long replays in many frames: room to disconnect in the middle
        max_queue=6,  # a stalled client's queue fills at once: it is cut off as slow
        send_buffer=4096,  # and its socket fills after a few kilobytes
        close_timeout=0.5,
    )
    gateways = [Gateway(config)]
    await gateways[0].start()
    address = [f"ws://127.0.0.1:{gateways[0].port}/ws"]

    def url() -> str:
        # Between a restart's close and start this is the closed gateway's: refused, retried.
        return address[0]

    jobs = [await new_job(eventlog) for _ in range(2)]
    followers = [
        Follower(
            url,
            {"type": "subscribe", "jobId": str(job)},
            random.Random(rng.random()),
            token(),
            job_id=job,
        )
        for job in jobs
        for _ in range(5)
    ]
    project_followers = [
        Follower(url, {"type": "subscribe", "projectId": "p1"}, random.Random(i), token())
        for i in range(2)
    ]
    intruder = Follower(
        url, {"type": "subscribe", "projectId": "p2"}, random.Random(7), token(projects=("p2",))
    )
    everyone = [*followers, *project_followers, intruder]
    for follower in everyone:
        follower.cut_off = lambda: sum(slow_clients_closed(g) for g in gateways)
    tasks = [asyncio.create_task(f.run()) for f in everyone]
    try:
        seqs = dict.fromkeys(jobs, 2)
        restarts_at = {100, 200, 300}
        step = 0
        # 400 steps, and on until at least three clients were cut off as slow: a stall is drawn
        # at random per frame, so on an unlucky schedule 400 steps may not have made three.
        while step < 400 or (sum(slow_clients_closed(g) for g in gateways) < 3 and step < 4000):
            step += 1
            job = rng.choice(jobs)
            burst = rng.choice([1, 1, 1, 2, 5, 20])
            stalled = [f.job_id for f in followers if f.stalled and f.job_id is not None]
            if stalled:
                # A stalled client's stream keeps moving, so that its queue overflows whatever
                # the timing (the writer alone may move on to the other job for a while).
                job, burst = stalled[0], max(burst, 5)
            await eventlog.append(
                job, seqs[job], [progress(min(seqs[job] + i, 999) / 10) for i in range(burst)]
            )
            seqs[job] += burst
            if step in restarts_at:
                # A restart: every client is told 1012 and comes back to the next gateway.
                await gateways[-1].close()
                gateways.append(Gateway(config))
                await gateways[-1].start()
                address[0] = f"ws://127.0.0.1:{gateways[-1].port}/ws"
            if rng.random() < 0.2:
                await asyncio.sleep(rng.uniform(0, 0.02))  # let followers run between bursts
        for job in jobs:
            await eventlog.append(
                job, seqs[job], [NewEvent(data=Cancelled(cancelled_by="user"), actor="user:a")]
            )
        for follower in everyone:
            follower.writer_done.set()
        head = await eventlog.head_position()

        await wait_for(lambda: all(f.ended for f in followers), timeout=60)
        await wait_for(
            lambda: all(f.cursor >= head for f in project_followers), timeout=30, interval=0.02
        )
    finally:
        for follower in everyone:
            follower.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await gateways[-1].close()

    for follower in followers:
        assert follower.job_id is not None
        log = await eventlog.read_stream(follower.job_id)
        assert [e["seq"] for e in follower.received] == [e.seq for e in log]
        received = [decode_event(json.dumps(e)) for e in follower.received]
        folded = replay(received)
        assert folded == replay(log)
        assert folded is not None
        assert folded.status == "cancelled"
        assert follower.received[-1]["type"] == "export:cancelled"
    whole = await eventlog.tail(0, 100_000)
    for follower in project_followers:
        assert [e["position"] for e in follower.received] == [e.position for e in whole]
    assert intruder.received == []

    # Every kind of cut happened, many times over.
    closes: Counter[int] = sum((f.closes for f in everyone), Counter())
    assert closes[CLOSE_RESTART] >= 3, closes
    assert sum(slow_clients_closed(g) for g in gateways) >= 3, closes
    assert sum(f.stalls for f in everyone) >= 3
    assert closes[SELF_CLOSE] >= 10, closes
    assert sum(f.closed_mid_replay for f in everyone) >= 5
    assert all(f.syncs >= 3 for f in followers)
