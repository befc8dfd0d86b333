"""Clients that read slowly or not at all cannot make the gateway's memory grow (guarantee 7).

`tests/gateway/test_protocol.py` checks in process that one stalled client is closed with 4008
and then resumes without loss. This is the fault version, against a gateway OS process and with
its memory measured: 50 clients subscribe to a job and never read a byte, five read one message
every 5 ms, and one normal client follows the job, while another process appends 24,000 events
of about 1.3 KB to it at 4,000 a second (a flood: an export reports a few a second).

The gateway must close every slow client with 4008 (the five readers see the code; the fifty that
never read may see only the cut connection, since their close frame waits behind what they do
not read, so the gateway's own count of such closes is checked too), and the normal client must
receive every event exactly once on its one connection. Memory, from /proc/<pid>/status of the
gateway process:

* It stops growing: while the second half of the flood goes through, VmRSS rises by at most
  4 MiB. A gateway that kept what slow clients cannot take would hold every frame of the flood
  for each of them (the frames are shared, so about 1.3 KB plus 55 pointers an event): some
  20 MiB more over the second half alone, and more for as long as events flow.
* Its peak (VmHWM) stays within a budget over VmRSS before the flood:

      per slow client     at most GATEWAY_MAX_QUEUE_BYTES (256 KiB) of frames waiting for its
                          socket, plus its connection's write buffer: the 32 KiB high-water
                          mark and one write, of at most what may wait (256 KiB)
                          = 544 KiB, so 55 × 544 KiB ≈ 29 MiB
      the rest            16 MiB: a tail page (100 events read, decoded and encoded), the
                          normal client's frames, the allocator's slack
      budget              45 MiB

  Kernel socket buffers (GATEWAY_SEND_BUFFER) are not in RSS.

The limits are set so that one tail page and one replay page (100 events, 130 KB) fit in
GATEWAY_MAX_QUEUE_BYTES: a client is closed today whenever more than that many bytes are sent to
it in one turn of the gateway's loop, even when its socket takes everything (see the report of
issue 9), which would close the normal client too.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from services.common.db import create_pool
from services.common.eventlog import EventLog
from services.gateway.clients import CLOSE_RESUME
from tests.faults.stack import (
    Follower,
    free_port,
    gateway_env,
    metric,
    own_job_of_writer,
    process,
    rss_kib,
    stalled_client,
    wait_until,
)

STALLED = 50
SLOW = 5
EVENTS = 16_000
BATCH = 400
RATE = 2_000.0
ROOT = Path(__file__).resolve().parents[2]
MAX_QUEUE = 1000
MAX_QUEUE_BYTES = 256 * 1024
PAGES = 100  # events per tail read and per replay frame
BUDGET_KIB = 45 * 1024
LATE_GROWTH_KIB = 4 * 1024


async def flood(database_url: str, job_id: uuid.UUID) -> None:
    """EVENTS events into the job, from a process of their own (`tests.faults.flood`)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.flood",
        database_url,
        str(job_id),
        str(EVENTS),
        str(BATCH),
        str(RATE),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, error = await asyncio.wait_for(child.communicate(), 60)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0, error.decode()


async def slow_reader(port: int, job_id: uuid.UUID) -> int | None:
    """Reads a message every 5 ms until the gateway closes; the close code it received."""
    ws = await stalled_client(port, str(job_id))
    async with ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(60):
                while True:
                    await ws.recv()
                    await asyncio.sleep(0.005)  # the slowness under test, not a wait
        return ws.close_code


