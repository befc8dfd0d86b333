"""The wire format of events: round trips, camelCase names, unknown types, errors with paths."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import (
    EVENT_CLASSES,
    EVENT_TYPES,
    OUTCOME_TYPES,
    POST_COMPLETION_TYPES,
    Cancelled,
    Completed,
    Event,
    EventData,
    Failed,
    Message,
    Progress,
    StageProgress,
    decode_data,
    decode_event,
    encode_data,
    encode_event,
    type_of,
)
from tests.schemas.strategies import (
    JSON_VALUES,
    PAYLOADS,
    UNKNOWN_TYPES,
    envelopes,
    event,
    typed,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MIGRATIONS = Path(__file__).resolve().parents[2] / "schemas" / "migrations"
ENVELOPE_KEYS = {
    "jobId",
    "projectId",
    "seq",
    "position",
    "eventId",
    "type",
    "occurredAt",
    "actor",
    "data",
}


def snake_case_keys(node: Any, path: str = "$") -> list[str]:
    """Object keys with an underscore, outside `Message.params` (whose keys are the writer's)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if "_" in key:
                found.append(f"{path}.{key}")
            if key != "params":
                found += snake_case_keys(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += snake_case_keys(value, f"{path}[{i}]")
    return found


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.TYPE)
@SETTINGS
@given(data=st.data())
def test_every_event_type_round_trips(cls: type[EventData], data: st.DataObject) -> None:
    original = data.draw(envelopes(PAYLOADS[cls]))
    assert isinstance(original.data, cls)
    buf = encode_event(original)
    decoded = decode_event(buf)
    assert decoded == original
    assert type(decoded.data) is cls
    assert encode_event(decoded) == buf
    assert decode_data(cls.TYPE, encode_data(original.data)) == original.data

    wire = json.loads(buf)
    assert set(wire) == ENVELOPE_KEYS
    assert wire["type"] == cls.TYPE == type_of(original.data)
    assert snake_case_keys(wire) == []


def test_wire_names_are_camel_case() -> None:
    progress = Progress(
        phase="processing",
        stage="images",
        progress=12.5,
        phase_progress=13.9,
        stage_progress=StageProgress(current=5, total=36, current_item="scan_0005.png"),
        message=Message(key="export.images", params={"current": 5, "total": 36}, text="5 of 36"),
        estimated_time_remaining=42.0,
    )
    wire = json.loads(encode_event(typed(3, progress)))
    assert wire["data"] == {
        "phase": "processing",
        "stage": "images",
        "progress": 12.5,
        "phaseProgress": 13.9,
        "stageProgress": {"current": 5, "total": 36, "currentItem": "scan_0005.png"},
        "message": {
            "key": "export.images",
            "params": {"current": 5, "total": 36},
            "text": "5 of 36",
        },
        "estimatedTimeRemaining": 42.0,
    }
    assert wire["jobId"] == "0d7f3c1e-5a2b-4c6d-8e9f-a0b1c2d3e4f5"
    assert wire["occurredAt"] == "2025-03-01T12:00:03Z"

    cancelled = Cancelled(cancelled_by="timeout", progress=61.0, cleanup_completed=True)
    assert json.loads(encode_data(cancelled)) == {
        "cancelledBy": "timeout",
        "progress": 61.0,
        "cleanupCompleted": True,
    }


def test_defaults_are_omitted_and_filled_back_in() -> None:
    assert encode_data(Cancelled()) == b"{}"
    assert decode_data(Cancelled.TYPE, b"{}") == Cancelled()
    assert decode_data(Progress.TYPE, b'{"phase":"processing","progress":1,"phaseProgress":2}') == (
        Progress(phase="processing", progress=1.0, phase_progress=2.0)
    )


def test_fields_a_newer_writer_added_are_ignored() -> None:
    """Schema evolution: an older reader keeps decoding payloads with new fields."""
    buf = b'{"cancelledBy":"user","progress":3,"refundIssued":true,"newThing":{"a":[1]}}'
    assert decode_data(Cancelled.TYPE, buf) == Cancelled(cancelled_by="user", progress=3.0)


# --- unknown types -------------------------------------------------------------------------------


@SETTINGS
@given(UNKNOWN_TYPES, JSON_VALUES)
def test_an_unknown_type_keeps_its_payload_as_raw_json(name: str, value: Any) -> None:
    payload = msgspec.json.encode(value)
    buf = encode_event(event(4, name, msgspec.Raw(payload)))
    decoded = decode_event(buf)
    assert decoded.type == name
    assert isinstance(decoded.data, msgspec.Raw)
    assert bytes(decoded.data) == payload
    assert encode_event(decoded) == buf


def test_an_unknown_payload_is_passed_on_byte_for_byte() -> None:
    payload = b'{ "z": 1,  "a": [1, 2.50, "\\u00e9"], "n": null }'
    buf = encode_event(event(4, "export:shared-with-team", msgspec.Raw(payload)))
    assert payload in buf
    decoded = decode_event(buf)
    assert isinstance(decoded.data, msgspec.Raw)
    assert bytes(decoded.data) == payload
    assert encode_event(decoded) == buf
    assert decode_data("export:shared-with-team", payload) == msgspec.Raw(payload)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "payload", "path"),
    [
        (Progress.TYPE, {"phase": "sideways", "progress": 1, "phaseProgress": 1}, "$.phase"),
        (
            Progress.TYPE,
            {"phase": "processing", "progress": "50%", "phaseProgress": 1},
            "$.progress",
        ),
        (
            Progress.TYPE,
            {
                "phase": "processing",
                "progress": 1,
                "phaseProgress": 1,
                "stageProgress": {"current": "five", "total": 36},
            },
            "$.stageProgress.current",
        ),
        (
            Completed.TYPE,
            {"archive": {"fileName": "a.zip", "sizeBytes": "big", "sha256": "00"}},
            "$.archive.sizeBytes",
        ),
        (Cancelled.TYPE, {"cancelledBy": "admin"}, "$.cancelledBy"),
        (Failed.TYPE, {"message": {"key": 7}}, "$.message.key"),
    ],
)
def test_a_bad_payload_names_the_field(event_type: str, payload: Any, path: str) -> None:
    raw = json.dumps(payload).encode()
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"at `{path}`")):
        decode_data(event_type, raw)
    buf = encode_event(event(2, event_type, msgspec.Raw(raw)))
    with pytest.raises(msgspec.ValidationError) as info:
        decode_event(buf)
    # The path is relative to the payload; the field itself must be named.
    assert path.removeprefix("$") in str(info.value)


