"""Access control across both services: another user's project is closed to a token, over every
HTTP operation and every kind of gateway subscription; an auditor reads everything and changes
nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from schemas.asyncapi import ERROR_CODES
from services.export.openapi import build_openapi
from services.gateway.server import Gateway
from tests.export.conftest import Client, auth
from tests.security.conftest import answer_to, open_socket, until_pong
from tests.support import wait_for

DOC = build_openapi()
ALICE = ("alice", ("demo",))
MALLORY = ("mallory", ("other",))
CONSUMER = "alices-feed"


def _token(user: tuple[str, tuple[str, ...]], **kw: Any) -> str:
    return auth(*user, **kw)["Authorization"].removeprefix("Bearer ")


async def _alices_export(api: Client) -> str:
    response = await api.post("/projects/demo/export", headers=auth(*ALICE), json={})
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["jobId"]
    return job_id


async def _status(api: Client, job_id: str) -> str:
    response = await api.get(f"/projects/demo/export/{job_id}/status", headers=auth(*ALICE))
    assert response.status == 200
    status: str = (await response.json())["state"]["status"]
    return status


@dataclass(frozen=True)
class Attempt:
    method: str
    operation: str
    """The path of the operation in the OpenAPI document."""
    url: str
    status: int
    body: Any = None


def _attempts(job_id: str) -> list[Attempt]:
    """Mallory at every operation that takes a token, aimed at Alice's project and things."""
    base = "/projects/{project_id}/export"
    job = f"{base}/{{job_id}}"
    mine = f"/projects/demo/export/{job_id}"
    consumer = "/v1/consumers/{name}"
    return [
        Attempt("POST", base, "/projects/demo/export", 403, {}),
        Attempt("GET", f"{base}/history", "/projects/demo/export/history", 403),
        Attempt("GET", f"{job}/status", f"{mine}/status", 403),
        Attempt("POST", f"{job}/cancel", f"{mine}/cancel", 403),
        Attempt("GET", f"{job}/events", f"{mine}/events?afterSeq=0", 403),
        Attempt("GET", f"{job}/verify", f"{mine}/verify", 403),
        Attempt("GET", f"{job}/download", f"{mine}/download", 403),
        Attempt("HEAD", f"{job}/download", f"{mine}/download", 403),
        Attempt("GET", f"{job}/timeline", f"{mine}/timeline", 403),
        Attempt("GET", "/v1/events", "/v1/events?after=0", 403),
        Attempt("GET", "/v1/audit/events", "/v1/audit/events?project=demo", 403),
        Attempt("GET", "/v1/verify", "/v1/verify?from=1", 403),
        Attempt("GET", "/v1/stream", "/v1/stream?projectId=demo&after=0", 403),
        # A consumer is private to its creator: another user does not even see that it exists,
        # and cannot take its name.
        Attempt("PUT", consumer, f"/v1/consumers/{CONSUMER}", 409, {"projectId": "other"}),
        Attempt("GET", consumer, f"/v1/consumers/{CONSUMER}", 404),
        Attempt("DELETE", consumer, f"/v1/consumers/{CONSUMER}", 404),
        Attempt("POST", f"{consumer}/ack", f"/v1/consumers/{CONSUMER}/ack", 404, {"position": 1}),
    ]


def _protected_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in DOC["paths"].items()
        for method, operation in item.items()
        if operation.get("security") != []
    }


async def test_every_http_operation_refuses_another_users_project(api: Client) -> None:
    job_id = await _alices_export(api)
    response = await api.put(
        f"/v1/consumers/{CONSUMER}", headers=auth(*ALICE), json={"projectId": "demo"}
    )
    assert response.status == 201
    attempts = _attempts(job_id)
    # Every operation that takes a token is tried: a new route cannot be forgotten here.
    assert {(a.method, a.operation) for a in attempts} == _protected_operations()

    mallory = auth(*MALLORY)
    for attempt in attempts:
        response = await api.request(
            attempt.method, attempt.url, headers=mallory, json=attempt.body
        )
        where = f"{attempt.method} {attempt.url}"
        assert response.status == attempt.status, (where, await response.text())
        documented = DOC["paths"][attempt.operation][attempt.method.lower()]["responses"]
        assert str(attempt.status) in documented, where
        if attempt.method != "HEAD":
            error = (await response.json())["error"]
            assert error["code"], where
            assert error["message"], where
            assert "eventId" not in await response.text(), where

    # A job is reached only through its own project's path, even one the token may read.
    response = await api.get(f"/projects/other/export/{job_id}/status", headers=mallory)
    assert response.status == 404
    # Without a project filter, the history holds none of Alice's events.
    response = await api.get("/v1/audit/events", headers=mallory)
    assert response.status == 200
    assert (await response.json())["events"] == []
    # Nothing changed: the export is still queued, the consumer still Alice's and untouched.
    assert await _status(api, job_id) == "queued"
    response = await api.get(f"/v1/consumers/{CONSUMER}", headers=auth(*ALICE))
    consumer = await response.json()
    assert (consumer["projectId"], consumer["position"], consumer["acks"]) == ("demo", 0, 0)


