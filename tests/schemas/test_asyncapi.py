"""The AsyncAPI document of the gateway: up to date, well formed, and in agreement with the code."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from schemas.asyncapi import (
    ADDRESS,
    CLOSE_CODES,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DOCUMENT_ID,
    ERROR_CODES,
    LIVE_EVENT,
    SUBPROTOCOL,
    TOKEN_SUBPROTOCOL_PREFIX,
    build_asyncapi,
)
from schemas.events import EVENT_TYPES, decode_event, encode_event
from schemas.jsonschema import (
    CLIENT_MESSAGE_FILE,
    ENVELOPE_FILE,
    JOB_STATE_FILE,
    SERVER_MESSAGE_FILE,
    build_schemas,
    render,
)
from schemas.wire import (
    ClientMessage,
    Replay,
    ServerMessage,
    client_decoder,
    replay_frame,
    server_encoder,
)
from services.gateway import clients
from services.gateway.config import GatewayConfig

DOC = build_asyncapi()
SCHEMAS = build_schemas()
COMPONENTS = DOC["components"]
GATEWAY_SOURCES = sorted((Path(clients.__file__).parent).glob("*.py"))
CLIENT_TAGS = {cls.__struct_config__.tag: cls for cls in typing.get_args(ClientMessage)}
SERVER_TAGS = {cls.__struct_config__.tag: cls for cls in typing.get_args(ServerMessage)}
REGISTRY: Registry[Any] = Registry().with_resource(
    DOCUMENT_ID, Resource.from_contents(DOC, default_specification=DRAFT202012)
)
Validator = jsonschema.Draft202012Validator
COMPONENT_KEY = re.compile(r"^[\w\d.\-_]+$")
"""What AsyncAPI 3.0 allows as the key of a component."""


def resolve(ref: str) -> Any:
    """The value a local reference (`#/a/b`) points at in the document."""
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for segment in ref.removeprefix("#/").split("/"):
        segment = segment.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref} does not resolve"
        assert segment in node, f"{ref} does not resolve"
        node = node[segment]
    return node


def validator_at(ref: str) -> jsonschema.protocols.Validator:
    """A validator for the schema a local reference points at, its own references resolved."""
    return Validator(
        {"$ref": DOCUMENT_ID + ref}, registry=REGISTRY, format_checker=Validator.FORMAT_CHECKER
    )


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def message_ids(items: list[dict[str, str]], channel: str) -> list[str]:
    prefix = f"#/channels/{channel}/messages/"
    assert all(item["$ref"].startswith(prefix) for item in items), items
    return [item["$ref"].removeprefix(prefix) for item in items]


# --- the document's structure --------------------------------------------------------------------


def test_the_document_is_asyncapi_3_0() -> None:
    assert DOC["asyncapi"] == "3.0.0"
    for field in ("title", "version", "description"):
        assert DOC["info"][field], field
    assert DOC["defaultContentType"] == "application/json"
    (server,) = DOC["servers"].values()
    assert server["protocol"] == "ws"
    assert server["host"] == "{host}:{port}"
    assert set(server["variables"]) == {"host", "port"}
    (channel,) = DOC["channels"].values()
    assert channel["address"] == ADDRESS == "/ws"
    assert channel["bindings"]["ws"]["method"] == "GET"
    for section in ("schemas", "messages", "securitySchemes"):
        assert all(COMPONENT_KEY.match(key) for key in COMPONENTS[section]), section
    for name, operation in DOC["operations"].items():
        assert operation["action"] in {"send", "receive"}, name
        assert operation["summary"], name
        assert operation["description"], name
    for message in COMPONENTS["messages"].values():
        assert message["name"]
        assert message["title"]
        assert message["summary"]
        assert message["examples"]


def test_every_reference_resolves() -> None:
    found = refs(DOC)
    assert found
    for ref in found:
        resolve(ref)


def test_every_message_is_sent_or_received_and_every_referenced_message_exists() -> None:
    channels = DOC["channels"]
    used: set[str] = set()
    for name, operation in DOC["operations"].items():
        channel = operation["channel"]["$ref"].removeprefix("#/channels/")
        assert channel in channels, name
        ids = message_ids(operation["messages"], channel)
        assert ids, name
        for message_id in ids:
            assert message_id in channels[channel]["messages"], (name, message_id)
            assert resolve(channels[channel]["messages"][message_id]["$ref"]) is not None
        used.update(ids)
        reply = operation.get("reply")
        if reply is not None:
            reply_channel = reply["channel"]["$ref"].removeprefix("#/channels/")
            for message_id in message_ids(reply["messages"], reply_channel):
                assert message_id in channels[reply_channel]["messages"], (name, message_id)
    for channel in channels.values():
        assert set(channel["messages"]) == used == set(COMPONENTS["messages"])


def test_every_wire_message_is_documented_in_its_direction() -> None:
    messages = COMPONENTS["messages"]
    names = {message_id: message["name"] for message_id, message in messages.items()}
    assert sorted(names.values()) == sorted([*CLIENT_TAGS, *SERVER_TAGS, "event"])
    assert names[LIVE_EVENT] == "event"
    received: set[str] = set()
    sent: set[str] = set()
    for operation in DOC["operations"].values():
        ids = message_ids(operation["messages"], "gateway")
        (received if operation["action"] == "receive" else sent).update(names[i] for i in ids)
        reply = operation.get("reply")
        if reply is not None:
            assert operation["action"] == "receive"
            replies = {names[i] for i in message_ids(reply["messages"], "gateway")}
            assert replies <= set(SERVER_TAGS)
    assert received == set(CLIENT_TAGS)
    assert sent == set(SERVER_TAGS) | {"event"}


def test_the_requests_are_answered_as_the_gateway_answers_them() -> None:
    def replies(operation: str) -> set[str]:
        items = DOC["operations"][operation]["reply"]["messages"]
        return {COMPONENTS["messages"][i]["name"] for i in message_ids(items, "gateway")}

    assert replies("receiveAuthenticate") == {"authenticated"}
    assert replies("receivePing") == {"pong"}
    assert replies("receiveCancelExport") == {"export:cancel-ack", "error"}
    assert replies("receiveSubscribe") == {"export:status-sync", "error"}


# --- the schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPONENTS["schemas"]))
def test_every_schema_is_valid_json_schema(name: str) -> None:
    schema = COMPONENTS["schemas"][name]
    Validator.check_schema(schema)
    # An AsyncAPI Schema Object is a superset of draft 07: the components must be valid there too.
    jsonschema.Draft7Validator.check_schema(schema)
    assert "$defs" not in schema
    assert "$id" not in schema
    assert all(ref.startswith("#/components/schemas/") for ref in refs(schema))


@pytest.mark.parametrize("message_id", sorted(COMPONENTS["messages"]))
def test_every_payload_is_a_valid_schema_of_a_component(message_id: str) -> None:
    payload = COMPONENTS["messages"][message_id]["payload"]
    Validator.check_schema(payload)
    Validator.check_schema(resolve(payload["$ref"]))
    assert payload["$ref"].startswith("#/components/schemas/")


DOCUMENTS = [
    (CLIENT_MESSAGE_FILE, "ClientMessage"),
    (SERVER_MESSAGE_FILE, "ServerMessage"),
    (ENVELOPE_FILE, "Event"),
    (JOB_STATE_FILE, "JobState"),
]
"""The JSON Schema documents of the messages, and the component each one is."""


def _rebased(schema: Any) -> Any:
    text = json.dumps(schema)
    text = text.replace('"#/$defs/', '"#/components/schemas/')
    for file_name, component in DOCUMENTS:
        text = text.replace(f'"{file_name}"', f'"#/components/schemas/{component}"')
    return json.loads(text)


@pytest.mark.parametrize(("file_name", "component"), DOCUMENTS)
def test_the_components_are_the_json_schema_documents(file_name: str, component: str) -> None:
    doc = dict(SCHEMAS[file_name])
    defs = doc.pop("$defs")
    del doc["$schema"], doc["$id"]
    assert COMPONENTS["schemas"][component] == _rebased(doc)
    for name, schema in defs.items():
        assert COMPONENTS["schemas"][name] == _rebased(schema), name


def test_the_payload_of_each_message_is_its_struct() -> None:
    for message in COMPONENTS["messages"].values():
        cls = CLIENT_TAGS.get(message["name"]) or SERVER_TAGS.get(message["name"])
        expected = "Event" if cls is None else cls.__name__
        assert message["payload"] == {"$ref": f"#/components/schemas/{expected}"}


def test_no_event_type_is_named_like_a_gateway_message() -> None:
    """A live event and a gateway message are told apart by `type` as well as by `eventId`."""
    assert not set(EVENT_TYPES) & (set(SERVER_TAGS) | set(CLIENT_TAGS))


# --- the examples are real messages --------------------------------------------------------------


def _examples() -> list[tuple[str, str, Any]]:
    return [
        (message_id, example["name"], example["payload"])
        for message_id, message in sorted(COMPONENTS["messages"].items())
        for example in message["examples"]
    ]


@pytest.mark.parametrize(
    ("message_id", "name", "payload"), _examples(), ids=[f"{m}:{n}" for m, n, _ in _examples()]
)
def test_every_example_is_a_valid_message(message_id: str, name: str, payload: Any) -> None:
    message = COMPONENTS["messages"][message_id]
    validator_at(message["payload"]["$ref"]).validate(payload)
    raw = json.dumps(payload)
    if message_id == LIVE_EVENT:
        decode_event(raw)
    elif message["name"] in CLIENT_TAGS:
        assert type(client_decoder.decode(raw)) is CLIENT_TAGS[message["name"]]
    elif message["name"] == "export:replay":
        # A replay frame's events are envelopes, spliced in: decoded and encoded as such.
        head = msgspec.json.decode(json.dumps(payload | {"events": []}), type=ServerMessage)
        assert isinstance(head, Replay)
        events = [encode_event(decode_event(json.dumps(e))) for e in payload["events"]]
        assert json.loads(replay_frame(head, events)) == payload
    else:
        decoded = msgspec.json.decode(raw, type=ServerMessage)
        assert type(decoded) is SERVER_TAGS[message["name"]]
        # What the gateway would send for it: the example is in its canonical encoding.
        assert json.loads(server_encoder.encode(decoded)) == payload


# --- agreement with the gateway's code -----------------------------------------------------------


def test_the_close_codes_are_the_gateways() -> None:
    constants = {name: value for name, value in vars(clients).items() if name.startswith("CLOSE_")}
    assert {c.constant: c.code for c in CLOSE_CODES if c.constant} == constants
    # 1009 is sent by the WebSocket layer for a message over `max_size`.
    assert [c.code for c in CLOSE_CODES if not c.constant] == [1009]
    (channel,) = DOC["channels"].values()
    assert [c["code"] for c in channel["x-close-codes"]] == [c.code for c in CLOSE_CODES]
    for code in CLOSE_CODES:
        assert f"| {code.code} | {code.meaning} | {code.action} |" in DOC["info"]["description"]


def test_the_error_codes_are_the_gateways() -> None:
    sent = {
        code
        for path in GATEWAY_SOURCES
        for code in re.findall(r"\.error\(\s*\"([a-z_]+)\"", path.read_text(encoding="utf-8"))
    }
    assert sent == set(ERROR_CODES)
    operation = DOC["operations"]["sendError"]["description"]
    assert all(f"`{code}`" in operation for code in ERROR_CODES)


def test_every_setting_named_is_a_gateway_setting() -> None:
    named = set(re.findall(r"GATEWAY_[A-Z_]+", render(DOC)))
    assert named
    settings = {f"GATEWAY_{field.name.upper()}" for field in fields(GatewayConfig)}
    assert named <= settings, named - settings


def test_the_address_and_the_subprotocol_are_the_gateways() -> None:
    assert SUBPROTOCOL == clients.SUBPROTOCOL
    config = GatewayConfig()
    assert (config.host, config.port) == (DEFAULT_HOST, DEFAULT_PORT)
    (server,) = DOC["servers"].values()
    assert server["variables"]["host"]["default"] == config.host
    assert server["variables"]["port"]["default"] == str(config.port)
    server_source = (Path(clients.__file__).parent / "server.py").read_text(encoding="utf-8")
    assert f'"{ADDRESS}"' in server_source
    assert f'"{TOKEN_SUBPROTOCOL_PREFIX}"' in server_source
