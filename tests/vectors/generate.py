"""Write `tests/vectors/fold.json`: job histories and the state `schemas.state.fold` gives them.

    python -m tests.vectors.generate

Each case is `{"name", "allowedByLog", "events", "expected"}`: `events` are envelopes exactly as
the gateway sends them (`encode_event`), `expected` is the replayed state encoded as the gateway
encodes a `JobState` (null when there is no event at all). The JavaScript client folds the same
events (`tests/web/client.test.mjs`) and must reach the same JSON, so the two folds cannot drift.

`allowedByLog` is true for histories the event log accepts, event by event (the export service's
own histories: every event type, the download phase, failures, cancels, resumed workers,
redelivered duplicates); `tests/web/test_vectors.py` appends those to a real log. The others
exercise the fold's rules beyond what the log lets in: types from a newer version, payloads that
do not match their schema, events after an outcome, gaps and steps back in seq, and seeded
random histories mixing all of it. Everything here is deterministic: the file is regenerated in
the tests and must match.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

import msgspec

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
    ParamValue,
    PhaseChanged,
    Progress,
    Queued,
    Resumed,
    StageProgress,
    Started,
    Timestamp,
    encode_data,
    encode_event,
    type_of,
)
from schemas.messages import CATALOGUE, message
from schemas.state import JobState, replay
from services.common.eventlog import NewEvent
from tests import support

OUTPUT = Path(__file__).with_name("fold.json")
NAMESPACE = UUID("6f1d2c3b-4a59-4e7d-9c1b-0a2b3c4d5e6f")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
RANDOM_CASES = 32


# --- Envelopes in and out ---------------------------------------------------------------------


class _Envelope(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An envelope as received, its payload kept as JSON text: how the gateway hands it on."""

    job_id: UUID
    project_id: str
    seq: int
    position: int
    event_id: UUID
    type: str
    occurred_at: Timestamp
    actor: str
    data: msgspec.Raw


def decode_envelope(envelope: dict[str, Any]) -> Event:
    """An envelope from the vectors as an `Event` whose payload is still raw JSON, so that the
    fold decodes it (and skips it when it does not match its type)."""
    wire = msgspec.json.decode(json.dumps(envelope).encode(), type=_Envelope)
    return Event(
        job_id=wire.job_id,
        project_id=wire.project_id,
        seq=wire.seq,
        position=wire.position,
        event_id=wire.event_id,
        type=wire.type,
        occurred_at=wire.occurred_at,
        actor=wire.actor,
        data=wire.data,
    )


def encode_state(state: JobState | None) -> Any:
    """A state as JSON values, encoded as the gateway encodes it."""
    return json.loads(msgspec.json.encode(state))


def expected_state(envelopes: Iterable[dict[str, Any]]) -> Any:
    return encode_state(replay(decode_envelope(e) for e in envelopes))


# --- Building histories -----------------------------------------------------------------------


@dataclass
class History:
    """One job's events as the gateway would deliver them, built in order."""

    name: str
    allowed_by_log: bool = True
    project_id: str = "demo"
    at: datetime = T0
    seq: int = 0
    envelopes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def job_id(self) -> UUID:
        return uuid5(NAMESPACE, self.name)

    def add(
        self,
        item: NewEvent | EventData,
        *,
        after: float = 1.0,
        actor: str = "worker:w1",
        seq: int | None = None,
        at: datetime | None = None,
    ) -> None:
        """The next event (or one at `seq`), `after` seconds after the one before."""
        new = item if isinstance(item, NewEvent) else NewEvent(data=item, actor=actor)
        self._append(type_of(new.data), new.data, new.actor, after=after, seq=seq, at=at)

    def add_raw(
        self,
        type_: str,
        payload: Any,
        *,
        after: float = 1.0,
        actor: str = "worker:w1",
        seq: int | None = None,
        at: datetime | None = None,
    ) -> None:
        """An event whose payload is any JSON: an unknown type, or one its type's schema refuses.
        The log never holds one (its writers are typed), so the history is marked so."""
        self.allowed_by_log = False
        raw = msgspec.Raw(json.dumps(payload, ensure_ascii=False).encode())
        self._append(type_, raw, actor, after=after, seq=seq, at=at)

    def redeliver(self, *seqs: int) -> None:
        """Events delivered again (a replay overlapping what arrived live): exact copies."""
        by_seq = {e["seq"]: e for e in self.envelopes}
        self.envelopes.extend(by_seq[s] for s in seqs)

    def _append(
        self,
        type_: str,
        data: EventData | msgspec.Raw,
        actor: str,
        *,
        after: float,
        seq: int | None,
        at: datetime | None,
    ) -> None:
        self.at = at if at is not None else self.at + timedelta(seconds=after)
        self.seq = self.seq + 1 if seq is None else seq
        index = len(self.envelopes) + 1
        event = Event(
            job_id=self.job_id,
            project_id=self.project_id,
            seq=self.seq,
            position=1000 + 7 * index,
            event_id=uuid5(self.job_id, str(index)),
            type=type_,
            occurred_at=self.at,
            actor=actor,
            data=data,
        )
        self.envelopes.append(json.loads(encode_event(event)))

    def case(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "allowedByLog": self.allowed_by_log,
            "events": self.envelopes,
            "expected": expected_state(self.envelopes),
        }


