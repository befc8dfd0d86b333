"""Every job event and the one envelope that carries it on the wire.

An event is a typed payload (a subclass of `EventData`) wrapped in an `Event` envelope. The
event type (`export:progress`, ...) lives on the envelope, not inside the payload, so the wire
shape is `{"jobId": ..., "seq": ..., "type": "export:progress", "data": {...}}`, which is what
the old frontend's handlers read.

Schema evolution follows msgspec's rules: a new field always gets a default and an existing field
never changes type, so a reader built against an older version keeps decoding newer events. An
event type this version does not know keeps its payload as `msgspec.Raw` and folds as a no-op.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, ClassVar, Literal, TypeAlias
from uuid import UUID

import msgspec

Phase: TypeAlias = Literal["processing", "downloading"]
Stage: TypeAlias = Literal["images", "visualizations", "annotations", "metrics", "compression"]
CancelledBy: TypeAlias = Literal["user", "system", "timeout"]
AnnotationFormat: TypeAlias = Literal["coco", "yolo"]
MetricsFormat: TypeAlias = Literal["csv"]
ParamValue: TypeAlias = str | int | float
Timestamp: TypeAlias = Annotated[datetime, msgspec.Meta(tz=True)]
"""A moment with its time zone; naive datetimes are refused when decoding."""

# Overall progress spends this share on processing and the rest on the download phase, so a
# finished archive sits at 90 % until its first download starts and the bar never jumps back.
PROCESSING_SHARE = 90.0


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A human message: a catalogue key, its parameters, and the English rendering."""

    key: str
    params: dict[str, ParamValue] = {}
    text: str = ""


