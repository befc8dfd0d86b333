"""Hypothesis strategies for event payloads, envelopes and whole job histories."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from uuid import UUID

import msgspec
from hypothesis import strategies as st

from schemas.events import (
    EVENT_TYPES,
    ArchiveExpired,
    ArchiveInfo,
    Cancelled,
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
    StageProgress,
    Started,
    encode_data,
)

JOB_ID = UUID("0d7f3c1e-5a2b-4c6d-8e9f-a0b1c2d3e4f5")
PROJECT_ID = "project-7"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

PHASES = ("processing", "downloading")
STAGES = ("images", "visualizations", "annotations", "metrics", "compression")

INT64 = st.integers(-(2**63), 2**63 - 1)
COUNTS = st.integers(0, 2**40)
# Lone surrogates cannot be encoded as UTF-8 by any JSON encoder.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
PERCENT = st.floats(0.0, 100.0)
# What a buggy or racing writer might report: out of range or negative. (NaN and infinity
# cannot be put into a payload at all: EventData refuses them when it is made.)
WILD = FINITE | PERCENT
AWARE = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9998, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30))]
    ),
)


# Cheap text for the fold's tests, which never look inside strings.
NAMES = st.sampled_from(["", "user:ada", "user:bo", "w-1", "é ✓", "export.zip"])


def messages(
    floats: st.SearchStrategy[float] = FINITE, text: st.SearchStrategy[str] = TEXT
) -> st.SearchStrategy[Message]:
    params = st.dictionaries(text, text | INT64 | floats, max_size=3)
    return st.builds(Message, key=text, params=params, text=text)


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def payload_strategies(
    floats: st.SearchStrategy[float] = FINITE, text: st.SearchStrategy[str] = TEXT
) -> dict[type[EventData], st.SearchStrategy[EventData]]:
    """One strategy per concrete event class; `floats` feeds every float field, `text` every
    string."""
    phase = st.sampled_from(PHASES)
    stage = _optional(st.sampled_from(STAGES))
    message = _optional(messages(FINITE, text))
    archive = st.builds(
        ArchiveInfo,
        file_name=text,
        size_bytes=COUNTS,
        sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
        expires_at=_optional(AWARE),
    )
    options = st.builds(
        ExportOptions,
        include_original_images=st.booleans(),
        include_visualizations=st.booleans(),
        annotation_formats=st.lists(st.sampled_from(["coco", "yolo"]), max_size=3).map(tuple),
        metrics_formats=st.lists(st.just("csv"), max_size=2).map(tuple),
        include_documentation=st.booleans(),
    )
    stage_progress = st.builds(
        StageProgress, current=COUNTS, total=COUNTS, current_item=_optional(text)
    )
    return {
        Queued: st.builds(
            Queued, options=options, requested_by=text, queue_position=_optional(COUNTS)
        ),
        Resumed: st.builds(
            Resumed,
            worker_id=text,
            previous_worker=text,
            attempt=st.integers(1, 10),
            from_stage=_optional(st.sampled_from(STAGES)),
            reason=text,
        ),
        Started: st.builds(
            Started,
            worker_id=text,
            attempt=st.integers(1, 10),
            total_items=_optional(COUNTS),
        ),
        Progress: st.builds(
            Progress,
            phase=phase,
            stage=stage,
            progress=floats,
            phase_progress=floats,
            stage_progress=_optional(stage_progress),
            message=message,
            estimated_time_remaining=_optional(FINITE),
        ),
        PhaseChanged: st.builds(
            PhaseChanged, from_phase=phase, to_phase=phase, progress=floats, message=message
        ),
        CancelRequested: st.builds(CancelRequested, requested_by=text, reason=_optional(text)),
        Cancelled: st.builds(
            Cancelled,
            cancelled_by=st.sampled_from(("user", "system", "timeout")),
            progress=floats,
            cleanup_completed=st.booleans(),
            message=message,
        ),
        Failed: st.builds(
            Failed,
            stage=stage,
            code=text,
            message=message,
            retryable=st.booleans(),
            progress=floats,
        ),
        Completed: st.builds(
            Completed, archive=archive, processing_time_ms=COUNTS, message=message
        ),
        DownloadStarted: st.builds(
            DownloadStarted, download_id=text, total_bytes=COUNTS, range_start=COUNTS
        ),
        DownloadProgress: st.builds(
            DownloadProgress,
            download_id=text,
            bytes_sent=COUNTS,
            total_bytes=COUNTS,
            progress=floats,
            phase_progress=floats,
        ),
        DownloadCompleted: st.builds(
            DownloadCompleted, download_id=text, bytes_sent=COUNTS, total_bytes=COUNTS
        ),
        ArchiveExpired: st.builds(ArchiveExpired, reason=text),
    }


PAYLOADS = payload_strategies()
ARCHIVES = st.builds(
    ArchiveInfo, file_name=NAMES, size_bytes=COUNTS, sha256=st.just("ab" * 32), expires_at=st.none()
)
WILD_PAYLOADS = payload_strategies(WILD, NAMES)
CHEAP_PAYLOADS = payload_strategies(PERCENT, NAMES)

JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | INT64 | FINITE | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)
JSON_OBJECTS: st.SearchStrategy[dict[str, Any]] = st.dictionaries(TEXT, JSON_VALUES, max_size=4)
UNKNOWN_TYPES = (st.from_regex(r"\Aexport:[a-z][a-z-]{0,15}\Z") | TEXT.filter(bool)).filter(
    lambda name: name not in EVENT_TYPES
)


def event(
    seq: int,
    type_: str,
    data: EventData | msgspec.Raw,
    *,
    at: datetime | None = None,
    position: int | None = None,
    actor: str = "user:ada",
) -> Event:
    return Event(
        job_id=JOB_ID,
        project_id=PROJECT_ID,
        seq=seq,
        position=seq if position is None else position,
        event_id=UUID(int=seq % 2**128),
        type=type_,
        occurred_at=at or T0 + timedelta(seconds=seq),
        actor=actor,
        data=data,
    )


def typed(seq: int, data: EventData, **kwargs: Any) -> Event:
    return event(seq, type(data).TYPE, data, **kwargs)


@st.composite
def envelopes(draw: st.DrawFn, data: st.SearchStrategy[EventData]) -> Event:
    """Any envelope around a payload drawn from `data`."""
    payload = draw(data)
    return Event(
        job_id=draw(st.uuids()),
        project_id=draw(TEXT),
        seq=draw(st.integers(1, 2**31 - 1)),
        position=draw(st.integers(1, 2**63 - 1)),
        event_id=draw(st.uuids()),
        type=type(payload).TYPE,
        occurred_at=draw(AWARE),
        actor=draw(TEXT),
        data=payload,
    )


# --- Whole histories ---------------------------------------------------------------------------


@dataclass
class History:
    """A job's events as the export service writes them, and what they should lead to."""

    events: list[Event] = field(default_factory=list)
    outcome: str | None = None
    started: bool = False
    cancel_requested: bool = False


