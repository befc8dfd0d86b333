"""The gateway's WebSocket messages: one tagged union per direction.

Events themselves travel in their envelope (`schemas.events.Event`, `type` "export:…"); the
messages here frame them: authenticate, subscribe, and the markers of a status-sync
(`export:status-sync`, `export:replay`, `export:caught-up`, `export:end-of-stream`).

A subscription follows one of three streams, named by exactly one field of `subscribe`:

    jobId        one job's events, resumed by seq (`afterSeq`)
    projectId    every event of a project's jobs, resumed by log position (`afterPosition`)
    log: true    the whole log, resumed by log position; for tokens with the service or
                 auditor role

Every marker of a subscription carries the same field, so a client following several streams on
one connection can tell them apart.
"""

from __future__ import annotations

from typing import TypeAlias
from uuid import UUID

import msgspec

from schemas.events import Event
from schemas.state import JobState


class _ClientMessage(msgspec.Struct, frozen=True, kw_only=True, rename="camel", tag_field="type"):
    pass


class Authenticate(_ClientMessage, frozen=True, tag="auth"):
    """The first message when the token is not in `Sec-WebSocket-Protocol`."""

    token: str


class Subscribe(_ClientMessage, frozen=True, tag="subscribe"):
    """Follow a job, a project or the whole log (exactly one of `jobId`, `projectId`, `log`).

    `afterSeq` (jobs): the last seq the client saw. `afterPosition` (projects, the log): the
    position of the last event the client saw, or the `position` of the last marker. Without a
    cursor the client gets the current state, then live events."""

    job_id: UUID | None = None
    project_id: str | None = None
    log: bool = False
    after_seq: int | None = None
    after_position: int | None = None


class Unsubscribe(_ClientMessage, frozen=True, tag="unsubscribe"):
    """Stop following a stream, named as it was subscribed."""

    job_id: UUID | None = None
    project_id: str | None = None
    log: bool = False


class CancelExport(_ClientMessage, frozen=True, tag="export:cancel"):
    """Ask for a cancel; the gateway forwards it to the export service as this user."""

    job_id: UUID


class Ping(_ClientMessage, frozen=True, tag="ping"):
    """An application-level ping, for clients (browsers) that cannot see WebSocket pings."""


ClientMessage: TypeAlias = Authenticate | Subscribe | Unsubscribe | CancelExport | Ping


class _ServerMessage(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    rename="camel",
    tag_field="type",
    omit_defaults=True,
):
    pass


class StatusSync(_ServerMessage, frozen=True, tag="export:status-sync"):
    """The authoritative state at the start of every subscription.

    A job: `jobId`, `seq` and `state` (the fold of its events up to `seq`). A project:
    `projectId`, `position` and `jobs` (the state of each of its jobs, newest first, at most
    `GATEWAY_SNAPSHOT_JOBS` of them) as of log position `position`. The log: `log` and
    `position`, the head of the log when the subscription started."""

    job_id: UUID | None = None
    project_id: str | None = None
    log: bool = False
    seq: int | None = None
    state: JobState | None = None
    position: int | None = None
    jobs: list[JobState] | None = None


class Replay(_ServerMessage, frozen=True, kw_only=True, tag="export:replay"):
    """Events the client missed, in order, many to a frame (a page of the replay)."""

    job_id: UUID | None = None
    project_id: str | None = None
    log: bool = False
    events: list[Event]


class CaughtUp(_ServerMessage, frozen=True, tag="export:caught-up"):
    """Every event up to `seq` (a job) or `position` (a project, the log) has been sent; what
    follows is live. The client's cursor is this mark when no event came after it."""

    job_id: UUID | None = None
    project_id: str | None = None
    log: bool = False
    seq: int | None = None
    position: int | None = None


class EndOfStream(_ServerMessage, frozen=True, tag="export:end-of-stream"):
    """The job has ended (failed or cancelled) and every event has been sent."""

    job_id: UUID
    seq: int


class CancelAck(_ServerMessage, frozen=True, tag="export:cancel-ack"):
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
    """A message the gateway could not accept; the connection stays open. An answer about a
    job names it (`jobId`), and the kind of request it answers (`request`: `subscribe` or
    `export:cancel`), so a client with several requests in flight can tell them apart."""

    code: str
    message: str
    job_id: UUID | None = None
    request: str | None = None


ServerMessage: TypeAlias = (
    StatusSync
    | Replay
    | CaughtUp
    | EndOfStream
    | CancelAck
    | Pong
    | Heartbeat
    | Authenticated
    | Error
)
"""What the server sends besides live events, which arrive as event envelopes
(`schemas.events.Event`), one to a frame; a client tells them apart by `eventId`."""

client_decoder = msgspec.json.Decoder(ClientMessage)
server_encoder = msgspec.json.Encoder()


def replay_frame(head: Replay, encoded_events: list[bytes]) -> bytes:
    """The bytes of `export:replay` for events already encoded: spliced, not re-encoded.

    `head` names the stream and has no events; the events are the last field, so they go where
    its empty list ends."""
    prefix = server_encoder.encode(head)
    if not prefix.endswith(b"]}") or head.events:
        raise ValueError("the head of a replay frame must have an empty event list")
    return prefix[:-2] + b",".join(encoded_events) + b"]}"
