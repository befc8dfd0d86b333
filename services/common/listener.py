"""A LISTEN connection that stays up: reconnects with backoff, notices silent deaths.

NOTIFY is only ever a hint here. Whoever listens must also poll, and must re-read after every
(re)connect, since notifications sent while the connection was down are gone: `on_connected` is
called each time the connection is (re)established, for exactly that.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping

import asyncpg
import structlog

from .db import CONNECT_TIMEOUT, discard
from .timing import wait_event

log = structlog.get_logger(__name__)

Handler = Callable[[str], None]
"""Called with a notification's payload."""


class Listener:
    """LISTENs on some channels until cancelled; `connected` says whether it is listening now."""

    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler],
        *,
        on_connected: Callable[[], None] = lambda: None,
        name: str = "listener",
        keepalive: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._handlers = dict(handlers)
        self._on_connected = on_connected
        self._name = name
        self._keepalive = keepalive
        self.connected = False

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with jittered exponential backoff."""
        backoff = 0.1
        while True:
            closed = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
            except Exception as exc:  # whatever it is, the next try may work: never give up
                log.warning(
                    "LISTEN connection failed",
                    listener=self._name,
                    error=repr(exc),
                    retry_in=backoff,
                )
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                conn.add_termination_listener(lambda _c, done=closed: done.set())
                for channel, handler in self._handlers.items():
                    await conn.add_listener(
                        channel, lambda _c, _pid, _ch, payload, h=handler: h(payload)
                    )
                self.connected = True
                backoff = 0.1
                self._on_connected()
                while not closed.is_set():
                    if not await wait_event(closed, self._keepalive):
                        # A connection that died without a word (a cut network) shows here.
                        await conn.execute("SELECT 1", timeout=5)
                log.warning("LISTEN connection lost; reconnecting", listener=self._name)
            except Exception as exc:
                # Not only the database's error classes: a connection the server ended can make
                # asyncpg raise InternalClientError. Anything that ended this run ends only this
                # connection; the loop reconnects.
                log.warning(
                    "LISTEN connection failed; reconnecting", listener=self._name, error=repr(exc)
                )
            finally:
                listened, self.connected = self.connected, False
                await discard(conn)
            if not listened:
                # Connected but could not LISTEN: wait before the next try, as for a failed
                # connect, rather than spin on a server that accepts and then fails.
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
