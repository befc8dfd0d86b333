"""The gateway process over real sockets: health, readiness, metrics and its log tailer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
import websockets

from services.common.eventlog import EventLog
from services.common.notifier import Notifier
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.support import new_job, progress, wait_for


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[Gateway]:
    # A poll interval far longer than any test: only a NOTIFY can wake the tailer in time.
    gateway = Gateway(
        GatewayConfig(database_url=database_url, port=0, poll_interval=300, jwt_secret="x" * 32)
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


async def test_health_and_readiness(gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200

        async def ready() -> bool:
            async with session.get(f"{base}/readyz") as response:
                return response.status == 200

        await wait_for(ready)
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            assert "gateway_tail_position" in await response.text()


async def test_a_notify_wakes_the_tailer_and_one_read_covers_many_events(
    gateway: Gateway, eventlog: EventLog
) -> None:
    # Listening, and past the catch-up read that follows every (re)connect of the listener.
    await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
    reads_before = gateway.tailer.reads
    job_id = await new_job(eventlog)
    result = await eventlog.append(job_id, 2, [progress(i) for i in range(50)])

    await wait_for(lambda: gateway.tailer.position == result.last_position)
    # Three appends, each one NOTIFY; the reads are per wake-up, not per event.
    assert gateway.tailer.reads - reads_before <= 3
    assert gateway.tailer.events_read >= 52


async def test_websocket_upgrades_elsewhere_than_ws_are_refused_with_a_reason(
    gateway: Gateway,
) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/elsewhere"):
            pass
    assert info.value.response.status_code == 404
    assert b"/ws" in info.value.response.body


async def test_close_is_safe_twice(database_url: str) -> None:
    gateway = Gateway(GatewayConfig(database_url=database_url, port=0, jwt_secret="x" * 32))
    await gateway.start()
    await gateway.close()
    await gateway.close()


async def test_an_after_commit_notify_wakes_the_tailer(
    gateway: Gateway, pool: asyncpg.Pool, database_url: str
) -> None:
    notifier = Notifier(database_url)
    sending = asyncio.create_task(notifier.run())
    try:
        log = EventLog(pool, notify=False, on_commit=notifier.poke)
        await wait_for(lambda: gateway.tailer.listening and gateway.tailer.reads >= 1)
        job_id = await new_job(log)
        result = await log.append(job_id, 2, [progress(1)])
        await wait_for(lambda: gateway.tailer.position == result.last_position)
        assert notifier.sent in (1, 2, 3)

        # Pokes that arrive together share one NOTIFY.
        sent = notifier.sent
        for _ in range(100):
            notifier.poke()
        await wait_for(lambda: notifier.sent > sent)
        assert notifier.sent - sent <= 2
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