def test_a_missing_required_field_is_named() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing required field `code`"):
        decode_data(Failed.TYPE, b"{}")
    with pytest.raises(msgspec.ValidationError, match="missing required field `archive`"):
        decode_data(Completed.TYPE, b'{"processingTimeMs": 5}')


def test_a_bad_envelope_names_the_field() -> None:
    good = json.loads(encode_event(typed(1, Cancelled())))
    missing = {k: v for k, v in good.items() if k != "seq"}
    with pytest.raises(msgspec.ValidationError, match="missing required field `seq`"):
        decode_event(json.dumps(missing))
    with pytest.raises(msgspec.ValidationError, match=re.escape("$.jobId")):
        decode_event(json.dumps(good | {"jobId": "not-a-uuid"}))
    with pytest.raises(msgspec.ValidationError, match=re.escape("$.occurredAt")):
        decode_event(json.dumps(good | {"occurredAt": "yesterday"}))


def test_type_of_the_base_class_raises() -> None:
    with pytest.raises(TypeError, match="EventData is not a concrete event type"):
        type_of(EventData())


def test_type_of_names_every_concrete_type() -> None:
    for name, cls in EVENT_TYPES.items():
        assert name == cls.TYPE
        assert name.startswith("export:")
    assert {cls.TYPE for cls in EVENT_CLASSES} == set(EVENT_TYPES)
    assert len(EVENT_CLASSES) == len(EVENT_TYPES)
    assert type_of(Cancelled()) == "export:cancelled"


# --- the type sets and the database agree --------------------------------------------------------


def test_outcome_and_post_completion_types_are_known_and_disjoint() -> None:
    assert set(EVENT_TYPES) >= OUTCOME_TYPES | POST_COMPLETION_TYPES
    assert {"export:completed", "export:failed", "export:cancelled"} == OUTCOME_TYPES
    assert not OUTCOME_TYPES & POST_COMPLETION_TYPES


def _sql_text_array(sql: str, name: str) -> set[str]:
    match = re.search(rf"{name}\s+CONSTANT\s+text\[\]\s*:=\s*ARRAY\[(.*?)\]", sql, re.S)
    assert match, f"{name} not found in the migrations"
    return set(re.findall(r"'([^']*)'", match.group(1)))


def test_post_completion_types_are_what_the_database_accepts_after_completion() -> None:
    """`POST_COMPLETION_TYPES` documents the log's rule; the trigger is the rule itself."""
    sql = "\n".join(p.read_text() for p in sorted(MIGRATIONS.glob("*.sql")))
    assert _sql_text_array(sql, "after_completion") == POST_COMPLETION_TYPES


def test_outcome_types_are_the_databases_one_outcome_index() -> None:
    sql = "\n".join(p.read_text() for p in sorted(MIGRATIONS.glob("*.sql")))
    match = re.search(r"CREATE UNIQUE INDEX events_one_outcome.*?;", sql, re.S)
    assert match
    assert set(re.findall(r"'(export:[a-z-]+)'", match.group(0))) == OUTCOME_TYPES


# --- non-finite numbers --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_payload_the_encoder_accepts_decodes_back(value: float) -> None:
    """What `encode_data` writes to the log, every reader must be able to read.

    JSON has no NaN or Infinity; msgspec encodes them as `null`, which no float field accepts.
    So an `export:progress` with a NaN progress (a 0/0 rate, an infinite estimate) is stored as
    `"progress":null`, and from then on `decode_event`, the JSON Schema and every client reject
    that event of the log, while the fold silently skips it.
    """
    # Refused when the payload is made, so it can never reach the log.
    with pytest.raises(ValueError, match="finite"):
        Progress(phase="processing", progress=value, phase_progress=10.0)
    with pytest.raises(ValueError, match="finite"):
        Progress(
            phase="processing", progress=10.0, phase_progress=10.0, estimated_time_remaining=value
        )
    # And a reader meeting one written by a foreign writer gets a validation error, not a crash.
    with pytest.raises(msgspec.ValidationError):
        decode_data(Progress.TYPE, b'{"phase":"processing","progress":null,"phaseProgress":1}')


def test_event_ids_and_times_keep_their_identity() -> None:
    e = typed(9, Cancelled())
    decoded = decode_event(encode_event(e))
    assert decoded.event_id == UUID(int=9)
    assert decoded.occurred_at == e.occurred_at
    assert decoded.occurred_at.utcoffset() is not None
    assert isinstance(decoded, Event)