# --- Payloads as the export service writes them ------------------------------------------------

ARCHIVE = ArchiveInfo(
    file_name="demo-export-6f1d2c3b.zip",
    size_bytes=48_213_992,
    sha256="9f" * 32,
    expires_at=datetime(2026, 3, 9, 9, 0, tzinfo=UTC),
)
OPTIONS = ExportOptions(
    include_visualizations=False, annotation_formats=("coco", "yolo"), include_documentation=False
)
STAGE_ITEMS = {
    "images": ("img_{:04d}.jpg", 300),
    "visualizations": ("cell_{:03d}.png", 100),
    "annotations": ("annotations_{}.json", 2),
    "metrics": ("metrics_{}.csv", 1),
    "compression": ("part_{}.zip", 1),
}


def queued_by(user: str = "ada", position: int | None = None) -> NewEvent:
    new = support.queued(f"user:{user}")
    if position is None:
        return new
    data = Queued(options=OPTIONS, requested_by=user, queue_position=position)
    return NewEvent(data=data, actor=new.actor)


def report(
    stage: str,
    current: int,
    overall: float,
    eta: float | None = None,
    *,
    item: bool = True,
    phase_progress: float | None = None,
) -> Progress:
    """A processing report as `ProgressTracker` writes it."""
    template, total = STAGE_ITEMS[stage]
    name = template.format(current) if item else None
    if name is None:
        text = message(f"export.stage.{stage}.counts", current=current, total=total)
    else:
        text = message(f"export.stage.{stage}", current=current, total=total, item=name)
    return Progress(
        phase="processing",
        stage=stage,  # type: ignore[arg-type]
        progress=overall,
        phase_progress=round(overall / 0.9, 2) if phase_progress is None else phase_progress,
        stage_progress=StageProgress(current=current, total=total, current_item=name),
        message=text,
        estimated_time_remaining=eta,
    )


def completed_with(archive: ArchiveInfo = ARCHIVE) -> Completed:
    return Completed(
        archive=archive,
        processing_time_ms=41_250,
        message=message("export.completed", file=archive.file_name, bytes=archive.size_bytes),
    )


def download(
    h: History,
    download_id: str,
    *,
    start: int = 0,
    chunks: Iterable[int] = (),
    finish: bool = True,
) -> None:
    """One download of the archive, as the download endpoint writes it."""
    size = ARCHIVE.size_bytes
    h.add(
        DownloadStarted(download_id=download_id, total_bytes=size, range_start=start),
        actor="user:ada",
    )
    for sent in chunks:
        fraction = sent / size
        h.add(
            DownloadProgress(
                download_id=download_id,
                bytes_sent=sent,
                total_bytes=size,
                progress=round(90 + 10 * fraction, 2),
                phase_progress=round(100 * fraction, 2),
            ),
            after=0.5,
            actor="user:ada",
        )
    if finish:
        h.add(
            DownloadCompleted(download_id=download_id, bytes_sent=size, total_bytes=size),
            actor="user:ada",
        )


