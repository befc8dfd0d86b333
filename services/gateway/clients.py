"""One WebSocket client: its subscriptions, its bounded send queue, and the pump around them.

The protocol logic lives in `Subscription` (no I/O); this module carries out its actions: reads
from the log, and sends. Sends go through a bounded queue drained by one writer task; a client
that lets it fill up is closed with CLOSE_RESUME and resumes from its last seq (the log has
everything it missed). Live events arrive already encoded: one encoding per event per process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import structlog
from websockets.asyncio.server import ServerConnection

from schemas.events import encode_event
from schemas.wire import CaughtUp, EndOfStream, Error, StatusSync, server_encoder
from services.common.auth import Principal
from services.common.eventlog import EventLog

from .subscription import (
    Action,
    ReadPage,
    ReadSnapshot,
    Send,
    SendCaughtUp,
    SendEndOfStream,
    SendStatusSync,
    Subscription,
)

log = structlog.get_logger(__name__)

CLOSE_AUTH_FAILED = 4001
"""The token is missing, invalid or expired: get a fresh one and reconnect."""
CLOSE_RESUME = 4008
"""The client fell behind: reconnect and subscribe with the last seq seen; nothing is lost."""
CLOSE_RESTART = 1012
"""The gateway is restarting: reconnect (to another replica) and resume."""
CLOSE_TOKEN_EXPIRED = 4003
"""The token has expired: get a fresh one, reconnect and resume from the last seq."""
CLOSE_LIMIT = 4029
"""The client sent messages too fast or followed too many jobs (see the limits in the README)."""
SUBPROTOCOL = "exportlog.v1"
"""Offer it (with `bearer.<token>` beside it, for browsers that cannot set headers)."""


class Client:
    """A connected, authenticated client and everything it follows."""

    def __init__(
        self,
        connection: ServerConnection,
        principal: Principal,
        token: str,
        eventlog: EventLog,
        *,
        max_queue: int,
        page_size: int,
        unregister: Callable[[uuid.UUID, Client], None],
    ) -> None:
        self.connection = connection
        self.principal = principal
        self.token = token
        self._eventlog = eventlog
        self._page_size = page_size
        self._unregister = unregister
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_queue)
        self.reads: asyncio.Queue[tuple[uuid.UUID, Action]] = asyncio.Queue()
        self.subscriptions: dict[uuid.UUID, Subscription] = {}
        self.overflowed = False
        self.overflow = asyncio.Event()
        # Replays wait for room and leave half the queue to live events, so a long replay is
        # paced by the client (flow control) and never pushes live events into an overflow.
        self._replay_room = max(max_queue // 2, 1)
        self._drained = asyncio.Event()

    # -- sending ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes for the writer; a full queue means the client cannot keep up."""
        if self.overflowed:
            return
        try:
            self.outbox.put_nowait(data)
        except asyncio.QueueFull:
            # Its connection handler closes it with CLOSE_RESUME; what it could not take is
            # dropped, the log keeps it.
            self.overflowed = True
            self.overflow.set()
            log.info("client too slow; asking it to resume", user=self.principal.user_id)

    def error(self, code: str, message: str) -> None:
        self.send(server_encoder.encode(Error(code=code, message=message)))

    async def write(self) -> None:
        """The writer task: one send at a time, in queue order."""
        while True:
            data = await self.outbox.get()
            self._drained.set()
            await self.connection.send(data.decode())

    async def _send_paced(self, data: bytes) -> None:
        while self.outbox.qsize() >= self._replay_room and not self.overflowed:
            self._drained.clear()
            await self._drained.wait()
        self.send(data)

    # -- carrying out a subscription's actions ----------------------------------------------

    def dispatch(
        self, job_id: uuid.UUID, actions: list[Action], live: dict[int, bytes] | None = None
    ) -> None:
        """Carry out actions: sends now, reads by the reader task. `live` holds the already
        encoded bytes of live events, by seq."""
        for action in actions:
            match action:
                case Send(event=event):
                    encoded = live.get(event.seq) if live else None
                    self.send(encoded if encoded is not None else encode_event(event))
                case SendStatusSync(state=state, seq=seq):
                    self.send(
                        server_encoder.encode(StatusSync(job_id=job_id, seq=seq, state=state))
                    )
                case SendCaughtUp(seq=seq):
                    self.send(server_encoder.encode(CaughtUp(job_id=job_id, seq=seq)))
                case SendEndOfStream(seq=seq):
                    self.send(server_encoder.encode(EndOfStream(job_id=job_id, seq=seq)))
                    self.subscriptions.pop(job_id, None)
                    self._unregister(job_id, self)
                case ReadSnapshot() | ReadPage():
                    self.reads.put_nowait((job_id, action))

    async def read(self) -> None:
        """The reader task: the log reads the subscriptions ask for, one at a time."""
        while True:
            job_id, action = await self.reads.get()
            subscription = self.subscriptions.get(job_id)
            if subscription is None:
                continue
            if isinstance(action, ReadSnapshot):
                state = await self._eventlog.job_state(job_id)
                if state is None or not self.principal.can_read(state.project_id):
                    # The same answer for "no such job" and "not yours": existence is not
                    # revealed. Nothing of the job was sent: live events wait for the snapshot.
                    self.subscriptions.pop(job_id, None)
                    self._unregister(job_id, self)
                    self.error("not_found", f"no export {job_id} you may follow")
                    continue
                self.dispatch(job_id, subscription.on_snapshot(state))
            elif isinstance(action, ReadPage):
                events = await self._eventlog.read_stream(job_id, action.after_seq, action.limit)
                for follow_up in subscription.on_page(events):
                    if isinstance(follow_up, Send):
                        await self._send_paced(encode_event(follow_up.event))
                    else:
                        self.dispatch(job_id, [follow_up])

    def subscribe(self, job_id: uuid.UUID, after_seq: int | None) -> Subscription | None:
        if job_id in self.subscriptions:
            self.error("already_subscribed", f"already following export {job_id}")
            return None
        subscription = Subscription(job_id, after_seq, page_size=self._page_size)
        self.subscriptions[job_id] = subscription
        return subscription
