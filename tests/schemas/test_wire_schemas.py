"""The gateway's message schemas against real messages, encoded by the code that sends them.

Every frame is checked twice: against the JSON Schema document of its direction
(`client-message.schema.json`, `server-message.schema.json`) and against the payload schema of
the AsyncAPI message its `type` names (or the live event message, for an envelope).
"""

from __future__ import annotations

import json
import typing
from typing import Any
from uuid import UUID

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from schemas.asyncapi import DOCUMENT_ID, build_asyncapi
from schemas.events import Event, Progress, decode_event, encode_event
from schemas.jsonschema import BASE_ID, CLIENT_MESSAGE_FILE, SERVER_MESSAGE_FILE, build_schemas
from schemas.state import JobState, replay
from schemas.wire import (
    Authenticate,
    Authenticated,
    CancelAck,
    CancelExport,
    CaughtUp,
    ClientMessage,
    EndOfStream,
    Error,
    Heartbeat,
    Ping,
    Pong,
    Replay,
    ServerMessage,
    StatusSync,
    Subscribe,
    Unsubscribe,
    client_decoder,
    replay_frame,
    server_encoder,
)
from tests.schemas.strategies import (
    JSON_OBJECTS,
    PAYLOADS,
    TEXT,
    UNKNOWN_TYPES,
    History,
    envelopes,
    typed,
    valid_histories,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCHEMAS = build_schemas()
DOC = build_asyncapi()
REGISTRY: Registry[Any] = (
    Registry()
    .with_resources((BASE_ID + name, Resource.from_contents(doc)) for name, doc in SCHEMAS.items())
    .with_resource(DOCUMENT_ID, Resource.from_contents(DOC, default_specification=DRAFT202012))
)
Validator = jsonschema.Draft202012Validator


def validator(uri: str) -> jsonschema.protocols.Validator:
    return Validator({"$ref": uri}, registry=REGISTRY, format_checker=Validator.FORMAT_CHECKER)


CLIENT = validator(BASE_ID + CLIENT_MESSAGE_FILE)
SERVER = validator(BASE_ID + SERVER_MESSAGE_FILE)
PAYLOAD_BY_NAME = {
    message["name"]: validator(DOCUMENT_ID + message["payload"]["$ref"])
    for message in DOC["components"]["messages"].values()
}
CLIENT_TAGS = {cls.__struct_config__.tag: cls for cls in typing.get_args(ClientMessage)}
SERVER_TAGS = {cls.__struct_config__.tag: cls for cls in typing.get_args(ServerMessage)}
LIVE_EVENT = "event"
"""The AsyncAPI name of a live event, which has no `type` of its own."""
DIRECTIONS: dict[str, tuple[jsonschema.protocols.Validator, set[str]]] = {
    "client": (CLIENT, set(CLIENT_TAGS)),
    "server": (SERVER, {*SERVER_TAGS, LIVE_EVENT}),
}


def message_name(wire: Any) -> str | None:
    """The AsyncAPI name of the message a frame is: its `type`, or a live event's."""
    if not isinstance(wire, dict):
        return None
    if "eventId" in wire:
        return LIVE_EVENT
    tag = wire.get("type")
    return tag if isinstance(tag, str) else None


def assert_valid(direction: str, raw: bytes) -> Any:
    """The frame is valid in its direction's document and as the AsyncAPI message it names."""
    document, names = DIRECTIONS[direction]
    wire = json.loads(raw)
    document.validate(wire)
    name = message_name(wire)
    assert name is not None, wire
    assert name in names, wire
    PAYLOAD_BY_NAME[name].validate(wire)
    return wire


def assert_invalid(direction: str, wire: Any) -> None:
    """Neither the direction's document nor the AsyncAPI message it names accepts the frame."""
    document, names = DIRECTIONS[direction]
    assert not document.is_valid(wire)
    name = message_name(wire)
    if name is not None and name in names:
        assert not PAYLOAD_BY_NAME[name].is_valid(wire)


def decode_server(raw: bytes | str) -> Any:
    """A server frame decoded as a client built on these types would: events as envelopes."""
    wire = json.loads(raw)
    if isinstance(wire, dict) and "eventId" in wire:
        return decode_event(raw)
    if (
        isinstance(wire, dict)
        and wire.get("type") == "export:replay"
        and isinstance(wire.get("events"), list)
    ):
        head = msgspec.json.decode(json.dumps(wire | {"events": []}), type=ServerMessage)
        return head, [decode_event(json.dumps(event)) for event in wire["events"]]
    return msgspec.json.decode(raw, type=ServerMessage)


# --- strategies: real messages -------------------------------------------------------------------

JOB_IDS = st.uuids()
SEQS = st.integers(0, 2**31 - 1)
POSITIONS = st.integers(0, 2**63 - 1)
PROJECTS = TEXT.filter(bool)


def _state(history: History) -> JobState:
    state = replay(history.events)
    assert state is not None
    return state


STATES: st.SearchStrategy[JobState] = valid_histories().map(_state)
TYPED_EVENTS: st.SearchStrategy[Event] = st.one_of(*(envelopes(p) for p in PAYLOADS.values()))


@st.composite
def unknown_events(draw: st.DrawFn) -> Event:
    """An event of a type a newer writer added: its payload passes through as raw JSON."""
    event = draw(TYPED_EVENTS)
    # Never named like a gateway message (test_asyncapi checks that no known type is).
    name = draw(UNKNOWN_TYPES.filter(lambda t: t not in SERVER_TAGS and t not in CLIENT_TAGS))
    data = msgspec.Raw(json.dumps(draw(JSON_OBJECTS)).encode())
    return msgspec.structs.replace(event, type=name, data=data)


EVENTS = TYPED_EVENTS | unknown_events()
EVENT_LISTS = st.lists(EVENTS, max_size=4)


@st.composite
def stream_names(draw: st.DrawFn) -> dict[str, Any]:
    """The fields that name a stream in a marker: a job, a project or the log."""
    kind = draw(st.sampled_from(["job", "project", "log"]))
    if kind == "job":
        return {"job_id": draw(JOB_IDS)}
    if kind == "project":
        return {"project_id": draw(PROJECTS)}
    return {"log": True}


@st.composite
def replay_frames(draw: st.DrawFn) -> bytes:
    """An `export:replay` frame as the reader builds it: events spliced into an empty head."""
    head = Replay(**draw(stream_names()), events=[])
    return replay_frame(head, [encode_event(e) for e in draw(EVENT_LISTS)])


def _encode(message: msgspec.Struct) -> bytes:
    return server_encoder.encode(message)


@st.composite
def caught_up(draw: st.DrawFn) -> bytes:
    names = draw(stream_names())
    if "job_id" in names:
        return _encode(CaughtUp(**names, seq=draw(SEQS)))
    return _encode(CaughtUp(**names, position=draw(POSITIONS)))


SERVER_FRAMES: dict[str, tuple[str, st.SearchStrategy[bytes]]] = {
    "status-sync of a job": (
        "export:status-sync",
        st.builds(StatusSync, job_id=JOB_IDS, seq=SEQS, state=st.none() | STATES).map(_encode),
    ),
    "status-sync of a project": (
        "export:status-sync",
        st.builds(
            StatusSync,
            project_id=PROJECTS,
            position=POSITIONS,
            jobs=st.none() | st.lists(STATES, max_size=2),
        ).map(_encode),
    ),
    "status-sync of the log": (
        "export:status-sync",
        st.builds(StatusSync, log=st.just(True), position=POSITIONS).map(_encode),
    ),
    "replay frame": ("export:replay", replay_frames()),
    "replay encoded whole": (
        "export:replay",
        st.builds(Replay, job_id=JOB_IDS, events=st.lists(TYPED_EVENTS, max_size=3)).map(_encode),
    ),
    "caught-up": ("export:caught-up", caught_up()),
    "end-of-stream": (
        "export:end-of-stream",
        st.builds(EndOfStream, job_id=JOB_IDS, seq=SEQS).map(_encode),
    ),
    "cancel-ack accepted": (
        "export:cancel-ack",
        st.builds(CancelAck, job_id=JOB_IDS, accepted=st.just(True), seq=st.none() | SEQS).map(
            _encode
        ),
    ),
    "cancel-ack refused": (
        "export:cancel-ack",
        st.builds(
            CancelAck,
            job_id=JOB_IDS,
            accepted=st.just(False),
            seq=st.none() | SEQS,
            outcome=st.none() | st.sampled_from(["completed", "failed", "cancelled"]),
        ).map(_encode),
    ),
    "pong": ("pong", st.just(Pong()).map(_encode)),
    "heartbeat": ("heartbeat", st.builds(Heartbeat, interval=st.floats(0.01, 3600.0)).map(_encode)),
    "authenticated": ("authenticated", st.builds(Authenticated, user=TEXT).map(_encode)),
    "error": (
        "error",
        st.builds(Error, code=st.sampled_from(["invalid_message", "not_found"]), message=TEXT).map(
            _encode
        ),
    ),
    "live event": (LIVE_EVENT, TYPED_EVENTS.map(encode_event)),
    "live event of an unknown type": (LIVE_EVENT, unknown_events().map(encode_event)),
}

CLIENT_MESSAGES: st.SearchStrategy[msgspec.Struct] = st.one_of(
    st.builds(Authenticate, token=TEXT),
    st.builds(
        Subscribe,
        job_id=st.none() | JOB_IDS,
        project_id=st.none() | PROJECTS,
        log=st.booleans(),
        after_seq=st.none() | SEQS,
        after_position=st.none() | POSITIONS,
    ),
    st.builds(
        Unsubscribe, job_id=st.none() | JOB_IDS, project_id=st.none() | PROJECTS, log=st.booleans()
    ),
    st.builds(CancelExport, job_id=JOB_IDS),
    st.just(Ping()),
)


def test_every_server_message_has_a_strategy() -> None:
    assert {name for name, _ in SERVER_FRAMES.values()} == {*SERVER_TAGS, LIVE_EVENT}


# --- what the gateway sends ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SERVER_FRAMES))
@SETTINGS
@given(data=st.data())
def test_every_frame_the_gateway_sends_is_a_valid_server_message(
    kind: str, data: st.DataObject
) -> None:
    name, frames = SERVER_FRAMES[kind]
    frame = data.draw(frames)
    wire = assert_valid("server", frame)
    assert message_name(wire) == name
    assert not CLIENT.is_valid(wire)
    # The types take it back: the schemas accept what the decoders accept.
    decoded = decode_server(frame)
    if name in SERVER_TAGS:
        head = decoded[0] if name == "export:replay" else decoded
        assert type(head) is SERVER_TAGS[name]


@SETTINGS
@given(st.lists(STATES, max_size=3), POSITIONS)
def test_a_project_status_sync_with_spliced_job_states_is_valid(
    states: list[JobState], position: int
) -> None:
    """The gateway splices a project's job states into the marker as the projection stores them
    (services/gateway/clients.py): the result is a valid status-sync."""
    sync = server_encoder.encode(StatusSync(project_id="p", position=position))
    frame = sync[:-1] + b',"jobs":' + msgspec.json.encode(states) + b"}"
    assert_valid("server", frame)
    assert isinstance(decode_server(frame), StatusSync)


def test_the_smallest_frames_are_valid() -> None:
    """An empty replay page of each kind of stream, and the sync of a job with no event yet."""
    job = UUID("8f0c6d52-3a5e-4d4e-9c55-2b1e8b0e1f3a")
    for head in (Replay(job_id=job, events=[]), Replay(project_id="p", events=[])):
        assert_valid("server", replay_frame(head, []))
    assert_valid("server", replay_frame(Replay(log=True, events=[]), []))
    sync = server_encoder.encode(StatusSync(job_id=job, seq=0))
    assert json.loads(sync) == {"type": "export:status-sync", "jobId": str(job), "seq": 0}
    assert_valid("server", sync)


# --- what clients send ---------------------------------------------------------------------------


@SETTINGS
@given(CLIENT_MESSAGES)
def test_every_client_message_is_valid(message: msgspec.Struct) -> None:
    # msgspec writes every field, null or not: the most a client may send.
    frame = msgspec.json.encode(message)
    wire = assert_valid("client", frame)
    assert not SERVER.is_valid(wire)
    assert client_decoder.decode(frame) == message
    # What a hand-written client sends: only the fields it means.
    sparse = {k: v for k, v in wire.items() if v is not None and v is not False}
    assert_valid("client", json.dumps(sparse).encode())
    assert client_decoder.decode(json.dumps(sparse)) == message


# The schema and the decoder must agree on every client message: mutate a valid one and compare.
_REPLACEMENTS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**31), 2**31)
    # Fractional only: JSON Schema's "integer" accepts 2.0, msgspec's int does not.
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | TEXT
    | JOB_IDS.map(str)
    | st.sampled_from(sorted(CLIENT_TAGS) + sorted(SERVER_TAGS) + ["Subscribe", "auth "])
    | st.lists(st.integers(0, 3), max_size=2)
    | JSON_OBJECTS
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CLIENT_MESSAGES, st.data())
def test_the_schema_and_the_decoder_agree_on_mutated_client_messages(
    message: msgspec.Struct, data: st.DataObject
) -> None:
    wire = json.loads(msgspec.json.encode(message))
    key = data.draw(st.sampled_from(sorted(wire)))
    if data.draw(st.booleans()):
        del wire[key]
    else:
        wire[key] = data.draw(_REPLACEMENTS)
    try:
        client_decoder.decode(json.dumps(wire))
        decodes = True
    except msgspec.ValidationError:
        decodes = False
    assert CLIENT.is_valid(wire) == decodes, wire