def processing(h: History, upto: float = 90.0) -> None:
    """Started, then reports through the stages up to `upto` percent."""
    h.add(Started(worker_id="w1", attempt=1, total_items=404))
    for stage, current, overall, eta in (
        ("images", 120, 12.5, 48.0),
        ("images", 300, 31.0, 33.5),
        ("visualizations", 45, 52.25, 21.0),
        ("annotations", 2, 74.0, 8.0),
        ("metrics", 1, 81.5, 4.0),
        ("compression", 1, 90.0, 0.0),
    ):
        if overall > upto:
            break
        h.add(report(stage, current, overall, eta), after=2.5)


# --- The cases --------------------------------------------------------------------------------


def service_histories() -> list[History]:
    """Histories the export service writes; the log accepts each of them."""
    cases: list[History] = []

    def case(name: str) -> History:
        cases.append(History(name))
        return cases[-1]

    h = case("queued and waiting")
    h.add(queued_by("ada", position=3), actor="user:ada")

    h = case("running through every stage")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=75)
    h.add(report("metrics", 0, 74.0, None, item=False), after=0.25)

    h = case("completed without a download")
    h.add(queued_by(), actor="user:ada")
    processing(h)
    h.add(completed_with())

    h = case("completed, then downloaded twice (the second a resumed range)")
    h.add(queued_by(), actor="user:ada")
    processing(h)
    h.add(completed_with())
    download(h, "a1b2c3d4e5f6", chunks=(4_194_304, 25_165_824, ARCHIVE.size_bytes))
    download(h, "0f0e0d0c0b0a", start=16_777_216, chunks=(33_554_432,))

    h = case("a download cut off, then a range request that finished")
    h.add(queued_by(), actor="user:ada")
    processing(h)
    h.add(completed_with())
    download(h, "d1", chunks=(1_048_576, 8_388_608), finish=False)
    download(h, "d2", start=8_388_608, chunks=(30_000_000,))

    h = case("a small archive, downloaded by a writer that left out the total")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(support.progress(90.0, stage="compression"))
    h.add(support.completed())
    h.add(DownloadStarted(download_id="s1", total_bytes=10), actor="user:ada")
    h.add(DownloadCompleted(download_id="s1", bytes_sent=10), actor="user:ada")

    h = case("the archive expired during a download; later downloads are not started")
    h.add(queued_by(), actor="user:ada")
    processing(h)
    h.add(completed_with())
    h.add(DownloadStarted(download_id="late", total_bytes=ARCHIVE.size_bytes), actor="user:ada")
    h.add(ArchiveExpired(reason="retention"), actor="system:retention", after=3600)
    h.add(
        DownloadProgress(
            download_id="late",
            bytes_sent=ARCHIVE.size_bytes // 2,
            total_bytes=ARCHIVE.size_bytes,
            progress=95.0,
            phase_progress=50.0,
        ),
        actor="user:ada",
    )
    h.add(DownloadStarted(download_id="after", total_bytes=1), actor="user:ada")

    h = case("the archive expired before any download")
    h.add(queued_by(), actor="user:ada")
    processing(h)
    h.add(completed_with())
    h.add(ArchiveExpired(), actor="system:retention", after=86400 * 7)

    h = case("failed mid-stage on an unreadable file")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=40)
    h.add(
        Failed(
            stage="visualizations",
            code="unreadable_file",
            message=message("export.failed.unreadable_file", detail="cell_046.png"),
            retryable=False,
            progress=31.0,
        )
    )

    h = case("failed with the builder's defaults")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(support.progress(10.0))
    h.add(support.failed())

    h = case("failed after its worker was lost twice")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=35)
    h.add(
        Resumed(worker_id="w2", previous_worker="w1", attempt=2, from_stage="visualizations"),
        actor="worker:w2",
        after=30,
    )
    h.add(report("visualizations", 10, 35.5, None), actor="worker:w2")
    h.add(
        Resumed(worker_id="w3", previous_worker="w2", attempt=3, from_stage="visualizations"),
        actor="worker:w3",
        after=30,
    )
    h.add(
        Failed(
            stage="visualizations",
            code="worker_lost",
            message=message("export.failed.worker_lost", attempts=3),
            retryable=True,
            progress=35.5,
        ),
        actor="system:lease",
    )

    h = case("resumed after a worker loss; the redone stage does not pull the bar back")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=55)
    h.add(
        Resumed(worker_id="w2", previous_worker="w1", attempt=2, from_stage="visualizations"),
        actor="worker:w2",
        after=30,
    )
    h.add(report("visualizations", 5, 33.0, None), actor="worker:w2")
    h.add(report("visualizations", 60, 56.0, 15.0), actor="worker:w2")
    h.add(report("annotations", 2, 74.0, 6.5), actor="worker:w2")
    h.add(report("compression", 1, 90.0, 0.0), actor="worker:w2")
    h.add(completed_with(), actor="worker:w2")

    h = case("cancelled mid-way by the user")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=55)
    h.add(CancelRequested(requested_by="ada"), actor="user:ada")
    h.add(report("visualizations", 47, 53.0, 19.0), after=0.2)
    h.add(
        Cancelled(
            cancelled_by="user",
            progress=53.0,
            cleanup_completed=True,
            message=message("export.cancelled", progress=53.0),
        ),
        after=0.4,
    )

    h = case("cancelled while queued (requested and cancelled in one append)")
    h.add(queued_by("bo"), actor="user:bo")
    h.add(CancelRequested(requested_by="bo"), actor="user:bo", after=2)
    h.add(
        Cancelled(
            cancelled_by="user",
            progress=0.0,
            cleanup_completed=True,
            message=message("export.cancelled", progress=0),
        ),
        actor="user:bo",
        after=0,
    )

    h = case("cancel requested; the worker failed before it saw the cancel")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=20)
    h.add(CancelRequested(requested_by="ada", reason="wrong options"), actor="user:ada")
    h.add(
        Failed(stage="images", code="disk_full", message=message("export.failed.disk_full")),
        after=0.1,
    )

    h = case("cancel requested while the worker was lost; resumed, still cancelling")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=35)
    h.add(CancelRequested(requested_by="ada"), actor="user:ada")
    h.add(Resumed(worker_id="w2", previous_worker="w1", attempt=2), actor="worker:w2", after=30)
    h.add(report("images", 300, 31.0, None), actor="worker:w2")
    h.add(support.cancelled())

    h = case("cancelled by the system on a timeout")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=60)
    h.add(
        Cancelled(cancelled_by="timeout", progress=52.25, cleanup_completed=False),
        actor="system:timeouts",
        after=3600,
    )

    h = case("reports out of range are clamped, late lower ones ignored")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(Progress(phase="processing", stage="images", progress=-5.0, phase_progress=-1.0))
    h.add(support.progress(40.0))
    h.add(support.progress(20.0, stage="visualizations"))
    h.add(Progress(phase="processing", progress=140.0, phase_progress=250.5))
    h.add(completed_with())
    h.add(DownloadStarted(download_id="x", total_bytes=10), actor="user:ada")
    h.add(
        DownloadProgress(
            download_id="x", bytes_sent=5, total_bytes=10, progress=80.0, phase_progress=50.0
        ),
        actor="user:ada",
    )

    h = case("the phase only moves forward")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(support.progress(30.0))
    h.add(
        PhaseChanged(
            from_phase="processing",
            to_phase="downloading",
            progress=88.0,
            message=message("export.download.started", total_bytes=100),
        )
    )
    h.add(support.progress(95.0))  # a late processing report: another phase, ignored
    h.add(
        Progress(phase="downloading", progress=92.0, phase_progress=20.0, message=Message(key="k"))
    )
    h.add(PhaseChanged(from_phase="downloading", to_phase="processing", progress=10.0))
    h.add(PhaseChanged(from_phase="processing", to_phase="downloading", progress=99.0))
    h.add(support.completed())
    h.add(DownloadStarted(download_id="y", total_bytes=10, range_start=4), actor="user:ada")
    h.add(DownloadCompleted(download_id="y", bytes_sent=10, total_bytes=10), actor="user:ada")

    h = case("redelivered events are dropped")
    h.add(queued_by(), actor="user:ada")
    processing(h, upto=35)
    h.redeliver(1, 2, 3)
    h.add(CancelRequested(requested_by="ada"), actor="user:ada")
    h.redeliver(5)
    h.add(support.cancelled())
    h.redeliver(6, 1)

    return cases


