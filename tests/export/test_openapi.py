"""The OpenAPI document: up to date, valid, in agreement with the routes and with the answers."""

from __future__ import annotations

import json
import uuid
from typing import Any

import jsonschema
from aiohttp import ClientResponse
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from schemas.jsonschema import ENVELOPE_FILE, build_schemas
from services.export.api import PUBLIC_PATHS
from services.export.app import create_app
from services.export.config import ExportConfig
from services.export.openapi import SECURITY_SCHEME, build_openapi
from tests.export.conftest import Client, ClientFactory, auth
from tests.support import wait_for

DOC = build_openapi()
DOC_URI = "urn:exportlog:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT202012)
)
Validator = jsonschema.Draft202012Validator
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

START = "/projects/{project_id}/export"
HISTORY = START + "/history"
STATUS = START + "/{job_id}/status"
CANCEL = START + "/{job_id}/cancel"
EVENTS = START + "/{job_id}/events"
VERIFY = START + "/{job_id}/verify"
DOWNLOAD = START + "/{job_id}/download"
LOG = "/v1/events"


def _pointer(*segments: str) -> str:
    return "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in segments)


def validator_at(*segments: str) -> jsonschema.protocols.Validator:
    """A validator for the schema at a place in the document, its `$ref`s resolved in it."""
    return Validator(
        {"$ref": f"{DOC_URI}#{_pointer(*segments)}"},
        registry=REGISTRY,
        format_checker=Validator.FORMAT_CHECKER,
    )


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item}


# --- the document --------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOC)
    assert DOC["openapi"].startswith("3.1.")
    for field in ("title", "version", "description"):
        assert DOC["info"][field], field


def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    app = create_app(ExportConfig(database_url="postgresql://unused", jwt_secret="x" * 32))
    routed = set()
    for route in app.router.routes():
        assert route.resource is not None
        routed.add((route.resource.canonical, route.method.lower()))
    documented = operations(DOC)
    assert all(method in METHODS for _, method in documented)

    def without_head(ops: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {op for op in ops if op[1] != "head"}

    assert without_head(routed) == without_head(documented)
    # aiohttp answers HEAD on every GET route; the document names HEAD where it matters (the
    # download) and says that every other GET answers it too.
    assert {op for op in documented if op[1] == "head"} <= routed
    assert {(path, "get") for path, method in routed if method == "head"} <= documented


def test_every_operation_but_the_public_ones_needs_a_bearer_token() -> None:
    assert DOC["security"] == [{SECURITY_SCHEME: []}]
    scheme = DOC["components"]["securitySchemes"][SECURITY_SCHEME]
    assert scheme | {"description": ""} == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "",
    }
    assert set(DOC["paths"]) >= PUBLIC_PATHS
    for path, method in operations(DOC):
        operation = DOC["paths"][path][method]
        if path in PUBLIC_PATHS:
            assert operation["security"] == [], (path, method)
            assert "401" not in operation["responses"], (path, method)
        else:
            assert "security" not in operation, (path, method)
            assert "401" in operation["responses"], (path, method)


def test_operation_ids_are_unique() -> None:
    ids = [DOC["paths"][path][method]["operationId"] for path, method in operations(DOC)]
    assert len(ids) == len(set(ids))


def test_the_event_component_is_the_envelope_schema() -> None:
    envelope = build_schemas()[ENVELOPE_FILE]
    event = DOC["components"]["schemas"]["Event"]
    expected = json.loads(
        json.dumps(
            {k: v for k, v in envelope.items() if k not in ("$schema", "$id", "$defs")}
        ).replace('"#/$defs/', '"#/components/schemas/')
    )
    assert event == expected
    for name in envelope["$defs"]:
        assert name in DOC["components"]["schemas"], name


def test_every_example_matches_its_schema() -> None:
    checked = 0
    for path, method in operations(DOC):
        for status, response in DOC["paths"][path][method]["responses"].items():
            for media_type, media in response.get("content", {}).items():
                if "example" in media:
                    segments = ("paths", path, method, "responses", status, "content")
                    validator_at(*segments, media_type, "schema").validate(media["example"])
                    checked += 1
    assert checked > 10


# --- the service ---------------------------------------------------------------------------------


