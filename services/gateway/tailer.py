"""Following the log: one reader per gateway process, however many clients it serves.

A LISTEN connection turns each append's NOTIFY into a wake-up; the notification carries nothing
and is never trusted to arrive, so the reader also wakes on a poll timer and after every
reconnect of the listener. Each wake-up costs one query per page of new events.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import asyncpg
import structlog

from schemas.events import Event
from services.common.eventlog import EventLog
from services.common.notifier import CHANNEL

log = structlog.get_logger(__name__)


class Tailer:
    """Reads every new event once, in position order, and hands each page to `sink`."""

    def __init__(
        self,
        eventlog: EventLog,
        dsn: str,
        sink: Callable[[list[Event]], None],
        *,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
    ) -> None:
        self._eventlog = eventlog
        self._dsn = dsn
        self._sink = sink
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self.position = 0
        self.listening = False
        self.reads = 0
        self.events_read = 0

    async def run(self, *, start: int | None = None) -> None:
        """Follow the log from `start` (default: its current end) until cancelled."""
        self.position = await self._eventlog.head_position() if start is None else start
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen(), name="tailer-listen")
            tasks.create_task(self._read_loop(), name="tailer-read")

    def wake(self) -> None:
        """Ask for a read now (a notification, a reconnect, a test)."""
        self._wake.set()

    async def _read_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            try:
                await self._drain()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("reading the log failed; retrying", error=repr(exc))

    async def _drain(self) -> None:
        while True:
            events = await self._eventlog.tail(self.position, self._batch_size)
            self.reads += 1
            if events:
                self.position = events[-1].position
                self.events_read += len(events)
                self._sink(events)
            if len(events) < self._batch_size:
                return

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            closed = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("LISTEN connection failed", error=repr(exc), retry_in=backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                conn.add_termination_listener(lambda _c, done=closed: done.set())
                await conn.add_listener(CHANNEL, lambda *_args: self._wake.set())
                self.listening = True
                backoff = 0.1
                # Anything appended while we were not listening is read now.
                self._wake.set()
                while not closed.is_set():
                    try:
                        await asyncio.wait_for(closed.wait(), 10)
                    except TimeoutError:
                        # A connection that died without a word (a cut network) shows here.
                        await conn.execute("SELECT 1", timeout=5)
                log.warning("LISTEN connection lost; reconnecting")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection failed; reconnecting", error=repr(exc))
            finally:
                self.listening = False
                if not conn.is_closed():
                    await conn.close(timeout=2)