def fold_rule_histories() -> list[History]:
    """The fold's rules beyond what the log lets in."""
    cases: list[History] = []

    def case(name: str) -> History:
        cases.append(History(name, allowed_by_log=False))
        return cases[-1]

    case("no events at all")

    h = case("an unknown event type from a newer version moves only the clock")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add_raw("export:paused", {"reason": "maintenance", "progress": 99})
    h.add_raw("__proto__", {"progress": 100})
    h.add_raw("toString", {})
    h.add(support.progress(25.0))

    h = case("payloads their type's schema refuses are skipped")
    h.add(queued_by(), actor="user:ada")
    h.add_raw("export:started", {"attempt": "2"})
    h.add_raw("export:progress", {"phase": "uploading", "progress": 50, "phaseProgress": 50})
    h.add_raw("export:progress", {"phase": "processing", "progress": 50})
    h.add_raw("export:progress", {"phase": "processing", "progress": "50", "phaseProgress": 5})
    h.add_raw(
        "export:progress",
        {"phase": "processing", "stage": "upload", "progress": 50, "phaseProgress": 50},
    )
    h.add_raw(
        "export:progress",
        {
            "phase": "processing",
            "progress": 50,
            "phaseProgress": 50,
            "message": {"key": "k", "params": {"ok": True}},
        },
    )
    h.add_raw(
        "export:progress",
        {
            "phase": "processing",
            "progress": 50,
            "phaseProgress": 50,
            "stageProgress": {"current": 1.5, "total": 3},
        },
    )
    h.add_raw("export:cancel-requested", {"requestedBy": None})
    h.add_raw("export:failed", {"stage": "images"})
    h.add_raw("export:failed", {"code": "x", "retryable": 1})
    h.add_raw("export:cancelled", {"cancelledBy": "admin"})
    h.add_raw("export:completed", {"archive": {"fileName": "a.zip", "sizeBytes": 1}})
    h.add_raw(
        "export:completed",
        {"archive": {"fileName": "a.zip", "sizeBytes": 1, "sha256": "0", "expiresAt": "soon"}},
    )
    h.add_raw(
        "export:completed",
        {
            "archive": {
                "fileName": "a.zip",
                "sizeBytes": 1,
                "sha256": "0",
                "expiresAt": "2026-03-09T09:00:00",
            }
        },
    )
    h.add_raw("export:progress", [1, 2, 3])
    h.add_raw("export:progress", None)
    h.add_raw("export:queued", "queued")
    h.add(support.progress(12.0))

    h = case("newer payloads with extra fields, explicit nulls and other time formats")
    h.add_raw(
        "export:queued",
        {
            "options": {"annotationFormats": ["yolo"], "compression": "zstd"},
            "requestedBy": "ada",
            "priority": 5,
        },
        actor="user:ada",
    )
    h.add_raw("export:started", {"attempt": 4, "workerId": "w9", "host": "node-3"})
    h.add_raw(
        "export:progress",
        {
            "phase": "processing",
            "stage": None,
            "progress": 33,
            "phaseProgress": 36.7,
            "stageProgress": {"current": 3, "total": 9, "currentItem": None, "bytes": 12},
            "message": {"key": "export.heartbeat", "params": {}, "text": "", "lang": "en"},
            "estimatedTimeRemaining": None,
        },
    )
    h.add_raw(
        "export:completed",
        {
            "archive": {
                "fileName": "b.zip",
                "sizeBytes": 2,
                "sha256": "ab",
                "expiresAt": "2026-12-31 23:59:59.9999995+00:00",
                "storage": "s3",
            },
            "message": None,
        },
    )

    for offset, fraction in (("+02:00", ".5"), ("-05:30", ".1234565"), ("z", "")):
        h = case(f"an archive expiring at a time written with {offset!r} and {fraction!r}")
        h.add(queued_by(), actor="user:ada")
        h.add(support.started())
        expires = f"2024-02-29t23:59:59{fraction}{offset}"
        archive = {"fileName": "c.zip", "sizeBytes": 3, "sha256": "cd", "expiresAt": expires}
        h.add_raw("export:completed", {"archive": archive})

    h = case("events after a failure change only the clock")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(support.failed())
    h.add(support.progress(80.0))
    h.add(support.completed())
    h.add(support.cancelled())
    h.add(DownloadStarted(download_id="z", total_bytes=1), actor="user:ada")
    h.add(Started(worker_id="w2", attempt=2))

    h = case("events after a completion other than the download phase change only the clock")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(support.completed())
    h.add(support.progress(95.0))
    h.add(CancelRequested(requested_by="ada"), actor="user:ada")
    h.add(support.failed())
    h.add(PhaseChanged(from_phase="processing", to_phase="downloading", progress=99.0))
    h.add(DownloadProgress(download_id="n", bytes_sent=1, total_bytes=2, progress=95.0))
    h.add(DownloadCompleted(download_id="n", bytes_sent=1))

    h = case("the download phase before completion is ignored")
    h.add(queued_by(), actor="user:ada")
    h.add(support.started())
    h.add(DownloadStarted(download_id="e", total_bytes=5), actor="user:ada")
    h.add(
        DownloadProgress(download_id="e", bytes_sent=1, total_bytes=5, progress=50.0),
        actor="user:ada",
    )
    h.add(ArchiveExpired(), actor="system:retention")

    h = case("a second queued event and a completion after a cancel request")
    h.add(queued_by("ada"), actor="user:ada")
    h.add(queued_by("bo", position=1), actor="user:bo")
    h.add(Started(worker_id="w1", attempt=5))
    h.add(Started(worker_id="w1", attempt=2))
    h.add(CancelRequested(requested_by="ada"), actor="user:ada")
    h.add(CancelRequested(requested_by="bo"), actor="user:bo")
    h.add(support.completed())

    h = case("seq jumps and steps back: later seqs apply, earlier ones do not")
    h.add(queued_by(), actor="user:ada", seq=1)
    h.add(support.started(), seq=4)
    h.add(support.progress(50.0), seq=3)
    h.add(support.progress(60.0), seq=4)
    h.add(support.progress(20.0), seq=9)
    h.add(support.failed(), seq=0)
    h.add(support.cancelled(), seq=-3)

    h = case("events at seq 0 and below leave no trace but the initial state")
    h.add(queued_by(), actor="user:ada", seq=0)
    h.add(support.started(), seq=-1)

    return cases


