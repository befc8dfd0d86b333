"""The long-lived database loops survive whatever the driver raises (found restarting PostgreSQL).

After PostgreSQL restarts, asyncpg can hand out a pooled connection the server has just ended,
and the next query on it raises `InternalClientError` ("cannot switch to state 12; another
operation (2) is in progress"), which is none of OSError, PostgresError or InterfaceError. The
gateway's tailer caught only those, so one such error ended its tail for good: the process stayed
up, its readiness said "stopped: tailer", and no client got another live event. The listener and
the notifier had the same narrow catches around their connections.

`test_postgres_restart.py` meets the error by chance (the fast restart, about one run in three);
these tests raise it on purpose, once, and check that each loop carries on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from schemas.events import Event
from services.common.eventlog import EventLog
from services.common.listener import Listener
from services.common.notifier import Notifier
from services.common.tailer import Tailer
from tests.faults.stack import wait_until
from tests.support import new_job

CONFUSED = "cannot switch to state 12; another operation (2) is in progress"


class OnceBrokenLog(EventLog):
    """An event log whose first read fails as asyncpg fails on a connection the server ended."""

    failures = 0

    async def tail(self, cursor: int, limit: int = 1000) -> list[Event]:
        if not self.failures:
            self.failures += 1
            raise asyncpg.InternalClientError(CONFUSED)
        return await super().tail(cursor, limit)


async def test_the_tail_goes_on_after_a_read_fails_with_an_unexpected_error(
    pool: asyncpg.Pool, database_url: str
) -> None:
    log = OnceBrokenLog(pool)
    seen: list[Event] = []
    tailer = Tailer(log, database_url, seen.extend, poll_interval=30)
    task = asyncio.create_task(tailer.run(start=0))
    try:
        await wait_until(lambda: log.failures == 1, 10, "the failed read")
        job_id = await new_job(log)  # its NOTIFY wakes the tailer
        await wait_until(lambda: len(seen) == 2 or task.done(), 10, "the events after the failure")
        assert not task.done(), task
        assert [e.job_id for e in seen] == [job_id, job_id]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def connect_failing_once(monkeypatch: pytest.MonkeyPatch, error: Exception) -> Callable[[], int]:
    """Make the first `asyncpg.connect` fail with `error`; the number of calls so far."""
    real = asyncpg.connect
    calls = 0

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "connect", connect)
    return lambda: calls


async def test_the_listener_reconnects_after_unexpected_errors(
    pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = connect_failing_once(monkeypatch, asyncpg.InternalClientError(CONFUSED))
    payloads: list[str] = []
    connected = 0

    def on_connected() -> None:
        nonlocal connected
        connected += 1
        if connected == 1:  # a failure inside a listening session, once
            raise asyncpg.InternalClientError(CONFUSED)

    listener = Listener(
        database_url, {"fault_test": payloads.append}, on_connected=on_connected, name="test"
    )
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: listener.connected or task.done(), 10, "listening again")
        assert not task.done(), task
        assert calls() == 3, "a connect that failed, a session that failed, a good one"
        await pool.execute("SELECT pg_notify('fault_test', 'hello')")
        await wait_until(lambda: payloads == ["hello"], 10, "the notification")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_notifier_reconnects_after_an_unexpected_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("fault_test", lambda *args: received.append(args[-1]))
    connect_failing_once(monkeypatch, asyncpg.InternalClientError(CONFUSED))
    notifier = Notifier(database_url, channel="fault_test")
    task = asyncio.create_task(notifier.run())
    try:
        notifier.poke()
        await wait_until(lambda: received or task.done(), 10, "the NOTIFY")
        assert not task.done(), task
        assert notifier.sent == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listener.close()