async def test_every_subscription_refuses_another_users_project(
    api: Client, gateway: Gateway
) -> None:
    job_id = await _alices_export(api)
    ws = await open_socket(gateway, _token(MALLORY))
    async with ws:
        # Refusals with the codes the protocol documents (schemas.asyncapi.ERROR_CODES).
        subscribe = {"type": "subscribe", "jobId": job_id, "afterSeq": 0}
        error = await answer_to(ws, subscribe, {"error"})
        assert (error["code"], error["jobId"], error["request"]) == (
            "not_found",
            job_id,
            "subscribe",
        )
        error = await answer_to(ws, {"type": "subscribe", "projectId": "demo"}, {"error"})
        assert error["code"] == "forbidden"
        error = await answer_to(ws, {"type": "subscribe", "log": True}, {"error"})
        assert error["code"] == "forbidden"
        error = await answer_to(ws, {"type": "export:cancel", "jobId": job_id}, {"error"})
        assert (error["code"], error["request"]) == ("not_found", "export:cancel")
        assert {"not_found", "forbidden"} <= set(ERROR_CODES)
        assert await _status(api, job_id) == "queued"

        # Alice's export moves on: none of it reaches Mallory's connection.
        response = await api.post(f"/projects/demo/export/{job_id}/cancel", headers=auth(*ALICE))
        assert response.status == 202
        await wait_for(lambda: gateway.tailer.position >= 3)
        assert not [m for m in await until_pong(ws) if m["type"] != "heartbeat"]


async def test_an_auditor_reads_everything_and_cancels_nothing(
    api: Client, gateway: Gateway, pool: asyncpg.Pool
) -> None:
    job_id = await _alices_export(api)
    # Its token names the project too: being an auditor still forbids every change.
    auditor = auth("audra", ("demo",), roles=("auditor",))
    job = f"/projects/demo/export/{job_id}"
    for url in (
        "/v1/audit/events?project=demo",
        "/v1/verify?from=1",
        "/v1/events?after=0",
        f"{job}/timeline",
        f"{job}/status",
        f"{job}/events",
        "/projects/demo/export/history",
    ):
        response = await api.get(url, headers=auditor)
        assert response.status == 200, (url, await response.text())
    response = await api.get("/v1/audit/events?project=demo", headers=auditor)
    assert [e["jobId"] for e in (await response.json())["events"]] == [job_id]

    response = await api.post(f"{job}/cancel", headers=auditor)
    assert response.status == 403
    response = await api.post("/projects/demo/export", headers=auditor, json={})
    assert response.status == 403

    ws = await open_socket(gateway, _token(("audra", ("demo",)), roles=("auditor",)))
    async with ws:
        for stream in ({"log": True, "afterPosition": 0}, {"projectId": "demo"}, {"jobId": job_id}):
            sync = await answer_to(
                ws, {"type": "subscribe", **stream}, {"export:status-sync", "error"}
            )
            assert sync["type"] == "export:status-sync", sync
        # The cancel is forwarded as the auditor, and the export service refuses it.
        error = await answer_to(ws, {"type": "export:cancel", "jobId": job_id}, {"error"})
        assert (error["code"], error["jobId"], error["request"]) == (
            "forbidden",
            job_id,
            "export:cancel",
        )
    assert await _status(api, job_id) == "queued"
    # Its subscriptions are in the audit trail beside its HTTP reads.
    async with pool.acquire() as conn:
        methods = await conn.fetch(
            "SELECT method, count(*) FROM audit_reads WHERE auditor = 'audra' GROUP BY method"
        )
    assert dict(methods) == {"GET": 8, "SUBSCRIBE": 3}
