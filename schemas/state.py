"""The one function that turns a job's events into its state.

`fold` is pure and total: it never raises and never looks at anything but its arguments. An event
that makes no sense in the current state (a progress report after the outcome, a second start) is
absorbed without changing the state, and an event type from a newer version is skipped. Every view
of a job, in every process and every client, is `replay(events)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Literal, TypeAlias
from uuid import UUID

import msgspec

from schemas.events import (
    PROCESSING_SHARE,
    ArchiveExpired,
    ArchiveInfo,
    Cancelled,
    CancelledBy,
    CancelRequested,
    Completed,
    DownloadCompleted,
    DownloadProgress,
    DownloadStarted,
    Event,
    EventData,
    ExportOptions,
    Failed,
    Message,
    Phase,
    PhaseChanged,
    Progress,
    Queued,
    Resumed,
    Stage,
    StageProgress,
    Started,
    Timestamp,
    decode_data,
)

Status: TypeAlias = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class FailureInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    stage: Stage | None
    code: str
    message: Message | None
    retryable: bool


class CancellationInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    cancelled_by: CancelledBy
    cleanup_completed: bool
    requested_by: str | None


class DownloadInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    download_id: str
    bytes_sent: int
    total_bytes: int
    completed: bool


class JobState(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What a job is, as of event `seq`."""

    job_id: UUID
    project_id: str
    seq: int = 0
    status: Status = "queued"
    options: ExportOptions = ExportOptions()
    requested_by: str = ""
    phase: Phase = "processing"
    stage: Stage | None = None
    progress: float = 0.0
    phase_progress: float = 0.0
    stage_progress: StageProgress | None = None
    message: Message | None = None
    estimated_time_remaining: float | None = None
    attempt: int = 0
    queued_at: Timestamp | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    cancel_requested_by: str | None = None
    archive: ArchiveInfo | None = None
    archive_expired: bool = False
    failure: FailureInfo | None = None
    cancellation: CancellationInfo | None = None
    download: DownloadInfo | None = None
    downloads_completed: int = 0

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def initial_state(job_id: UUID, project_id: str) -> JobState:
    """The state of a job before its first event."""
    return JobState(job_id=job_id, project_id=project_id)


def _clamp(value: float) -> float:
    return 0.0 if value < 0.0 else 100.0 if value > 100.0 else float(value)