class StageProgress(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Items done within the current stage, and the item being worked on."""

    current: int
    total: int
    current_item: str | None = None


class ExportOptions(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What the user asked to put into the archive."""

    include_original_images: bool = True
    include_visualizations: bool = True
    annotation_formats: tuple[AnnotationFormat, ...] = ("coco",)
    metrics_formats: tuple[MetricsFormat, ...] = ("csv",)
    include_documentation: bool = True


class ArchiveInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """The finished archive as the download endpoint serves it."""

    file_name: str
    size_bytes: int
    sha256: str
    expires_at: Timestamp | None = None


class EventData(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Base of every event payload. `TYPE` is the event's name on the wire."""

    TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # JSON has no NaN or infinity (msgspec writes them as null): a payload carrying one
        # would be stored and then refused by every reader. Refuse it when it is made.
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{name} must be a finite number")


class Queued(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:queued"
    options: ExportOptions = ExportOptions()
    requested_by: str = ""
    queue_position: int | None = None


class Started(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:started"
    worker_id: str = ""
    attempt: int = 1
    total_items: int | None = None


class Resumed(EventData, frozen=True, kw_only=True):
    """Another worker took the job over after its worker stopped renewing its lease."""

    TYPE: ClassVar[str] = "export:resumed"
    worker_id: str = ""
    previous_worker: str = ""
    attempt: int = 1
    from_stage: Stage | None = None
    reason: str = "lease expired"


class Progress(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:progress"
    phase: Phase
    stage: Stage | None = None
    progress: float
    """Overall progress of the job, 0 to 100, both phases included."""
    phase_progress: float
    """Progress within the current phase, 0 to 100."""
    stage_progress: StageProgress | None = None
    message: Message | None = None
    estimated_time_remaining: float | None = None
    """Seconds, from a smoothed rate; absent until the rate is known."""


class PhaseChanged(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:phase-changed"
    from_phase: Phase
    to_phase: Phase
    progress: float
    message: Message | None = None


class CancelRequested(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:cancel-requested"
    requested_by: str = ""
    reason: str | None = None


class Cancelled(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:cancelled"
    cancelled_by: CancelledBy = "user"
    progress: float = 0.0
    cleanup_completed: bool = False
    message: Message | None = None


class Failed(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:failed"
    stage: Stage | None = None
    code: str
    message: Message | None = None
    retryable: bool = False
    progress: float = 0.0


class Completed(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:completed"
    archive: ArchiveInfo
    processing_time_ms: int = 0
    message: Message | None = None


class DownloadStarted(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:download-started"
    download_id: str
    total_bytes: int
    range_start: int = 0


class DownloadProgress(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:download-progress"
    download_id: str
    bytes_sent: int
    total_bytes: int
    progress: float
    phase_progress: float = 0.0


class DownloadCompleted(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:download-completed"
    download_id: str
    bytes_sent: int
    total_bytes: int = 0


class ArchiveExpired(EventData, frozen=True, kw_only=True):
    TYPE: ClassVar[str] = "export:archive-expired"
    reason: str = "retention"


EVENT_CLASSES: tuple[type[EventData], ...] = (
    Queued,
    Started,
    Resumed,
    Progress,
    PhaseChanged,
    CancelRequested,
    Cancelled,
    Failed,
    Completed,
    DownloadStarted,
    DownloadProgress,
    DownloadCompleted,
    ArchiveExpired,
)
EVENT_TYPES: dict[str, type[EventData]] = {cls.TYPE: cls for cls in EVENT_CLASSES}

OUTCOME_TYPES: frozenset[str] = frozenset({Completed.TYPE, Failed.TYPE, Cancelled.TYPE})
"""A job has at most one of these; the database refuses a second one."""

POST_COMPLETION_TYPES: frozenset[str] = frozenset(
    {
        DownloadStarted.TYPE,
        DownloadProgress.TYPE,
        DownloadCompleted.TYPE,
        ArchiveExpired.TYPE,
    }
)
"""The only types the database accepts after `export:completed`, and only after it: the download
phase. `export:download-started` is the switch to the downloading phase."""

_DATA_DECODERS: dict[str, msgspec.json.Decoder[EventData]] = {
    name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()
}
_encoder = msgspec.json.Encoder()


class Event(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The envelope of every event: where it belongs, its place in both orders, and its payload.

    `data` is a typed payload, or `msgspec.Raw` JSON for a type this version does not know (and,
    in the gateway, for payloads passed through without decoding).
    """

    job_id: UUID
    project_id: str
    seq: int
    position: int
    event_id: UUID
    type: str
    occurred_at: Timestamp
    actor: str
    data: EventData | msgspec.Raw

    def __post_init__(self) -> None:
        if isinstance(self.data, EventData) and self.type != type(self.data).TYPE:
            raise ValueError(
                f"event type {self.type!r} does not match its {type(self.data).__name__} payload"
            )


class _WireEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    job_id: UUID
    project_id: str
    seq: int
    position: int
    event_id: UUID
    type: str
    occurred_at: Timestamp
    actor: str
    data: msgspec.Raw


_wire_decoder = msgspec.json.Decoder(_WireEvent)


def type_of(data: EventData) -> str:
    """The wire name of a payload's event type."""
    name = type(data).TYPE
    if not name:
        raise TypeError(f"{type(data).__name__} is not a concrete event type")
    return name


def decode_data(event_type: str, raw: bytes | msgspec.Raw) -> EventData | msgspec.Raw:
    """Decode a payload by its event type; an unknown type stays raw JSON.

    Raises `msgspec.ValidationError` (with the path of the bad field) when a known type's payload
    does not match its schema, and `msgspec.DecodeError` when it is not JSON at all.
    """
    decoder = _DATA_DECODERS.get(event_type)
    if decoder is None:
        return raw if isinstance(raw, msgspec.Raw) else msgspec.Raw(raw)
    return decoder.decode(raw)


def decode_event(buf: bytes | str) -> Event:
    """Decode one envelope from JSON, typing its payload when the type is known."""
    wire = _wire_decoder.decode(buf)
    return Event(
        job_id=wire.job_id,
        project_id=wire.project_id,
        seq=wire.seq,
        position=wire.position,
        event_id=wire.event_id,
        type=wire.type,
        occurred_at=wire.occurred_at,
        actor=wire.actor,
        data=decode_data(wire.type, wire.data),
    )


def encode_event(event: Event) -> bytes:
    """Encode one envelope to JSON. Raw payloads are spliced in as they are, not re-encoded."""
    return _encoder.encode(event)


def encode_data(data: EventData) -> bytes:
    """Encode a payload to the exact JSON text the log stores (and hashes)."""
    return _encoder.encode(data)