async def test_the_document_is_served_without_a_token(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOC


class Conformance:
    """Checks answers against the document, and remembers which responses it has seen."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, int]] = set()

    async def check(self, response: ClientResponse, path: str, method: str = "get") -> Any:
        """The answer's JSON body, after checking status, headers and body against the doc."""
        where = f"{method.upper()} {path} -> {response.status}"
        responses = DOC["paths"][path][method]["responses"]
        status = str(response.status)
        assert status in responses, f"{where}: undocumented status ({await response.text()})"
        self.seen.add((path, method, response.status))
        documented = responses[status]
        for name, header in documented.get("headers", {}).items():
            if header.get("required"):
                assert name in response.headers, f"{where}: no {name} header"
                if header["schema"].get("type") == "string":
                    Validator(header["schema"]).validate(response.headers[name])
        content = documented.get("content")
        body = await response.read()
        if content is None:
            assert body == b"", f"{where}: a body the document does not describe"
            return None
        assert response.content_type in content, f"{where}: {response.content_type}"
        if response.content_type != "application/json":
            return body
        value = json.loads(body)
        segments = ("paths", path, method, "responses", status, "content")
        errors = list(validator_at(*segments, "application/json", "schema").iter_errors(value))
        assert not errors, f"{where}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
        return value


async def test_answers_conform_to_the_document(client: Client) -> None:
    api = Conformance()
    check = api.check

    # Starting: 202 twice with one Idempotency-Key, then 400, 404, 422.
    idempotent = {**auth(), "Idempotency-Key": "conformance-1"}
    response = await client.post("/projects/demo/export", headers=idempotent, json={})
    accepted = await check(response, START, "post")
    assert response.headers["Location"] == accepted["statusUrl"]
    response = await client.post("/projects/demo/export", headers=idempotent, json={})
    assert (await check(response, START, "post"))["jobId"] == accepted["jobId"]
    response = await client.post("/projects/demo/export", headers=auth(), data=b"{")
    assert response.status == 400
    await check(response, START, "post")
    response = await client.post(
        "/projects/absent/export", headers=auth(projects=("absent",)), json={}
    )
    assert response.status == 404
    await check(response, START, "post")
    response = await client.post(
        "/projects/demo/export", headers=auth(), json={"annotationFormats": ["pdf"]}
    )
    assert response.status == 422
    await check(response, START, "post")

    job = f"/projects/demo/export/{accepted['jobId']}"
    response = await client.get(f"{job}/status", headers=auth())
    assert response.status == 200
    await check(response, STATUS)

    async def finished() -> bool:
        response = await client.get(f"{job}/status", headers=auth())
        body = await check(response, STATUS)
        return bool(body["state"]["status"] in {"completed", "failed", "cancelled"})

    await wait_for(finished, timeout=60, interval=0.1)
    state = (await (await client.get(f"{job}/status", headers=auth())).json())["state"]
    assert state["status"] == "completed", state

    # Reading: events, history, verify, the whole log.
    response = await client.get(f"{job}/events?afterSeq=0&limit=1000", headers=auth())
    assert response.status == 200
    page = await check(response, EVENTS)
    assert {"export:queued", "export:started", "export:completed"} <= {
        e["type"] for e in page["events"]
    }
    response = await client.get(f"{job}/events?limit=0", headers=auth())
    assert response.status == 400
    await check(response, EVENTS)
    response = await client.get("/projects/demo/export/history?limit=1", headers=auth())
    assert response.status == 200
    await check(response, HISTORY)
    response = await client.get(f"{job}/verify", headers=auth())
    assert response.status == 200
    assert (await check(response, VERIFY))["ok"] is True
    response = await client.get(LOG, headers=auth(roles=("auditor",)))
    assert response.status == 200
    await check(response, LOG)
    response = await client.get(LOG, headers=auth())
    assert response.status == 403
    await check(response, LOG)

    # Refusals: 401, 403, 404, 400, 409.
    response = await client.get(f"{job}/status")
    assert response.status == 401
    await check(response, STATUS)
    response = await client.get(f"{job}/status", headers={"Authorization": "Bearer nonsense"})
    assert response.status == 401
    await check(response, STATUS)
    response = await client.get("/projects/demo/export/history", headers=auth(projects=("x",)))
    assert response.status == 403
    await check(response, HISTORY)
    response = await client.post(f"{job}/cancel", headers=auth(roles=("auditor",)))
    assert response.status == 403
    await check(response, CANCEL, "post")
    response = await client.get(f"/projects/demo/export/{uuid.uuid4()}/status", headers=auth())
    assert response.status == 404
    await check(response, STATUS)
    response = await client.get("/projects/demo/export/not-a-uuid/status", headers=auth())
    assert response.status == 400
    await check(response, STATUS)
    response = await client.post(f"{job}/cancel", headers=auth())
    assert response.status == 409
    assert (await check(response, CANCEL, "post"))["error"]["outcome"] == "completed"

    # Downloading: headers, a range, a conditional GET, an unsatisfiable range.
    response = await client.head(f"{job}/download", headers=auth())
    assert response.status == 200
    await check(response, DOWNLOAD, "head")
    etag = response.headers["ETag"]
    response = await client.get(f"{job}/download", headers={**auth(), "Range": "bytes=0-9"})
    assert response.status == 206
    assert len(await check(response, DOWNLOAD)) == 10
    response = await client.get(f"{job}/download", headers={**auth(), "If-None-Match": etag})
    assert response.status == 304
    await check(response, DOWNLOAD)
    response = await client.get(f"{job}/download", headers={**auth(), "Range": "bytes=-0"})
    assert response.status == 416
    await check(response, DOWNLOAD)

    # Operations.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        response = await client.get(path)
        assert response.status == 200, path
        await check(response, path)

    assert {
        (START, "post", 202),
        (STATUS, "get", 200),
        (EVENTS, "get", 200),
        (HISTORY, "get", 200),
        (STATUS, "get", 401),
        (HISTORY, "get", 403),
        (STATUS, "get", 404),
        (START, "post", 422),
    } <= api.seen


async def test_a_queued_export_cancels_as_documented(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    api = Conformance()
    response = await client.post("/projects/demo/export", headers=auth(), json={})
    accepted = await api.check(response, START, "post")
    job = f"/projects/demo/export/{accepted['jobId']}"

    response = await client.get(f"{job}/status", headers=auth())
    status = await api.check(response, STATUS)
    assert status["state"]["status"] == "queued"
    assert status["queuePosition"] is not None
    response = await client.get(f"{job}/download", headers=auth())
    assert response.status == 409
    await api.check(response, DOWNLOAD)

    response = await client.post(f"{job}/cancel", headers=auth())
    assert response.status == 202
    cancel = await api.check(response, CANCEL, "post")
    assert cancel["alreadyRequested"] is False
    response = await client.post(f"{job}/cancel", headers=auth())
    assert response.status == 409
    ended = await api.check(response, CANCEL, "post")
    assert ended["error"]["outcome"] == "cancelled"

    response = await client.get(f"{job}/events", headers=auth())
    page = await api.check(response, EVENTS)
    assert [e["type"] for e in page["events"]] == [
        "export:queued",
        "export:cancel-requested",
        "export:cancelled",
    ]
