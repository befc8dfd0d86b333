"""The export service's HTTP API over a real socket and a real database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from schemas.events import decode_event
from schemas.state import JobState, replay
from services.common.eventlog import EventLog
from services.export.app import EVENTLOG, create_app
from services.export.config import ExportConfig
from tests.support import completed, new_job, progress


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = create_app(ExportConfig(database_url=database_url, port=0, pool_min=1, pool_max=4))
    async with TestClient(TestServer(app)) as client:
        yield client


def log_of(client: TestClient[web.Request, web.Application]) -> EventLog:
    app = client.app
    assert app is not None
    return app[EVENTLOG]


async def test_health_readiness_and_metrics(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["status"] == "ready"
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert 'http_requests_total{method="GET",route="/readyz",service="export",status="200"}' in text
    assert "db_pool_connections" in text


async def test_status_is_the_fold_of_the_log(
    client: TestClient[web.Request, web.Application],
) -> None:
    eventlog = log_of(client)
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(40), progress(30), completed()])
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status == 200
    body = await response.read()
    status = msgspec.json.decode(body)
    state = msgspec.convert(status["state"], JobState)
    assert status["seq"] == 5
    assert state == replay(await eventlog.read_stream(job_id))
    assert state.status == "completed"
    assert status["state"]["progress"] == 90.0  # camelCase on the wire, monotonic progress


async def test_events_are_paged_in_seq_order(
    client: TestClient[web.Request, web.Application],
) -> None:
    eventlog = log_of(client)
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(i) for i in range(1, 6)])
    seqs: list[int] = []
    after = 0
    while True:
        response = await client.get(f"/v1/jobs/{job_id}/events?afterSeq={after}&limit=3")
        assert response.status == 200
        page = msgspec.json.decode(await response.read())
        seqs += [decode_event(msgspec.json.encode(e)).seq for e in page["events"]]
        after = page["nextCursor"]
        if not page["hasMore"]:
            break
    assert seqs == list(range(1, 8))
    first = msgspec.json.decode(await (await client.get(f"/v1/jobs/{job_id}/events")).read())
    envelope = first["events"][0]
    assert set(envelope) == {
        "jobId", "projectId", "seq", "position", "eventId", "type", "occurredAt", "actor", "data",
    }  # fmt: skip
    assert envelope["type"] == "export:queued"


async def test_the_whole_log_is_paged_by_position(
    client: TestClient[web.Request, web.Application],
) -> None:
    eventlog = log_of(client)
    jobs = [await new_job(eventlog) for _ in range(3)]
    positions: list[int] = []
    after = 0
    for _ in range(10):
        page = msgspec.json.decode(
            await (await client.get(f"/v1/events?after={after}&limit=4")).read()
        )
        positions += [e["position"] for e in page["events"]]
        after = page["nextCursor"]
        if not page["hasMore"]:
            break
    assert len(positions) == 2 * len(jobs)
    assert positions == sorted(positions)


async def test_verify_reports_an_intact_chain(
    client: TestClient[web.Request, web.Application],
) -> None:
    job_id = await new_job(log_of(client))
    report = await (await client.get(f"/v1/jobs/{job_id}/verify")).json()
    assert report["ok"] is True
    assert report["eventsChecked"] == 2


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/jobs/not-a-uuid", 400, "bad_request"),
        (f"/v1/jobs/{uuid.uuid4()}", 404, "not_found"),
        (f"/v1/jobs/{uuid.uuid4()}/events", 404, "not_found"),
        (f"/v1/jobs/{uuid.uuid4()}/verify", 404, "not_found"),
        (f"/v1/jobs/{uuid.UUID(int=1)}/events?afterSeq=-1", 400, "bad_request"),
        (f"/v1/jobs/{uuid.UUID(int=1)}/events?limit=abc", 400, "bad_request"),
        ("/v1/events?limit=100000", 400, "bad_request"),
        ("/no/such/path", 404, "not_found"),
    ],
)
async def test_bad_requests_get_a_json_reason(
    client: TestClient[web.Request, web.Application], path: str, status: int, code: str
) -> None:
    response = await client.get(path)
    assert response.status == status
    body = await response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
