"""What the fault tests share: services as OS processes, and clients that check what they get.

The services run as `python -m services.export` and `python -m services.gateway` through
`tests.export.test_replicas.process`, which hands the test the child process, so that a test can
kill it with SIGKILL. `Follower` is a WebSocket client that follows one job through every
disconnect, trying the gateways it knows in turn, and checks each message as it arrives: a
status-sync first on every connection, then each event exactly once, in seq order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

from schemas.events import Cancelled, Progress, Queued, Started
from services.common.eventlog import EventLog, EventLogError, NewEvent
from services.export.config import ExportConfig
from tests.export.conftest import SECRET, token
from tests.export.test_replicas import free_port, process

__all__ = [
    "SECRET",
    "WRITER",
    "Follower",
    "Writer",
    "export_env",
    "free_port",
    "gateway_env",
    "metric",
    "own_job_of_writer",
    "process",
    "rss_kib",
    "stalled_client",
    "token",
    "wait_until",
]


def export_env(
    config: ExportConfig, database_url: str, port: int, worker_id: str, **extra: str
) -> dict[str, str]:
    """Environment of an export service process on `database_url` (EXPORT_* overrides in
    `extra`, without the prefix: `WORKERS="1"`)."""
    env = {
        "DATABASE_URL": database_url,
        "JWT_SECRET": SECRET,
        "EXPORT_HOST": "127.0.0.1",
        "EXPORT_PORT": str(port),
        "EXPORT_DATA_ROOT": config.data_root,
        "EXPORT_WORK_ROOT": config.work_root,
        "EXPORT_ARCHIVE_ROOT": config.archive_root,
        "EXPORT_MIGRATE": "false",
        "EXPORT_LOG_JSON": "true",
        "EXPORT_POOL_MIN": "1",
        "EXPORT_POOL_MAX": "4",
        "EXPORT_POLL_INTERVAL": "0.2",
        "EXPORT_WORKER_ID": worker_id,
    }
    env.update({f"EXPORT_{name}": value for name, value in extra.items()})
    return env


def gateway_env(database_url: str, port: int, export_port: int, **extra: str) -> dict[str, str]:
    """Environment of a gateway process (GATEWAY_* overrides in `extra`, without the prefix)."""
    env = {
        "DATABASE_URL": database_url,
        "JWT_SECRET": SECRET,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_LOG_JSON": "true",
        "GATEWAY_POLL_INTERVAL": "0.5",
        "GATEWAY_EXPORT_URL": f"http://127.0.0.1:{export_port}",
    }
    env.update({f"GATEWAY_{name}": value for name, value in extra.items()})
    return env


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A field of /proc/<pid>/status in KiB: VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} in /proc/{pid}/status")


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    async with http.get(url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def stalled_client(port: int, job_id: str) -> ClientConnection:
    """A client that subscribes to a job and then reads nothing: a 4 KiB receive buffer and no
    message buffered ahead, so that the gateway sees its socket full after a few kilobytes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws", sock=sock, max_queue=1, open_timeout=10, close_timeout=1
    )
    await ws.send(json.dumps({"type": "auth", "token": token()}))
    assert json.loads(await ws.recv())["type"] == "authenticated"
    await ws.send(json.dumps({"type": "subscribe", "jobId": job_id, "afterSeq": 0}))
    return ws


WRITER = "user:fault-writer"


async def own_job_of_writer(log: EventLog, project: str = "demo") -> uuid.UUID:
    """A job the test writes to itself (see `Writer`): queued and started by another user than
    the export tests' alice (it does not count against her running exports), and under a lease
    of the writer's, so that no export worker claims it."""
    job_id = uuid.uuid4()
    first = [
        NewEvent(data=Queued(requested_by="fault-writer"), actor=WRITER),
        NewEvent(data=Started(worker_id="fault-writer"), actor=WRITER),
    ]
    await log.append(job_id, 0, first, project_id=project, owner_id="fault-writer")
    await log.pool.execute(
        "UPDATE jobs SET lease_owner = 'fault-writer', lease_expires_at = now() + "
        "interval '1 hour' WHERE job_id = $1",
        job_id,
    )
    return job_id