def _apply(state: JobState, data: EventData, event: Event) -> JobState:
    at = event.occurred_at
    terminal = state.is_terminal
    match data:
        case Queued():
            if state.seq != 0:
                return state
            return msgspec.structs.replace(
                state,
                status="queued",
                options=data.options,
                requested_by=data.requested_by,
                queued_at=at,
            )
        case Started():
            if terminal:
                return state
            return msgspec.structs.replace(
                state,
                status="cancelling" if state.status == "cancelling" else "running",
                attempt=max(state.attempt + 1, data.attempt),
                started_at=state.started_at or at,
            )
        case Resumed():
            if terminal:
                return state
            return msgspec.structs.replace(
                state,
                status="cancelling" if state.status == "cancelling" else "running",
                attempt=max(state.attempt + 1, data.attempt),
                started_at=state.started_at or at,
            )
        case Progress():
            if terminal or data.phase != state.phase:
                return state
            # Progress only moves forward within a phase: a late or reordered report
            # (a retried stage, a resumed worker) must not pull the bar back.
            return msgspec.structs.replace(
                state,
                status="cancelling" if state.status == "cancelling" else "running",
                stage=data.stage if data.stage is not None else state.stage,
                progress=max(state.progress, _clamp(data.progress)),
                phase_progress=max(state.phase_progress, _clamp(data.phase_progress)),
                stage_progress=data.stage_progress,
                message=data.message if data.message is not None else state.message,
                estimated_time_remaining=data.estimated_time_remaining,
            )
        case PhaseChanged():
            if terminal or data.to_phase == state.phase:
                return state
            if data.to_phase == "processing":
                # Phases only go forward: processing, then downloading.
                return state
            return msgspec.structs.replace(
                state,
                phase=data.to_phase,
                phase_progress=0.0,
                progress=max(state.progress, _clamp(data.progress)),
                message=data.message if data.message is not None else state.message,
                stage=None,
                stage_progress=None,
                estimated_time_remaining=None,
            )
        case CancelRequested():
            if terminal or state.status == "cancelling":
                return state
            return msgspec.structs.replace(
                state, status="cancelling", cancel_requested_by=data.requested_by
            )
        case Cancelled():
            if terminal:
                return state
            return msgspec.structs.replace(
                state,
                status="cancelled",
                finished_at=at,
                progress=max(state.progress, _clamp(data.progress)),
                message=data.message if data.message is not None else state.message,
                estimated_time_remaining=None,
                cancellation=CancellationInfo(
                    cancelled_by=data.cancelled_by,
                    cleanup_completed=data.cleanup_completed,
                    requested_by=state.cancel_requested_by,
                ),
            )
        case Failed():
            if terminal:
                return state
            return msgspec.structs.replace(
                state,
                status="failed",
                finished_at=at,
                message=data.message if data.message is not None else state.message,
                estimated_time_remaining=None,
                failure=FailureInfo(
                    stage=data.stage,
                    code=data.code,
                    message=data.message,
                    retryable=data.retryable,
                ),
            )
        case Completed():
            if terminal:
                return state
            return msgspec.structs.replace(
                state,
                status="completed",
                finished_at=at,
                progress=max(state.progress, PROCESSING_SHARE),
                phase_progress=100.0 if state.phase == "processing" else state.phase_progress,
                stage=None,
                stage_progress=None,
                message=data.message if data.message is not None else state.message,
                estimated_time_remaining=None,
                archive=data.archive,
            )
        case DownloadStarted():
            if state.status != "completed" or state.archive_expired:
                return state
            return msgspec.structs.replace(
                state,
                phase="downloading",
                phase_progress=0.0 if state.phase != "downloading" else state.phase_progress,
                download=DownloadInfo(
                    download_id=data.download_id,
                    bytes_sent=data.range_start,
                    total_bytes=data.total_bytes,
                    completed=False,
                ),
            )
        case DownloadProgress():
            if state.status != "completed" or state.phase != "downloading":
                return state
            return msgspec.structs.replace(
                state,
                progress=max(state.progress, _clamp(data.progress)),
                phase_progress=max(state.phase_progress, _clamp(data.phase_progress)),
                download=DownloadInfo(
                    download_id=data.download_id,
                    bytes_sent=data.bytes_sent,
                    total_bytes=data.total_bytes,
                    completed=False,
                ),
            )
        case DownloadCompleted():
            if state.status != "completed" or state.phase != "downloading":
                return state
            return msgspec.structs.replace(
                state,
                progress=100.0,
                phase_progress=100.0,
                downloads_completed=state.downloads_completed + 1,
                download=DownloadInfo(
                    download_id=data.download_id,
                    bytes_sent=data.bytes_sent,
                    total_bytes=data.total_bytes or data.bytes_sent,
                    completed=True,
                ),
            )
        case ArchiveExpired():
            if state.status != "completed":
                return state
            return msgspec.structs.replace(state, archive_expired=True)
        case _:
            return state


def fold(state: JobState | None, event: Event) -> JobState:
    """Apply one event to a job's state. Pure and total: never raises.

    `state` is None before the job's first event. Events must come in `seq` order; an event at
    or below the state's `seq` is a duplicate and leaves the state as it is.
    """
    if state is None:
        state = initial_state(event.job_id, event.project_id)
    if event.seq <= state.seq:
        return state
    data = event.data
    if isinstance(data, msgspec.Raw):
        # A malformed payload is skipped like an unknown type: the fold must stay total.
        with contextlib.suppress(msgspec.DecodeError):
            data = decode_data(event.type, data)
    if isinstance(data, EventData):
        state = _apply(state, data, event)
    return msgspec.structs.replace(state, seq=event.seq, updated_at=event.occurred_at)


def replay(events: Iterable[Event], state: JobState | None = None) -> JobState | None:
    """Fold a sequence of events, optionally on top of a known state."""
    for event in events:
        state = fold(state, event)
    return state
