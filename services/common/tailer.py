"""Following the log: one reader per process (the gateway's fan-out, the export service's
Server-Sent Events hub), however many clients it serves.

A LISTEN connection turns each append's NOTIFY into a wake-up; the notification carries nothing
and is never trusted to arrive, so the reader also wakes on a poll timer and after every
reconnect of the listener. Each wake-up costs one query per page of new events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from schemas.events import Event
from services.common.db import DATABASE_ERRORS
from services.common.eventlog import EventLog
from services.common.listener import Listener
from services.common.notifier import CHANNEL
from services.common.timing import wait_event

log = structlog.get_logger(__name__)

RETRY_MIN = 0.1
"""Seconds before the first retry of a failed read; later ones wait twice as long, up to the
poll interval. A read that failed is tried again soon, without waiting for a NOTIFY."""


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
        # Anything appended while we were not listening is read on every (re)connect.
        self._listener = Listener(
            dsn,
            {CHANNEL: lambda _payload: self._wake.set()},
            on_connected=self._wake.set,
            name="tailer",
        )
        self.position = 0
        self.reads = 0
        self.events_read = 0

    async def run(self, *, start: int | None = None) -> None:
        """Follow the log from `start` (default: its current end) until cancelled."""
        self.position = await self._eventlog.head_position() if start is None else start
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listener.run(), name="tailer-listen")
            tasks.create_task(self._read_loop(), name="tailer-read")

    @property
    def listening(self) -> bool:
        return self._listener.connected

    def wake(self) -> None:
        """Ask for a read now (a notification, a reconnect, a test)."""
        self._wake.set()

    async def _read_loop(self) -> None:
        retry = 0.0  # after a failed read: seconds until the next try (doubling)
        while True:
            await wait_event(self._wake, retry or self._poll_interval)
            self._wake.clear()
            try:
                await self._drain()
            except Exception as exc:
                # No failure of a read may end the tail: the process would stay up and deliver
                # nothing more (a bug in a sink included: it is logged with its traceback).
                retry = min(max(retry * 2, RETRY_MIN), self._poll_interval)
                if isinstance(exc, DATABASE_ERRORS):
                    log.warning("reading the log failed; retrying", error=repr(exc), retry_in=retry)
                else:
                    log.exception("reading the log failed; retrying", retry_in=retry)
            else:
                retry = 0.0

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
