"""The browser client against the real gateway and export service, run by Node.js
(`tests/web/live-client.mjs`): a job followed through a gateway restart, and a cancel."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.eventlog import EventLog
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.export.conftest import SECRET, ClientFactory, auth, token
from tests.support import completed, new_job, progress, wait_for
from tests.vectors.generate import encode_state
from tests.web.node import node_or_skip

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = "tests/web/live-client.mjs"

Line = dict[str, Any]


async def start_gateway(
    database_url: str, *, port: int = 0, export_url: str = "http://127.0.0.1:9"
) -> Gateway:
    config = GatewayConfig(
        database_url=database_url,
        port=port,
        jwt_secret=SECRET,
        poll_interval=0.5,
        page_size=3,  # replays of several frames
        export_url=export_url,
    )
    gateway = Gateway(config)
    await gateway.start()
    await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
    return gateway


class NodeClient:
    """live-client.mjs in a child process, and the lines it has reported so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[Line] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(json.loads(raw))

    def of(self, kind: str) -> list[Line]:
        return [line for line in self.lines if line["kind"] == kind]

    def states(self) -> list[Line]:
        return [line["state"] for line in self.of("state")]

    async def wait(self, what: Callable[[Line], bool], timeout: float = 20.0) -> Line:
        await wait_for(lambda: any(what(line) for line in self.lines), timeout)
        return next(line for line in self.lines if what(line))

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()

    async def stop(self) -> str:
        """Close the client (end of stdin); what it wrote to stderr."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        await self._reader
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


@pytest.fixture
async def follow() -> AsyncIterator[Callable[[int, str, str], Any]]:
    node = node_or_skip()
    started: list[NodeClient] = []

    async def run(port: int, bearer: str, job_id: str) -> NodeClient:
        process = await asyncio.create_subprocess_exec(
            node,
            SCRIPT,
            f"ws://127.0.0.1:{port}/ws",
            bearer,
            job_id,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(NodeClient(process))
        return started[-1]

    yield run
    for client in started:
        if client.process.returncode is None:
            await client.stop()


def live_at(seq: int) -> Callable[[Line], bool]:
    return lambda line: (
        line["kind"] == "state" and line["state"]["seq"] == seq and line["state"]["live"]
    )


def without_view(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("cancelling", "live")}


async def test_a_job_is_followed_through_a_gateway_restart(
    database_url: str, eventlog: EventLog, follow: Any
) -> None:
    gateway = await start_gateway(database_url)
    port = gateway.port
    job_id = await new_job(eventlog, project="demo")  # queued, started: seq 2
    await eventlog.append(job_id, 2, [progress(v) for v in (5.0, 10.0, 15.0, 20.0)])
    client: NodeClient = await follow(port, token(), str(job_id))
    try:
        await client.wait(live_at(6))
        await eventlog.append(job_id, 6, [progress(30.0)])
        await client.wait(live_at(7))

        await gateway.close()  # 1012: the client reconnects and resumes
        await client.wait(lambda line: line["kind"] == "connection" and line.get("code") == 1012)
        await eventlog.append(job_id, 7, [progress(40.0), progress(35.0), progress(50.0)])
        gateway = await start_gateway(database_url, port=port)
        await client.wait(live_at(10))
        await eventlog.append(job_id, 10, [completed()])
        await client.wait(live_at(11))
    finally:
        stderr = await client.stop()
        await gateway.close()

    states = client.states()
    assert without_view(states[-1]) == encode_state(await eventlog.job_state(job_id)), stderr
    assert states[-1]["status"] == "completed"
    assert states[-1]["progress"] == 90.0
    for before, after in itertools.pairwise(states):
        assert after["progress"] >= before["progress"], "the progress went back"
        assert after["seq"] >= before["seq"]
    assert [line["seq"] for line in client.of("event")] == list(range(1, 12))
    statuses = [line["status"] for line in client.of("connection")]
    assert statuses[:3] == ["connecting", "open", "reconnecting"]
    assert statuses[-2:] == ["open", "closed"]
    assert client.of("error") == []
    assert client.process.returncode == 0, stderr


async def test_a_cancel_shows_cancelling_until_the_server_has_cancelled(
    database_url: str, make_client: ClientFactory, follow: Any
) -> None:
    api = await make_client(workers=0)  # no worker: the job stays queued until cancelled
    started = await api.post("/projects/demo/export", headers=auth())
    job_id = (await started.json())["jobId"]
    gateway = await start_gateway(database_url, export_url=str(api.make_url("")))
    client: NodeClient = await follow(gateway.port, token(), job_id)
    try:
        await client.wait(live_at(1))
        await client.send("cancel")
        ack = await client.wait(lambda line: line["kind"] == "ack")
        await client.wait(lambda line: line["kind"] == "state" and line["state"]["seq"] == 3)
        await client.send("cancel")  # the job has ended: refused, with its outcome
        await wait_for(lambda: len(client.of("ack")) == 2, 20)
    finally:
        stderr = await client.stop()
        await gateway.close()

    assert ack["ack"] == {"type": "export:cancel-ack", "jobId": job_id, "accepted": True, "seq": 2}
    refused = client.of("ack")[1]["ack"]
    assert refused["accepted"] is False
    assert refused["outcome"] == "cancelled"
    sent = client.of("cancel-sent")[0]["state"]
    assert (sent["status"], sent["cancelling"]) == ("queued", False)
    states = client.states()
    asked = next(i for i, s in enumerate(states) if s["cancelling"])
    assert states[asked]["status"] == "queued", "cancelling is shown before any event"
    # From the ask until the cancelled event: cancelling, never cleared, never cancelled early.
    cancelled = next(i for i, s in enumerate(states) if s["status"] == "cancelled")
    assert all(s["cancelling"] for s in states[asked:cancelled])
    assert all(s["seq"] >= 1 for s in states)
    final = states[-1]
    assert (final["status"], final["cancelling"], final["seq"]) == ("cancelled", False, 3)
    assert final["cancellation"]["cancelledBy"] == "user"
    assert client.of("error") == [], stderr
