"""PostgreSQL restarts under load, and the services come back by themselves (guarantees 6 and 8).

The test owns its PostgreSQL: an embedded cluster in a temporary folder (durable: fsync and
synchronous commit on, as in production), never the session's shared server. An export service
and a gateway run against it as OS processes; two exports run, the test appends to a job of its
own at a steady rate, and a client follows each job through the gateway. Then PostgreSQL stops
(immediate mode: a crash, as far as clients can tell, recovered from the WAL on start; or fast
mode) and starts again on the same port, with nothing restarted but PostgreSQL.

Afterwards both services are ready again without help, the gateway's LISTEN is back (its poll
timer is set to 30 s here, so only a NOTIFY delivers an event within seconds: from the test's
appends, which notify in their transaction, and from the export service's notifier), a new
export runs to completion, each job has exactly one outcome and a sound hash chain, every event
an append returned success for is in the log, and each client received exactly its job's log.
A client that connects while the database is down is answered (closed with 1011), not left
waiting.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import websockets

from schemas.events import OUTCOME_TYPES
from services.common.db import create_pool, migrate
from services.common.embedded import EmbeddedPostgres
from services.common.eventlog import EventLog
from services.export.config import ExportConfig
from tests.faults.stack import (
    Follower,
    Writer,
    export_env,
    free_port,
    gateway_env,
    own_job_of_writer,
    process,
    token,
    wait_until,
)


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A durable cluster of this test's own on a fixed port (a restart keeps the DSN).

    Its folder is not under pytest's temporary root: as root the server runs as an unprivileged
    account, which needs to traverse every folder above its data, and a pytest session starting
    meanwhile (another `make test`) resets that root to 0700, which the server then finds out
    as "permission denied" on its own files. Its log is kept in the test's folder."""
    folder = Path(tempfile.mkdtemp(prefix="exportlog-faults-pg-"))
    pg = EmbeddedPostgres(folder, port=free_port(), durable=True)
    try:
        url = await asyncio.to_thread(pg.start)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield pg, url
    finally:
        await asyncio.to_thread(pg.stop)
        if pg.log_file.exists():
            shutil.copy(pg.log_file, tmp_path / "postgres.log")
        await asyncio.to_thread(shutil.rmtree, folder, True)


def postmaster_pid(pg: EmbeddedPostgres) -> int:
    return int((pg.pgdata / "postmaster.pid").read_text().splitlines()[0])


async def stop_postgres(pg: EmbeddedPostgres, mode: str) -> None:
    """Stop the server: `fast` (pg_ctl: sessions rolled back, a checkpoint) or `immediate`
    (SIGQUIT to the postmaster: every process exits at once; the next start recovers)."""
    if mode == "fast":
        await asyncio.to_thread(pg.stop)
        return
    os.kill(postmaster_pid(pg), signal.SIGQUIT)
    await wait_until(
        lambda: not (pg.pgdata / "postmaster.pid").exists(), 30, "the postmaster to exit"
    )


