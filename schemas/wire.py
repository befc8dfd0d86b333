"""The gateway's WebSocket messages: one tagged union per direction.

Events themselves travel in their envelope (`schemas.events.Event`, `type` "export:…"); the
messages here frame them: authenticate, subscribe, and the markers of a status-sync
(`export:status-sync`, `export:caught-up`, `export:end-of-stream`).
"""

from __future__ import annotations

from typing import TypeAlias
from uuid import UUID

import msgspec

from schemas.state import JobState


class _ClientMessage(msgspec.Struct, frozen=True, kw_only=True, rename="camel", tag_field="type"):
    pass


class Authenticate(_ClientMessage, frozen=True, tag="auth"):
    """The first message when the token is not in `Sec-WebSocket-Protocol`."""

    token: str


class Subscribe(_ClientMessage, frozen=True, tag="subscribe"):
    """Follow one job. `afterSeq`: the last seq the client saw; absent for the state only."""

    job_id: UUID
    after_seq: int | None = None


class Unsubscribe(_ClientMessage, frozen=True, tag="unsubscribe"):
    job_id: UUID


class CancelExport(_ClientMessage, frozen=True, tag="export:cancel"):
    """Ask for a cancel; the gateway forwards it to the export service as this user."""

    job_id: UUID


class Ping(_ClientMessage, frozen=True, tag="ping"):
    """An application-level ping, for clients (browsers) that cannot see WebSocket pings."""


ClientMessage: TypeAlias = Authenticate | Subscribe | Unsubscribe | CancelExport | Ping


class _ServerMessage(msgspec.Struct, frozen=True, kw_only=True, rename="camel", tag_field="type"):
    pass


class StatusSync(_ServerMessage, frozen=True, tag="export:status-sync"):
    """The authoritative state of the job (the fold of its events up to `seq`)."""

    job_id: UUID
    seq: int
    state: JobState | None


class CaughtUp(_ServerMessage, frozen=True, tag="export:caught-up"):
    """Every event up to `seq` has been sent; what follows is live."""

    job_id: UUID
    seq: int


class EndOfStream(_ServerMessage, frozen=True, tag="export:end-of-stream"):
    """The job has ended (failed or cancelled) and every event has been sent."""

    job_id: UUID
    seq: int


class CancelAck(_ServerMessage, frozen=True, omit_defaults=True, tag="export:cancel-ack"):
    """The export service's answer to a cancel: accepted (with the seq of cancel-requested), or
    refused because the job has already ended (with its outcome). The cancelled event itself
    arrives through the subscription, like every other event."""

    job_id: UUID
    accepted: bool
    seq: int | None = None
    outcome: str | None = None


class Pong(_ServerMessage, frozen=True, tag="pong"):
    """The answer to a ping."""


class Heartbeat(_ServerMessage, frozen=True, tag="heartbeat"):
    """Sent every few seconds: a client that stops hearing it knows the server is gone."""

    interval: float


class Authenticated(_ServerMessage, frozen=True, tag="authenticated"):
    user: str


class Error(_ServerMessage, frozen=True, tag="error"):
    """A message the gateway could not accept; the connection stays open."""

    code: str
    message: str


ServerMessage: TypeAlias = (
    StatusSync | CaughtUp | EndOfStream | CancelAck | Pong | Heartbeat | Authenticated | Error
)

client_decoder = msgspec.json.Decoder(ClientMessage)
server_encoder = msgspec.json.Encoder()