class Writer:
    """Appends progress to a job of the test's own, batch after batch, through any outage.

    A batch that fails is retried with the same event ids (a retry of an append that did commit
    is a no-op), so every batch ends up in the log exactly once; `acknowledged` holds the ids of
    the events of every append that returned success."""

    def __init__(self, log: EventLog, job_id: uuid.UUID) -> None:
        self.log = log
        self.job_id = job_id
        self.seq = 2
        self.acknowledged: list[uuid.UUID] = []
        self.failures = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        step = 0
        while not self.stop.is_set():
            step += 1
            value = min(step / 10, 89.0)
            batch = [
                NewEvent(
                    data=Progress(phase="processing", progress=value, phase_progress=value),
                    actor=WRITER,
                )
                for _ in range(3)
            ]
            await self._append(batch)
            await asyncio.sleep(0.02)  # a steady rate, not a flood
        await self._append([NewEvent(data=Cancelled(cancelled_by="system"), actor=WRITER)])

    async def _append(self, batch: list[NewEvent]) -> None:
        while True:
            try:
                result = await self.log.append(self.job_id, self.seq, batch)
            except EventLogError:
                raise  # refused by the log: a broken test, not an outage
            except Exception:
                # Connection errors of every kind, asyncpg's InternalClientError among them (a
                # pooled connection the server ended): the append may or may not have committed.
                self.failures += 1
                await asyncio.sleep(0.05)
                continue
            self.seq = result.last_seq
            self.acknowledged += [event.event_id for event in batch]
            return


def _events(message: dict[str, Any]) -> list[dict[str, Any]]:
    if message.get("type") == "export:replay":
        events: list[dict[str, Any]] = message["events"]
        return events
    return [message] if "eventId" in message else []


@dataclass
class Follower:
    """Follows one job to its end through any number of disconnects.

    Each connection authenticates and subscribes with the last seq received; a connection that
    cannot be made or that drops sends the follower to the next gateway in `urls`, after a short
    backoff. Whatever breaks the protocol (a missing status-sync, a gap, a duplicate) is written
    to `problems` rather than raised, so that the test can report all of it."""

    urls: Sequence[str]
    job_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    connected: list[str] = field(default_factory=list)
    """The gateway of each connection that got its status-sync, in order."""
    replayed: list[int] = field(default_factory=list)
    """Events each of those connections replayed (received before its caught-up marker)."""
    closes: list[int | None] = field(default_factory=list)
    live: int = 0
    """Events received after the caught-up marker of the current connection."""
    ended: bool = False

    receive_buffer: int = 0
    """The kernel receive buffer to ask for (0: the system's own, autotuned)."""

    async def _socket(self, url: str) -> socket.socket:
        host, port = url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def seq(self) -> int:
        return int(self.events[-1]["seq"]) if self.events else 0

    async def run(self) -> None:
        index, attempt = 0, 0
        while not self.ended:
            url = self.urls[index % len(self.urls)]
            try:
                async with websockets.connect(
                    url,
                    open_timeout=5,
                    close_timeout=1,
                    max_size=None,
                    sock=await self._socket(url) if self.receive_buffer else None,
                ) as ws:
                    if await self._session(ws, url):
                        attempt = 0
            except websockets.ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
            except (OSError, websockets.InvalidHandshake, TimeoutError):
                self.closes.append(None)
            if not self.ended:
                index += 1
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))  # backoff before reconnecting
                attempt += 1

    async def _session(self, ws: ClientConnection, url: str) -> bool:
        """One connection; whether it caught up."""
        await ws.send(json.dumps({"type": "auth", "token": token()}))
        await ws.send(json.dumps({"type": "subscribe", "jobId": self.job_id, "afterSeq": self.seq}))
        synced = caught_up = False
        self.live = 0
        async for raw in ws:
            message = json.loads(raw)
            kind = message.get("type")
            if kind in ("authenticated", "heartbeat", "pong"):
                continue
            if kind == "error":
                self.problems.append(f"error on {url}: {message}")
                continue
            if kind == "export:status-sync":
                synced = True
                self.connected.append(url)
                self.replayed.append(0)
                if message["seq"] < self.seq:
                    self.problems.append(f"status-sync at {message['seq']} after {self.seq}")
                continue
            if not synced:
                self.problems.append(f"{kind} before the status-sync on {url}")
            for event in _events(message):
                if event["seq"] != self.seq + 1:
                    self.problems.append(f"seq {event['seq']} after {self.seq} on {url}")
                    if event["seq"] <= self.seq:
                        continue  # a duplicate is noted, not kept
                self.events.append(event)
                if caught_up:
                    self.live += 1
                elif synced:
                    self.replayed[-1] += 1
            if kind == "export:caught-up":
                caught_up = True
            elif kind == "export:end-of-stream":
                self.ended = True
                return True
        return caught_up


async def wait_until(
    condition: Any,
    timeout: float,
    what: str,
    interval: float = 0.02,
    describe: Callable[[], object] | None = None,
) -> None:
    """Poll `condition` (plain or async) until it holds; fail naming `what` after `timeout`
    (and what `describe` says about how far things got)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            found = f" ({describe()})" if describe is not None else ""
            raise AssertionError(f"{what}: not within {timeout} s{found}")
        await asyncio.sleep(interval)