async def ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def probe_while_down(url: str, job_id: uuid.UUID) -> int | None:
    """A client that subscribes while the database is down: the close code it gets."""
    async with websockets.connect(url, open_timeout=5, close_timeout=1) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token()}))
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
        try:
            async with asyncio.timeout(15):
                async for _ in ws:
                    pass
        except websockets.ConnectionClosed:
            pass
        return ws.close_code


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_services_come_back_by_themselves_after_postgres_restarts(
    own_postgres: tuple[EmbeddedPostgres, str],
    export_config: ExportConfig,
    tmp_path: Path,
    mode: str,
) -> None:
    postgres, url = own_postgres
    export_port, gateway_port = free_port(), free_port()
    api = f"http://127.0.0.1:{export_port}"
    gateway_http = f"http://127.0.0.1:{gateway_port}"
    ws_url = f"ws://127.0.0.1:{gateway_port}/ws"
    headers = {"Authorization": f"Bearer {token()}"}
    pool = await create_pool(url, min_size=1, max_size=4)
    log = EventLog(pool, notify=True)
    tasks: list[asyncio.Task[Any]] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        await asyncio.gather(
            stack.enter_async_context(
                process(
                    "services.export",
                    export_env(export_config, url, export_port, "survivor", WORKERS="2"),
                    f"{api}/readyz",
                    tmp_path / "export.log",
                )
            ),
            stack.enter_async_context(
                process(
                    "services.gateway",
                    gateway_env(url, gateway_port, export_port, POLL_INTERVAL="30"),
                    f"{gateway_http}/readyz",
                    tmp_path / "gateway.log",
                )
            ),
        )
        http = await stack.enter_async_context(aiohttp.ClientSession(headers=headers))

        async def start_export(project: str) -> str:
            async with http.post(f"{api}/projects/{project}/export") as response:
                assert response.status == 202, await response.text()
                job_id: str = (await response.json())["jobId"]
                return job_id

        own_job = await own_job_of_writer(log)
        writer = Writer(log, own_job)
        # Two run across the restart, two wait for a worker through it.
        exports = [await start_export("big") for _ in range(4)]
        followers = [Follower([ws_url], str(own_job))] + [Follower([ws_url], j) for j in exports]

        def cleanup() -> None:
            writer.stop.set()
            for task in tasks:
                task.cancel()

        stack.callback(cleanup)
        tasks.append(asyncio.create_task(writer.run()))
        tasks += [asyncio.create_task(f.run()) for f in followers]

        async def under_way() -> bool:
            for task in tasks:
                if task.done():
                    task.result()  # a client or the writer failed: say how
            running = []
            for follower in followers[1:]:
                state = await log.job_state(uuid.UUID(follower.job_id))
                if state is not None and state.status == "running" and state.progress > 0:
                    running.append(follower)
            return (
                len(running) >= 2
                and all(f.live > 0 for f in [followers[0], *running])
                and len(writer.acknowledged) >= 30
            )

        def progress() -> str:
            return (
                f"clients live {[f.live for f in followers]}, "
                f"{len(writer.acknowledged)} appends acknowledged, {writer.failures} failed"
            )

        await wait_until(
            under_way, 30, "the exports, the writer and the clients under way", describe=progress
        )
        before_restart = {f.job_id: [e["eventId"] for e in f.events] for f in followers}
        acknowledged_before = len(writer.acknowledged)

        await stop_postgres(postgres, mode)
        down_at = time.monotonic()
        failures = writer.failures

        async def both_unready() -> bool:
            return not await ready(http, f"{api}/readyz") and not await ready(
                http, f"{gateway_http}/readyz"
            )

        # Down for real: both services and the writer have noticed.
        await wait_until(both_unready, 15, "both services to report the database gone")
        await wait_until(lambda: writer.failures > failures, 15, "an append to fail")
        code = await asyncio.wait_for(probe_while_down(ws_url, own_job), 20)
        assert code == 1011, f"a client that subscribed while the database was down got {code}"

        await asyncio.to_thread(postgres.start)
        up_at = time.monotonic()
        for name, base in (("export service", api), ("gateway", gateway_http)):
            await wait_until(lambda b=base: ready(http, f"{b}/readyz"), 20, f"the {name} ready")
        ready_in = time.monotonic() - up_at

        def outcome_seen(follower: Follower) -> bool:
            return any(e["type"] in OUTCOME_TYPES for e in follower.events)

        # The gateway's tail wakes by NOTIFY again (the test's appends notify in their own
        # transaction): what is appended now reaches the client within seconds, although the
        # gateway polls only every 30 s. Then the test's job ends.
        own = followers[0]
        target = writer.seq + 6
        await wait_until(lambda: own.seq >= target, 10, "a new event to reach the client")
        writer.stop.set()
        await wait_until(lambda: outcome_seen(own), 10, "the test's job to end")
        # Now nothing but the export service wakes the gateway: a job queued now is claimed,
        # run, and followed live only if the export service's notifier is connected again.
        late = await start_export("demo")
        late_follower = Follower([ws_url], late)
        followers.append(late_follower)
        tasks.append(asyncio.create_task(late_follower.run()))
        await wait_until(lambda: outcome_seen(late_follower), 15, "the new export to finish")
        await wait_until(lambda: all(map(outcome_seen, followers)), 45, "every job to end")

        verified = {}
        logs = {}
        for follower in followers:
            job_id = uuid.UUID(follower.job_id)
            logs[follower.job_id] = await log.read_stream(job_id)
            verified[follower.job_id] = await log.verify(job_id)
        states = {job_id: await log.job_state(uuid.UUID(job_id)) for job_id in logs}

    for follower in followers:
        events = logs[follower.job_id]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        report = verified[follower.job_id]
        assert report.ok, report
        assert report.events_checked == len(events), report
        outcomes = [e.type for e in events if e.type in OUTCOME_TYPES]
        assert len(outcomes) == 1, outcomes
        assert not follower.problems, follower.problems
        # Exactly the log, each event once, across the restart (the client stops at the
        # outcome: a completed job's stream stays open for downloads).
        received = [e["eventId"] for e in follower.events]
        assert received == [str(e.event_id) for e in events][: len(received)]
        assert received[-1] == str(next(e for e in events if e.type in OUTCOME_TYPES).event_id)
        seen_before = before_restart.get(follower.job_id, [])
        assert received[: len(seen_before)] == seen_before
    stored = {e.event_id for e in logs[str(own_job)]}
    lost = [event_id for event_id in writer.acknowledged if event_id not in stored]
    assert not lost, f"{len(lost)} acknowledged events lost (of {len(writer.acknowledged)})"
    assert len(writer.acknowledged) > acknowledged_before
    # Every export ran to completion: those that ran across the restart, those that waited for
    # a worker through it, and the one queued after it.
    for export in [*exports, late]:
        state = states[export]
        assert state is not None, export
        assert state.status == "completed", state
    print(
        f"{mode}: down {up_at - down_at:.2f} s, services ready {ready_in:.2f} s after the start,"
        f" {writer.failures} failed appends retried, {len(writer.acknowledged)} acknowledged"
    )
