"""Waking the log's readers after commits, outside the append transactions.

A NOTIFY inside each append transaction takes PostgreSQL's global notification lock at commit,
which serialises commits: measured here, it costs a fifth of the append rate at 16 writers
(`make bench`). The notifier instead sends one NOTIFY from a connection of its own after
commits: while one is in flight, every further commit only raises a flag, and all of them share
the next NOTIFY. The notification carries nothing; readers re-read the log, and also poll, so a
NOTIFY lost to a crash between commit and send costs latency, never events.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import structlog

from .db import CONNECT_TIMEOUT, discard

log = structlog.get_logger(__name__)

CHANNEL = "exportlog_events"


class Notifier:
    """One per writing process. `poke()` after a commit; `run()` is owned by the process."""

    def __init__(self, dsn: str, *, channel: str = CHANNEL) -> None:
        self._dsn = dsn
        self._channel = channel
        self._pending = asyncio.Event()
        self.sent = 0

    def poke(self) -> None:
        """Something was committed: readers should look. Cheap, never blocks."""
        self._pending.set()

    async def run(self) -> None:
        """Send coalesced NOTIFYs until cancelled, reconnecting when the connection drops."""
        backoff = 0.1
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
            except Exception as exc:  # whatever it is, the next try may work: never give up
                log.warning("notifier cannot connect", error=repr(exc), retry_in=backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                while True:
                    await self._pending.wait()
                    self._pending.clear()
                    await conn.execute("SELECT pg_notify($1, '')", self._channel)
                    self.sent += 1
                    backoff = 0.1
            except Exception as exc:
                # Not only the database's error classes: after the server ended the connection,
                # asyncpg may raise InternalClientError. Whatever it was, this process's readers
                # must go on being woken: reconnect (at once the first time).
                log.warning("notifier connection lost", error=repr(exc), retry_in=backoff)
                self._pending.set()  # the NOTIFY that failed is owed
            finally:
                await discard(conn)
            if backoff > 0.1:
                await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)