def without(wire: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if k != key}


# --- what neither side sends ---------------------------------------------------------------------

JOB = "8f0c6d52-3a5e-4d4e-9c55-2b1e8b0e1f3a"
REPLAY = {"type": "export:replay", "jobId": JOB}
EVENT = json.loads(
    encode_event(typed(3, Progress(phase="processing", progress=12.5, phase_progress=13.9)))
)


@pytest.mark.parametrize(
    "wire",
    [
        # required fields missing
        {"type": "export:end-of-stream", "jobId": JOB},
        {"type": "export:cancel-ack", "jobId": JOB},
        {"type": "export:cancel-ack", "accepted": True},
        {"type": "export:replay", "jobId": JOB},
        {"type": "heartbeat"},
        {"type": "authenticated"},
        {"type": "error", "code": "not_found"},
        {"jobId": JOB, "seq": 3},
        # wrong type tags
        {"type": "export:status_sync", "jobId": JOB, "seq": 3},
        {"type": "Pong"},
        {"type": "export:caughtup", "jobId": JOB, "seq": 3},
        {"type": "ping"},
        {"type": None},
        # wrong field types
        {"type": "export:end-of-stream", "jobId": "job-1", "seq": 3},
        {"type": "export:end-of-stream", "jobId": JOB, "seq": "3"},
        {"type": "heartbeat", "interval": "15"},
        {"type": "export:cancel-ack", "jobId": JOB, "accepted": "yes"},
        {"type": "export:status-sync", "jobId": JOB, "seq": 3, "state": {}},
        {"type": "export:status-sync", "projectId": "p", "position": 7, "jobs": {}},
        {"type": "export:caught-up", "log": "true"},
        # a replay with a malformed event, and a malformed live event
        {
            "type": "export:replay",
            "jobId": JOB,
            "events": [{k: v for k, v in EVENT.items() if k != "seq"}],
        },
        {"type": "export:replay", "jobId": JOB, "events": [EVENT | {"position": "1"}]},
        {
            "type": "export:replay",
            "jobId": JOB,
            "events": [EVENT | {"type": "export:progress", "data": {}}],
        },
        EVENT | {"data": []},
        EVENT | {"type": "export:progress", "data": {"phase": "sideways"}},
        without(EVENT, "occurredAt"),
        without(EVENT, "data"),
        # not an object
        [],
        "pong",
    ],
)
def test_a_malformed_server_message_is_rejected(wire: Any) -> None:
    assert_invalid("server", wire)
    with pytest.raises(msgspec.ValidationError):
        decode_server(json.dumps(wire))


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "auth"},
        {"type": "auth", "token": 5},
        {"type": "export:cancel"},
        {"type": "export:cancel", "jobId": "job-1"},
        {"type": "subscribe", "afterSeq": "12"},
        {"type": "subscribe", "log": "yes"},
        {"type": "unsubscribe", "jobId": 7},
        {"type": "Subscribe", "jobId": JOB},
        {"type": "unsubscribe-all"},
        {"type": "pong"},
        {"jobId": JOB, "afterSeq": 3},
        [],
    ],
)
def test_a_malformed_client_message_is_rejected(wire: Any) -> None:
    assert_invalid("client", wire)
    with pytest.raises(msgspec.ValidationError):
        client_decoder.decode(json.dumps(wire))