# --- Seeded random histories ------------------------------------------------------------------

STAGES = ("images", "visualizations", "annotations", "metrics", "compression")
TEXTS = ("", "ada", "w-1", "é ✓", "cell_045.png", 'a "quote"', "line\nbreak", "𝄞")
ZONES = (UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30)))
UNKNOWN_TYPES = ("export:paused", "export:retention-warning", "audit:read", "", "constructor")
KINDS = ("typed", "mutated", "unknown", "junk")
WEIGHTS: dict[str, int] = {
    Queued.TYPE: 4,
    Started.TYPE: 6,
    Resumed.TYPE: 4,
    Progress.TYPE: 30,
    PhaseChanged.TYPE: 4,
    CancelRequested.TYPE: 4,
    Cancelled.TYPE: 3,
    Failed.TYPE: 3,
    Completed.TYPE: 7,
    DownloadStarted.TYPE: 7,
    DownloadProgress.TYPE: 12,
    DownloadCompleted.TYPE: 5,
    ArchiveExpired.TYPE: 2,
}


class _Random:
    """Random payloads from one seeded generator."""

    def __init__(self, seed: str) -> None:
        self.rng = random.Random(seed)

    def maybe(self, make: Callable[[], Any], chance: float = 0.5) -> Any:
        return make() if self.rng.random() < chance else None

    def percent(self) -> float:
        rng = self.rng
        return rng.choice(
            [
                round(rng.uniform(0, 100), 2),
                round(rng.uniform(-50, 150), 3),
                0.0,
                90.0,
                100.0,
                float(rng.randint(0, 100)),
            ]
        )

    def text(self) -> str:
        return self.rng.choice(TEXTS)

    def count(self) -> int:
        return self.rng.choice([0, 1, self.rng.randint(2, 500), self.rng.randint(0, 2**40)])

    def stage(self) -> Any:
        return self.maybe(lambda: self.rng.choice(STAGES), 0.7)

    def message(self) -> Message | None:
        def make() -> Message:
            key = self.rng.choice([*sorted(CATALOGUE), "a.key.from.the.future"])
            params: dict[str, ParamValue] = {
                "current": self.count(),
                "total": self.count(),
                "item": self.text(),
                "percent": self.percent(),
            }
            if self.rng.random() < 0.3:
                return Message(key=key, params={}, text=self.text())
            return message(key, **params)

        result: Message | None = self.maybe(make, 0.6)
        return result

    def moment(self) -> datetime:
        seconds = self.rng.randint(0, 10**8)
        micros = self.rng.choice([0, self.rng.randint(1, 999_999)])
        utc = T0 + timedelta(seconds=seconds, microseconds=micros)
        return utc.astimezone(self.rng.choice(ZONES))

    def payload(self, type_: str) -> EventData:
        r = self.rng
        percent, text, count = self.percent, self.text, self.count
        match type_:
            case Queued.TYPE:
                options = ExportOptions(
                    include_original_images=r.random() < 0.5,
                    annotation_formats=tuple(r.sample(["coco", "yolo"], r.randint(0, 2))),
                    metrics_formats=("csv",) * r.randint(0, 2),  # type: ignore[arg-type]
                )
                return Queued(options=options, requested_by=text(), queue_position=count())
            case Started.TYPE:
                return Started(worker_id=text(), attempt=r.randint(1, 6), total_items=count())
            case Resumed.TYPE:
                return Resumed(
                    worker_id=text(),
                    previous_worker=text(),
                    attempt=r.randint(1, 6),
                    from_stage=self.stage(),
                )
            case Progress.TYPE:
                return Progress(
                    phase=r.choice(["processing"] * 4 + ["downloading"]),  # type: ignore[arg-type]
                    stage=self.stage(),
                    progress=percent(),
                    phase_progress=percent(),
                    stage_progress=self.maybe(
                        lambda: StageProgress(
                            current=count(),
                            total=count(),
                            current_item=self.maybe(text),
                        )
                    ),
                    message=self.message(),
                    estimated_time_remaining=self.maybe(lambda: round(r.uniform(0, 1e5), 1)),
                )
            case PhaseChanged.TYPE:
                phases = ["processing", "downloading"]
                return PhaseChanged(
                    from_phase=r.choice(phases),  # type: ignore[arg-type]
                    to_phase=r.choice(phases),  # type: ignore[arg-type]
                    progress=percent(),
                    message=self.message(),
                )
            case CancelRequested.TYPE:
                return CancelRequested(requested_by=text(), reason=self.maybe(text))
            case Cancelled.TYPE:
                return Cancelled(
                    cancelled_by=r.choice(["user", "system", "timeout"]),
                    progress=percent(),
                    cleanup_completed=r.random() < 0.5,
                    message=self.message(),
                )
            case Failed.TYPE:
                return Failed(
                    stage=self.stage(),
                    code=r.choice(["disk_full", "io_error", "worker_lost", ""]),
                    message=self.message(),
                    retryable=r.random() < 0.5,
                    progress=percent(),
                )
            case Completed.TYPE:
                archive = ArchiveInfo(
                    file_name=text(),
                    size_bytes=count(),
                    sha256="ab" * 32,
                    expires_at=self.maybe(self.moment),
                )
                return Completed(
                    archive=archive, processing_time_ms=count(), message=self.message()
                )
            case DownloadStarted.TYPE:
                return DownloadStarted(download_id=text(), total_bytes=count(), range_start=count())
            case DownloadProgress.TYPE:
                return DownloadProgress(
                    download_id=text(),
                    bytes_sent=count(),
                    total_bytes=count(),
                    progress=percent(),
                    phase_progress=percent(),
                )
            case DownloadCompleted.TYPE:
                return DownloadCompleted(
                    download_id=text(), bytes_sent=count(), total_bytes=r.choice([0, count()])
                )
            case _:
                return ArchiveExpired(reason=text())

    def mutate(self, payload: dict[str, Any]) -> Any:
        """A payload's JSON changed the way a buggy or newer writer might: often refused by its
        type's schema, sometimes still valid."""
        r = self.rng
        keys = sorted(payload)
        choice = r.randrange(6)
        if choice == 0 and keys:
            del payload[r.choice(keys)]  # refused if the field is required
        elif choice == 1 and keys:
            key = r.choice(keys)
            value = payload[key]
            if isinstance(value, bool):
                payload[key] = r.choice([1, 0, "true", None])
            elif isinstance(value, int):
                payload[key] = r.choice([value + 0.5, str(value), True, None])
            elif isinstance(value, float):
                payload[key] = r.choice([str(value), False, None, int(value)])
            elif isinstance(value, str):
                payload[key] = r.choice([7, None, "bogus-" + value, [value]])
            else:
                payload[key] = r.choice([None, "x", 3, [], {}])
        elif choice == 2:
            payload["fieldFromTheFuture"] = r.choice([None, 1, {"nested": [1, 2]}])
        elif choice == 3:
            for key in ("stage", "message", "estimatedTimeRemaining", "reason", "stageProgress"):
                if key not in payload and r.random() < 0.5:
                    payload[key] = None  # explicit nulls for omitted defaults
        elif choice == 4 and isinstance(payload.get("message"), dict):
            inner = payload["message"]
            inner[r.choice(["params", "key", "text"])] = r.choice(
                [None, {"x": True}, {"x": None}, {"x": [1]}, 5, {"n": 1.5, "s": "é"}]
            )
        elif choice == 5 and isinstance(payload.get("archive"), dict):
            payload["archive"]["expiresAt"] = r.choice(
                [
                    "2026-05-01T00:00:00+00:00",
                    "2026-05-01t00:00:00.5z",
                    "2026-05-01 00:00:00.1234567+0200",
                    "2026-05-01T00:00:00",
                    "2026-02-30T00:00:00Z",
                    "2026-05-01T24:00:00Z",
                    "2026-05-01T00:00:00.Z",
                    None,
                ]
            )
        else:
            return r.choice([[payload], 42, None, "text", True])
        return payload


