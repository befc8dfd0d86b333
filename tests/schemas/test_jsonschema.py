"""The generated JSON Schemas: up to date, valid, and in agreement with the msgspec decoders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource

from schemas.events import (
    EVENT_CLASSES,
    EVENT_TYPES,
    ArchiveExpired,
    EventData,
    Queued,
    decode_event,
    encode_event,
)
from schemas.jsonschema import (
    BASE_ID,
    CLIENT_MESSAGE_FILE,
    ENVELOPE_FILE,
    JOB_STATE_FILE,
    SCHEMA_DIR,
    SERVER_MESSAGE_FILE,
    build_schemas,
    main,
    payload_file_name,
    render,
)
from schemas.state import JobState, replay
from tests.schemas.strategies import (
    JSON_OBJECTS,
    JSON_VALUES,
    PAYLOADS,
    UNKNOWN_TYPES,
    History,
    envelopes,
    typed,
    valid_histories,
)

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCHEMAS = build_schemas()
Validator = jsonschema.Draft202012Validator
# Every document by its $id: the message documents refer to the envelope document.
REGISTRY: Registry[Any] = Registry().with_resources(
    (BASE_ID + name, Resource.from_contents(doc)) for name, doc in SCHEMAS.items()
)


def validator(file_name: str) -> jsonschema.protocols.Validator:
    return Validator(SCHEMAS[file_name], registry=REGISTRY, format_checker=Validator.FORMAT_CHECKER)


ENVELOPE = validator(ENVELOPE_FILE)


def envelope_json(event_type: str, data: Any) -> dict[str, Any]:
    wire: dict[str, Any] = json.loads(encode_event(typed(2, ArchiveExpired())))
    return wire | {"type": event_type, "data": data}


# --- the checked-in files ------------------------------------------------------------------------


def test_the_checked_in_schemas_are_up_to_date() -> None:
    stale = [
        name
        for name, doc in SCHEMAS.items()
        if not (SCHEMA_DIR / name).is_file()
        or (SCHEMA_DIR / name).read_text(encoding="utf-8") != render(doc)
    ]
    assert not stale, (
        f"schemas/json/ is out of date ({', '.join(stale)}): run `make schemas` "
        "(python -m schemas.jsonschema) and commit the result"
    )


def test_there_is_one_document_per_event_type_plus_envelope_state_and_messages() -> None:
    assert set(SCHEMAS) == {
        ENVELOPE_FILE,
        JOB_STATE_FILE,
        CLIENT_MESSAGE_FILE,
        SERVER_MESSAGE_FILE,
    } | {payload_file_name(name) for name in EVENT_TYPES}
    assert payload_file_name("export:progress") == "progress.schema.json"
    assert payload_file_name("export:phase-changed") == "phase-changed.schema.json"


def test_check_mode_reports_stale_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "json"
    assert main(["--check", "--out", str(out)]) == 1
    assert not out.exists(), "--check must write nothing"
    assert "missing:" in capsys.readouterr().err

    assert main(["--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(SCHEMAS)
    for name, doc in SCHEMAS.items():
        text = (out / name).read_text(encoding="utf-8")
        assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    capsys.readouterr()
    assert main(["--check", "--out", str(out)]) == 0

    (out / "progress.schema.json").write_text("{}\n", encoding="utf-8")
    (out / "queued.schema.json").unlink()
    assert main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"stale: {out / 'progress.schema.json'}" in err
    assert f"missing: {out / 'queued.schema.json'}" in err
    assert "make schemas" in err
    assert (out / "progress.schema.json").read_text(encoding="utf-8") == "{}\n"


# --- the documents -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_document_is_a_valid_2020_12_schema(name: str) -> None:
    doc = SCHEMAS[name]
    Validator.check_schema(doc)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"] == f"https://schemas.exportlog.dev/{name}"
    assert doc["title"]
    assert doc["description"]
    assert doc["type"] == "object"
    # Every $ref resolves inside the document, or is another of these documents (a sibling
    # file, by its name relative to this one's $id).
    refs = set(_refs(doc))
    assert refs <= {f"#/$defs/{d}" for d in doc.get("$defs", {})} | set(SCHEMAS)
    assert name in (CLIENT_MESSAGE_FILE, SERVER_MESSAGE_FILE) or refs <= {
        f"#/$defs/{d}" for d in doc.get("$defs", {})
    }
    # Every $def is used.
    assert {f"#/$defs/{d}" for d in doc.get("$defs", {})} <= refs


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.TYPE)
def test_payload_documents_are_msgspecs_own_schema(cls: type[EventData]) -> None:
    doc = SCHEMAS[payload_file_name(cls.TYPE)]
    (_,), components = msgspec.json.schema_components([cls], ref_template="#/$defs/{name}")
    generated = components.pop(cls.__name__)
    assert doc["properties"] == generated["properties"]
    assert doc["required"] == generated["required"]
    assert doc.get("$defs", {}) == components
    assert SCHEMAS[ENVELOPE_FILE]["$defs"][cls.__name__] == generated


def test_the_envelope_dispatches_on_every_known_type() -> None:
    branches = SCHEMAS[ENVELOPE_FILE]["oneOf"]
    known = [b for b in branches if "const" in b["properties"]["type"]]
    assert {b["properties"]["type"]["const"]: b["properties"]["data"]["$ref"] for b in known} == {
        name: f"#/$defs/{cls.__name__}" for name, cls in EVENT_TYPES.items()
    }
    (fallback,) = [b for b in branches if "const" not in b["properties"]["type"]]
    assert sorted(fallback["properties"]["type"]["not"]["enum"]) == sorted(EVENT_TYPES)
    assert fallback["description"]


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.TYPE)
@SETTINGS
@given(data=st.data())
def test_every_encoded_event_is_a_valid_envelope(cls: type[EventData], data: st.DataObject) -> None:
    e = data.draw(envelopes(PAYLOADS[cls]))
    wire = json.loads(encode_event(e))
    ENVELOPE.validate(wire)
    validator(payload_file_name(cls.TYPE)).validate(wire["data"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_histories())
def test_every_folded_state_is_a_valid_job_state(history: History) -> None:
    state = replay(history.events)
    assert state is not None
    validator(JOB_STATE_FILE).validate(json.loads(msgspec.json.encode(state)))


def test_the_initial_state_is_a_valid_job_state() -> None:
    state = replay([typed(1, Queued())])
    assert isinstance(state, JobState)
    validator(JOB_STATE_FILE).validate(json.loads(msgspec.json.encode(state)))


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("export:progress", {}),  # required fields missing
        ("export:progress", {"phase": "processing", "progress": "50", "phaseProgress": 1}),
        ("export:progress", {"phase": "sideways", "progress": 5, "phaseProgress": 1}),
        (
            "export:progress",
            {
                "phase": "processing",
                "progress": 5,
                "phaseProgress": 5,
                "stageProgress": {"current": 1},
            },
        ),
        ("export:completed", {"processingTimeMs": 5}),
        ("export:completed", {"archive": {"fileName": "a.zip", "sizeBytes": 1.5, "sha256": ""}}),
        ("export:failed", {"retryable": True}),
        ("export:cancelled", {"cancelledBy": "admin"}),
        ("export:cancelled", {"cleanupCompleted": "yes"}),
        ("export:download-started", {"downloadId": "d1"}),
        ("export:queued", {"options": {"annotationFormats": "coco"}}),
        ("export:queued", []),
        ("export:archive-expired", None),
    ],
)
def test_a_wrong_payload_for_its_type_is_rejected(event_type: str, data: Any) -> None:
    doc = envelope_json(event_type, data)
    assert not ENVELOPE.is_valid(doc)
    with pytest.raises(msgspec.ValidationError):
        decode_event(json.dumps(doc))


def test_a_payload_of_another_type_is_rejected() -> None:
    """A `completed` payload under the `progress` type matches neither branch."""
    completed = {"archive": {"fileName": "a.zip", "sizeBytes": 1, "sha256": "00"}}
    assert ENVELOPE.is_valid(envelope_json("export:completed", completed))
    assert not ENVELOPE.is_valid(envelope_json("export:progress", completed))


def test_fields_a_newer_writer_added_are_accepted() -> None:
    doc = envelope_json("export:cancelled", {"cancelledBy": "user", "refundIssued": True})
    ENVELOPE.validate(doc)
    decode_event(json.dumps(doc))


@SETTINGS
@given(UNKNOWN_TYPES, JSON_OBJECTS)
def test_an_unknown_type_with_any_object_is_a_valid_envelope(name: str, data: Any) -> None:
    doc = envelope_json(name, data)
    ENVELOPE.validate(doc)
    decoded = decode_event(json.dumps(doc))
    assert isinstance(decoded.data, msgspec.Raw)


@SETTINGS
@given(UNKNOWN_TYPES, JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_an_unknown_type_still_needs_an_object_payload(name: str, data: Any) -> None:
    assert not ENVELOPE.is_valid(envelope_json(name, data))


@pytest.mark.parametrize("field", ["jobId", "projectId", "seq", "position", "type", "data"])
def test_an_envelope_without_a_required_field_is_rejected(field: str) -> None:
    doc = envelope_json("export:cancelled", {})
    del doc[field]
    assert not ENVELOPE.is_valid(doc)


def test_an_envelope_with_a_malformed_id_is_rejected() -> None:
    assert not ENVELOPE.is_valid(envelope_json("export:cancelled", {}) | {"jobId": "job-1"})
    assert not ENVELOPE.is_valid(envelope_json("export:cancelled", {}) | {"seq": "1"})


# The schema and the decoder must agree on every payload: mutate a valid one and compare.
_REPLACEMENTS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**31), 2**31)
    # Fractional only: JSON Schema's "integer" accepts 2.0, msgspec's int does not (see below).
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | st.text(max_size=5)
    | st.sampled_from(["processing", "downloading", "images", "user", "timeout"])
    | st.lists(st.integers(0, 3), max_size=2)
    | JSON_OBJECTS
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EVENT_CLASSES).flatmap(lambda cls: PAYLOADS[cls]), st.data())
def test_the_schema_and_the_decoder_agree_on_mutated_payloads(
    payload: EventData, data: st.DataObject
) -> None:
    name = type(payload).TYPE
    wire = json.loads(encode_event(typed(2, payload)))
    fields = sorted(
        msgspec.json.schema(type(payload))["$defs"][type(payload).__name__]["properties"]
    )
    key = data.draw(st.sampled_from(fields))
    if data.draw(st.booleans()):
        wire["data"].pop(key, None)
    else:
        wire["data"][key] = data.draw(_REPLACEMENTS)
    try:
        decode_event(json.dumps(wire))
        decodes = True
    except msgspec.ValidationError:
        decodes = False
    assert ENVELOPE.is_valid(wire) == decodes, (name, key, wire["data"])


def test_integral_floats_in_integer_fields_are_a_known_disagreement() -> None:
    """JSON Schema's `integer` accepts `2.0`; msgspec's `int` refuses it. Writers never emit it
    (msgspec writes ints as ints), so clients only need to know not to send it."""
    doc = envelope_json("export:download-started", {"downloadId": "d", "totalBytes": 2.0})
    assert ENVELOPE.is_valid(doc)
    with pytest.raises(msgspec.ValidationError):
        decode_event(json.dumps(doc))