# Strategies are built once: building them inside a draw loop costs more than drawing.
_DELAY = st.integers(0, 10_000)
_STEPS = st.integers(0, 20)
_MESSAGE = _optional(messages(PERCENT, NAMES))
_STAGE = _optional(st.sampled_from(STAGES))
_KINDS = {
    (False, "processing"): st.sampled_from(["started", "cancel"]),
    (True, "processing"): st.sampled_from(["started", "cancel", "phase"] + ["progress"] * 6),
    (True, "downloading"): st.sampled_from(["started", "cancel"] + ["progress"] * 6),
}
_STARTED = st.builds(Started, worker_id=NAMES, total_items=_optional(COUNTS))
_CANCEL_REQUESTED = st.builds(
    CancelRequested, requested_by=st.sampled_from(["user:ada", "user:bo"])
)
_PHASE_CHANGED = st.builds(
    PhaseChanged,
    from_phase=st.just("processing"),
    to_phase=st.just("downloading"),
    progress=PERCENT,
    message=_MESSAGE,
)
_PROGRESS = {
    # Mostly the current phase; sometimes a late report from the phase before.
    phase: st.builds(
        Progress,
        phase=st.sampled_from([phase] * 5 + ["processing"]),
        stage=_STAGE,
        progress=PERCENT,
        phase_progress=PERCENT,
        stage_progress=_optional(
            st.builds(StageProgress, current=COUNTS, total=COUNTS, current_item=NAMES)
        ),
        message=_MESSAGE,
        estimated_time_remaining=_optional(st.floats(0, 1e6)),
    )
    for phase in PHASES
}
_ANY_OUTCOME = st.sampled_from([None, Completed.TYPE, Failed.TYPE, Cancelled.TYPE])
_COMPLETED = st.builds(Completed, archive=ARCHIVES, message=_MESSAGE)
_FAILED = st.builds(
    Failed,
    stage=_STAGE,
    code=st.sampled_from(["storage_full", "render_error", "lease_lost"]),
    retryable=st.booleans(),
    progress=PERCENT,
    message=_MESSAGE,
)
_CANCELLED_BY = st.sampled_from(["system", "timeout"])
_CANCELLED = st.builds(Cancelled, progress=PERCENT, cleanup_completed=st.booleans())
_DOWNLOADS = st.integers(0, 3)
_TOTAL_BYTES = st.integers(1, 2**32)
_CHUNKS = st.lists(st.tuples(st.floats(0, 1), PERCENT, PERCENT), max_size=4)