async def closed_within(ws: ClientConnection, timeout: float) -> int | None:
    """Read what a stalled client left unread until its connection ends; its close code
    (None when the gateway had to cut the connection without a close frame getting through)."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code if ws.close_code != 1006 else None


@pytest.mark.timeout(90)
async def test_clients_that_do_not_read_are_closed_and_the_gateway_memory_stays_bounded(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/ws"
    pool = await create_pool(database_url, min_size=1, max_size=4)
    log = EventLog(pool, notify=True)
    tasks: list[asyncio.Task[object]] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        gateway = await stack.enter_async_context(
            process(
                "services.gateway",
                gateway_env(
                    database_url,
                    port,
                    free_port(),
                    MAX_QUEUE=str(MAX_QUEUE),
                    MAX_QUEUE_BYTES=str(MAX_QUEUE_BYTES),
                    TAIL_BATCH=str(PAGES),
                    PAGE_SIZE=str(PAGES),
                    CLOSE_TIMEOUT="5",
                ),
                f"{base}/readyz",
                tmp_path / "gateway.log",
            )
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())

        def cleanup() -> None:
            for task in tasks:
                task.cancel()

        stack.callback(cleanup)
        job_id = await own_job_of_writer(log)
        stalled = [await stalled_client(port, str(job_id)) for _ in range(STALLED)]

        def cut_stalled() -> None:  # they would not take a closing handshake
            for ws in stalled:
                ws.transport.abort()

        stack.callback(cut_stalled)
        slow = [asyncio.create_task(slow_reader(port, job_id)) for _ in range(SLOW)]
        # A client that reads as fast as it can, with a receive buffer of a few megabytes (as
        # the kernel's autotuning gives a busy connection), so that a moment without CPU in
        # this test's process, beside PostgreSQL, the gateway and the writer on two cores, is
        # not taken for a slow client.
        normal = Follower([url], str(job_id), receive_buffer=4 * 1024 * 1024)
        tasks += [*slow, asyncio.create_task(normal.run())]

        async def everyone_connected() -> bool:
            connections = await metric(http, f"{base}/metrics", "gateway_connections")
            return connections == STALLED + SLOW + 1 and bool(normal.connected)

        await wait_until(everyone_connected, 20, "every client connected")
        baseline = rss_kib(gateway.pid)
        samples: list[tuple[float, int]] = []
        clock = asyncio.get_running_loop().time

        async def sample() -> None:
            while True:
                samples.append((clock(), rss_kib(gateway.pid)))
                await asyncio.sleep(0.02)

        tasks.append(asyncio.create_task(sample()))
        began = clock()
        await flood(database_url, job_id)
        ended = clock()
        await wait_until(
            lambda: normal.ended,
            30,
            "the normal client to get every event",
            describe=lambda: f"at seq {normal.seq}, closes {normal.closes}",
        )

        # Memory first: it is what this test is about, and it is measured as the flood ends.
        peak = max(rss_kib(gateway.pid, "VmHWM"), *(rss for _, rss in samples))
        halfway = (began + ended) / 2
        first_half = max(rss for at, rss in samples if at <= halfway)
        second_half = max(rss for at, rss in samples if halfway < at <= ended)
        late = second_half - first_half
        grew = peak - baseline
        print(
            f"gateway RSS {baseline / 1024:.1f} MiB before the flood, {first_half / 1024:.1f} MiB"
            f" at most in its first half, {second_half / 1024:.1f} MiB in its second;"
            f" peak {peak / 1024:.1f} MiB (+{grew / 1024:.1f} MiB, budget {BUDGET_KIB / 1024:.0f}"
            f" MiB) over {EVENTS} events in {ended - began:.1f} s"
        )
        assert late <= LATE_GROWTH_KIB, f"still growing: +{late} KiB in the flood's second half"
        assert grew <= BUDGET_KIB, f"the gateway grew by {grew} KiB, over {BUDGET_KIB} KiB"

        async def slow_ones_closed() -> bool:
            closed = await metric(http, f"{base}/metrics", "gateway_slow_clients_closed_total")
            return closed >= STALLED + SLOW

        await wait_until(slow_ones_closed, 20, "the gateway to close every slow client")
        slow_codes = await asyncio.wait_for(asyncio.gather(*slow), 30)
        stalled_codes = await asyncio.gather(*(closed_within(ws, 10) for ws in stalled))
        remaining = await metric(http, f"{base}/metrics", "gateway_connections")
        events = await log.read_stream(job_id)
    print(f"the stalled clients saw {sorted(set(stalled_codes), key=str)} (None: a cut)")

    assert slow_codes == [CLOSE_RESUME] * SLOW, slow_codes
    # A stalled client sees 4008 when its close frame got through, else the cut connection.
    assert set(stalled_codes) <= {CLOSE_RESUME, None}, stalled_codes
    assert remaining == 0
    # The normal client beside them got every event once, in order, on its one connection.
    assert not normal.problems, normal.problems
    assert len(normal.connected) == 1, normal.closes
    assert [e["eventId"] for e in normal.events] == [str(e.event_id) for e in events]