def random_history(index: int) -> History:
    rand = _Random(f"exportlog fold vectors {index}")
    r = rand.rng
    h = History(f"random history {index:02d}", allowed_by_log=False)
    h.project_id = rand.text() or "demo"
    types = list(WEIGHTS)
    weights = [WEIGHTS[t] for t in types]
    seq = 0
    for position in range(r.randint(1, 36)):
        seq += r.choice([1] * 10 + [0, -1, -4, 2, 5])
        first = position == 0 and r.random() < 0.8
        type_ = Queued.TYPE if first else r.choices(types, weights)[0]
        at = rand.moment()
        actor = rand.text()
        kind = r.choices(KINDS, [70, 16, 7, 7])[0]
        if kind == "typed":
            h.add(rand.payload(type_), seq=seq, at=at, actor=actor)
        elif kind == "mutated":
            data = json.loads(encode_data(rand.payload(type_)))
            h.add_raw(type_, rand.mutate(data), seq=seq, at=at, actor=actor)
        elif kind == "unknown":
            data = json.loads(encode_data(rand.payload(type_)))
            h.add_raw(r.choice(UNKNOWN_TYPES), data, seq=seq, at=at, actor=actor)
        else:
            h.add_raw(type_, r.choice([[], 0, "", None, [{}]]), seq=seq, at=at, actor=actor)
    return h