@dataclass
class _Writer:
    draw: st.DrawFn
    history: History = field(default_factory=History)
    at: datetime = T0

    def add(self, data: EventData) -> None:
        self.at += timedelta(milliseconds=self.draw(_DELAY))
        seq = len(self.history.events) + 1
        self.history.events.append(typed(seq, data, at=self.at, position=seq * 7))


@st.composite
def valid_histories(draw: st.DrawFn, outcome: str | Literal[True] | None = True) -> History:
    """A job history the export service could write.

    `outcome`: True for any ending (including none yet), None for a job still in flight, or the
    outcome type to end with.
    """
    w = _Writer(draw)
    h = w.history
    w.add(draw(CHEAP_PAYLOADS[Queued]))
    phase: Phase = "processing"
    attempt = 0
    for _ in range(draw(_STEPS)):
        kind = draw(_KINDS[h.started, phase])
        if kind == "started":
            attempt += 1
            w.add(msgspec.structs.replace(draw(_STARTED), attempt=attempt))
            h.started = True
        elif kind == "cancel":
            w.add(draw(_CANCEL_REQUESTED))
            h.cancel_requested = True
        elif kind == "phase":
            w.add(draw(_PHASE_CHANGED))
            phase = "downloading"
        else:
            w.add(draw(_PROGRESS[phase]))

    end = draw(_ANY_OUTCOME) if outcome is True else outcome
    h.outcome = end
    if end == Completed.TYPE:
        if not h.started:
            w.add(Started(worker_id="w", attempt=attempt + 1))
            h.started = True
        w.add(draw(_COMPLETED))
        _download_phase(w)
    elif end == Failed.TYPE:
        w.add(draw(_FAILED))
    elif end == Cancelled.TYPE:
        cancelled_by = "user" if h.cancel_requested else draw(_CANCELLED_BY)
        w.add(msgspec.structs.replace(draw(_CANCELLED), cancelled_by=cancelled_by))
    return h


def _download_phase(w: _Writer) -> None:
    draw = w.draw
    for n in range(draw(_DOWNLOADS)):
        total = draw(_TOTAL_BYTES)
        download_id = f"dl-{n}"
        w.add(DownloadStarted(download_id=download_id, total_bytes=total))
        sent = 0
        for share, progress, phase_progress in draw(_CHUNKS):
            sent = max(sent, int(total * share))
            w.add(
                DownloadProgress(
                    download_id=download_id,
                    bytes_sent=sent,
                    total_bytes=total,
                    progress=progress,
                    phase_progress=phase_progress,
                )
            )
        if draw(st.booleans()):
            w.add(DownloadCompleted(download_id=download_id, bytes_sent=total, total_bytes=total))
    if draw(st.booleans()):
        w.add(ArchiveExpired())


def _raw(data: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(data))


_KIND = st.sampled_from(["typed", "typed", "raw-known", "raw-junk", "unknown"])
_ANY_SEQ = st.integers(-1, 40)
_WILD_PAYLOAD = st.one_of(*WILD_PAYLOADS.values())
_KNOWN_TYPE = st.sampled_from(sorted(EVENT_TYPES))
_JUNK = st.binary(max_size=12).map(msgspec.Raw) | JSON_VALUES.map(_raw)
_STEP = st.sampled_from([1, 1, 1, 1, 1, 1, 0, -1, -3, 2, 7, None])


@st.composite
def random_events(draw: st.DrawFn, seqs: st.SearchStrategy[int] = _ANY_SEQ) -> Event:
    """Any event: any type, typed or raw payload, any seq (duplicates and reorders included)."""
    seq = draw(seqs)
    kind = draw(_KIND)
    at = draw(AWARE)
    if kind == "typed":
        return typed(seq, draw(_WILD_PAYLOAD), at=at)
    if kind == "raw-known":
        # How the gateway and the log hand payloads to the fold: as stored JSON text.
        payload = draw(_WILD_PAYLOAD)
        return event(seq, type(payload).TYPE, msgspec.Raw(encode_data(payload)), at=at)
    if kind == "raw-junk":
        # A known type whose payload does not match its schema, or is not even JSON.
        return event(seq, draw(_KNOWN_TYPE), draw(_JUNK), at=at)
    return event(seq, draw(UNKNOWN_TYPES), _raw(draw(JSON_VALUES)), at=at)


@st.composite
def random_histories(draw: st.DrawFn, max_size: int = 30) -> list[Event]:
    """Any events in any order. Seqs mostly climb (so that states get somewhere), with
    duplicates, steps back, gaps and arbitrary values mixed in."""
    events = draw(st.lists(random_events(st.just(0)), max_size=max_size))
    seq = 0
    out = []
    for e in events:
        step = draw(_STEP)
        seq = draw(_ANY_SEQ) if step is None else seq + step
        out.append(msgspec.structs.replace(e, seq=seq, event_id=UUID(int=seq % 2**128)))
    return out
