"""A gateway killed with SIGKILL under its clients: they resume on the other one (guarantee 6).

Two gateways run as OS processes on one database. Fifteen clients follow three jobs (five each)
through gateway A while the jobs move on; A is killed with SIGKILL in the middle of that (no
closing handshake, no 1012: the sockets just break). Each client then connects to gateway B,
subscribes with the last seq it received, and carries on; the jobs keep moving all the while and
then end. Every client must end with exactly its job's log, each event once and in order, having
been told nothing twice and missed nothing, and B must have replayed to them what was appended
while they were reconnecting.
"""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from services.common.db import create_pool
from services.common.eventlog import EventLog
from tests.faults.stack import (
    Follower,
    Writer,
    free_port,
    gateway_env,
    own_job_of_writer,
    process,
    wait_until,
)

JOBS = 3
CLIENTS_PER_JOB = 5


@pytest.mark.timeout(60)
async def test_clients_of_a_killed_gateway_resume_on_the_other_without_loss_or_duplicate(
    database_url: str, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("gateway-a", "gateway-b", "nobody")}
    urls = [f"ws://127.0.0.1:{ports[name]}/ws" for name in ("gateway-a", "gateway-b")]
    pool = await create_pool(database_url, min_size=1, max_size=4)
    log = EventLog(pool, notify=True)
    tasks: list[asyncio.Task[None]] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        gateway_a, _ = await asyncio.gather(
            *(
                stack.enter_async_context(
                    process(
                        "services.gateway",
                        gateway_env(database_url, ports[name], ports["nobody"]),
                        f"http://127.0.0.1:{ports[name]}/readyz",
                        tmp_path / f"{name}.log",
                    )
                )
                for name in ("gateway-a", "gateway-b")
            )
        )
        jobs = [await own_job_of_writer(log) for _ in range(JOBS)]
        writers = [Writer(log, job_id) for job_id in jobs]
        # Every client knows both gateways and starts on A.
        followers = [Follower(urls, str(job_id)) for job_id in jobs for _ in range(CLIENTS_PER_JOB)]

        def cleanup() -> None:
            for task in tasks:
                task.cancel()

        stack.callback(cleanup)
        tasks += [asyncio.create_task(w.run()) for w in writers]
        tasks += [asyncio.create_task(f.run()) for f in followers]

        def check_tasks() -> None:
            for task in tasks:
                if task.done():
                    task.result()  # a writer or a client failed: say how

        def live_on(url: str, events: int) -> bool:
            check_tasks()
            return all(f.connected[-1:] == [url] and f.live >= events for f in followers)

        def where() -> str:
            return str([(f.connected, f.live) for f in followers])

        await wait_until(lambda: live_on(urls[0], 5), 20, "every client live on A", describe=where)
        appended_before = sum(len(w.acknowledged) for w in writers)
        os.kill(gateway_a.pid, signal.SIGKILL)
        assert await asyncio.wait_for(gateway_a.wait(), 10) == -signal.SIGKILL

        await wait_until(lambda: live_on(urls[1], 5), 20, "every client live on B", describe=where)
        for writer in writers:
            writer.stop.set()
        await wait_until(
            lambda: all(f.ended for f in followers), 20, "every stream to end", describe=where
        )
        check_tasks()
        logs = {str(job_id): await log.read_stream(job_id) for job_id in jobs}

    assert sum(len(w.acknowledged) for w in writers) > appended_before
    for follower in followers:
        assert not follower.problems, follower.problems
        assert follower.connected == urls, follower.connected
        assert follower.closes[0] is None, "A's connection did not simply break"
        events = logs[follower.job_id]
        assert [e["eventId"] for e in follower.events] == [str(e.event_id) for e in events]
        assert [e["seq"] for e in follower.events] == list(range(1, len(events) + 1))
    # What was appended while the clients were reconnecting came to them as B's replay.
    assert sum(f.replayed[1] for f in followers) > 0, [f.replayed for f in followers]
    print(
        f"{len(followers)} clients, {sum(len(v) for v in logs.values())} events in {JOBS} jobs,"
        f" {sum(f.replayed[1] for f in followers)} replayed by B after the kill"
    )