# --- The file ---------------------------------------------------------------------------------


def histories() -> list[History]:
    return [
        *service_histories(),
        *fold_rule_histories(),
        *(random_history(i) for i in range(RANDOM_CASES)),
    ]


def cases() -> list[dict[str, Any]]:
    return [h.case() for h in histories()]


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render(all_cases: list[dict[str, Any]]) -> str:
    """The file's text: one case after another, one event to a line, for readable diffs."""
    blocks = []
    for case in all_cases:
        events = ",\n".join(f"      {_dump(e)}" for e in case["events"])
        blocks.append(
            "  {\n"
            f'    "name": {_dump(case["name"])},\n'
            f'    "allowedByLog": {_dump(case["allowedByLog"])},\n'
            f'    "events": [\n{events}\n    ],\n'
            f'    "expected": {_dump(case["expected"])}\n'
            "  }"
        )
    return "[\n" + ",\n".join(blocks) + "\n]\n"


def main() -> None:
    all_cases = cases()
    names = [c["name"] for c in all_cases]
    if len(set(names)) != len(names):
        raise SystemExit("two cases have the same name")
    OUTPUT.write_text(render(all_cases), encoding="utf-8")
    covered = {e["type"] for c in all_cases for e in c["events"]}
    missing = sorted(set(EVENT_TYPES) - covered)
    print(f"wrote {len(all_cases)} cases to {OUTPUT.name}", file=sys.stderr)
    if missing:
        raise SystemExit(f"no case has {missing}")


if __name__ == "__main__":
    main()
