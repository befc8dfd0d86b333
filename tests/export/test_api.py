"""The export API end to end: start, watch, cancel and download exports over HTTP."""

from __future__ import annotations

import hashlib
import io
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.events import decode_event
from schemas.state import JobState, replay
from services.common.auth import issue_token
from tests.export.conftest import SECRET, Client, ClientFactory, auth
from tests.support import wait_for

BASE = "/projects/demo/export"


async def start(client: Client, project: str = "demo", **kw: Any) -> dict[str, Any]:
    response = await client.post(f"/projects/{project}/export", headers=auth(), **kw)
    assert response.status == 202, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def status(client: Client, job_id: str, project: str = "demo") -> dict[str, Any]:
    response = await client.get(f"/projects/{project}/export/{job_id}/status", headers=auth())
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def events(client: Client, job_id: str, project: str = "demo") -> list[Any]:
    found = []
    after = 0
    while True:
        response = await client.get(
            f"/projects/{project}/export/{job_id}/events?afterSeq={after}", headers=auth()
        )
        assert response.status == 200
        page = msgspec.json.decode(await response.read())
        found += [decode_event(msgspec.json.encode(e)) for e in page["events"]]
        after = page["nextCursor"]
        if not page["hasMore"]:
            return found


async def wait_status(
    client: Client, job_id: str, wanted: set[str], project: str = "demo", timeout: float = 30
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await status(client, job_id, project))
        return bool(seen["state"]["status"] in wanted)

    await wait_for(reached, timeout=timeout, interval=0.05)
    return seen


async def test_health_readiness_and_metrics_need_no_token(client: Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = await client.get(path)
        assert response.status == 200, path
    text = await (await client.get("/metrics")).text()
    assert 'route="/readyz"' in text
    assert "export_jobs_running" in text


async def test_an_export_runs_to_completion_and_matches_the_log(client: Client) -> None:
    accepted = await start(client)
    assert accepted["seq"] == 1
    job_id = accepted["jobId"]
    assert uuid.UUID(job_id).version == 7  # ids sort by creation (services/common/ids.py)
    body = await wait_status(client, job_id, {"completed", "failed"})
    assert body["state"]["status"] == "completed", body
    log = await events(client, job_id)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert {e.event_id.version for e in log} == {7}
    assert msgspec.convert(body["state"], JobState) == replay(log)
    types = [e.type for e in log]
    assert types[:2] == ["export:queued", "export:started"]
    assert types[-1] == "export:completed"
    reports = [e.data for e in log if e.type == "export:progress"]
    overall = [p.progress for p in reports]
    assert overall == sorted(overall)
    # Throttled to one report per 250 ms, but the last one before the outcome is the truth.
    assert (overall[-1], reports[-1].phase_progress) == (90.0, 100.0)


async def test_download_serves_ranges_and_reports_the_second_phase(client: Client) -> None:
    job_id = (await start(client))["jobId"]
    state = (await wait_status(client, job_id, {"completed", "failed"}))["state"]
    url = f"{BASE}/{job_id}/download"
    whole = await client.get(url, headers=auth())
    assert whole.status == 200
    archive = await whole.read()
    assert whole.headers["ETag"] == f'"{state["archive"]["sha256"]}"'
    assert hashlib.sha256(archive).hexdigest() == state["archive"]["sha256"]
    assert len(archive) == state["archive"]["sizeBytes"]
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert "README.md" in names

    # A broken download resumes where it stopped.
    half = len(archive) // 2
    first = await client.get(url, headers={**auth(), "Range": f"bytes=0-{half - 1}"})
    assert first.status == 206
    rest = await client.get(
        url, headers={**auth(), "Range": f"bytes={half}-", "If-Range": whole.headers["ETag"]}
    )
    assert rest.status == 206
    assert rest.headers["Content-Range"] == f"bytes {half}-{len(archive) - 1}/{len(archive)}"
    assert await first.read() + await rest.read() == archive
    bad = await client.get(url, headers={**auth(), "Range": f"bytes={len(archive) + 5}-"})
    assert bad.status == 416
    assert bad.headers["Content-Range"] == f"bytes */{len(archive)}"
    cached = await client.get(url, headers={**auth(), "If-None-Match": whole.headers["ETag"]})
    assert cached.status == 304

    final = await status(client, job_id)
    assert final["state"]["phase"] == "downloading"
    assert final["state"]["progress"] == 100.0
    types = [e.type for e in await events(client, job_id)]
    assert types.count("export:download-started") == 3
    assert types.count("export:download-completed") == 2  # the whole file and the resumed rest


async def test_download_before_completion_is_a_conflict(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    job_id = (await start(client))["jobId"]
    response = await client.get(f"{BASE}/{job_id}/download", headers=auth())
    assert response.status == 409
    assert (await response.json())["error"]["message"]


async def test_an_idempotency_key_returns_the_same_job(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    key = {"Idempotency-Key": "retry-me-1"}
    body = {"annotationFormats": ["coco", "yolo"]}
    first = await client.post(BASE, headers={**auth(), **key}, json=body)
    second = await client.post(BASE, headers={**auth(), **key}, json=body)
    assert first.status == second.status == 202
    assert (await first.json())["jobId"] == (await second.json())["jobId"]
    other = await client.post(BASE, headers={**auth(), **key}, json={"annotationFormats": []})
    assert other.status == 422
    history = await (await client.get(f"{BASE}/history", headers=auth())).json()
    assert len(history["jobs"]) == 1


async def test_cancel_stops_a_running_export_and_leaves_no_archive(
    client: Client, export_config: Any
) -> None:
    job_id = (await start(client, "big"))["jobId"]
    await wait_for(lambda: _progress_past(client, job_id, "big", 5.0), timeout=30, interval=0.05)
    requested = time.monotonic()
    response = await client.post(f"/projects/big/export/{job_id}/cancel", headers=auth())
    assert response.status == 202
    cancel_seq = (await response.json())["seq"]
    body = await wait_status(client, job_id, {"cancelled", "completed", "failed"}, "big")
    took = time.monotonic() - requested
    assert body["state"]["status"] == "cancelled", body
    assert body["state"]["cancellation"]["cleanupCompleted"] is True
    assert body["state"]["cancellation"]["requestedBy"] == "alice"
    assert body["state"]["cancellation"]["cancelledBy"] == "user"
    log = await events(client, job_id, "big")
    assert log[cancel_seq - 1].type == "export:cancel-requested"
    assert log[-1].type == "export:cancelled"
    assert "export:completed" not in [e.type for e in log]
    assert took < 5.0
    assert not (Path(export_config.archive_root) / job_id).exists()
    assert not (Path(export_config.work_root) / job_id).exists()
    again = await client.post(f"/projects/big/export/{job_id}/cancel", headers=auth())
    assert again.status == 409
    assert (await again.json())["error"]["outcome"] == "cancelled"


async def _progress_past(client: Client, job_id: str, project: str, value: float) -> bool:
    state = (await status(client, job_id, project))["state"]
    return bool(
        state["progress"] >= value or (state["status"] != "running" and state["status"] != "queued")
    )


async def test_cancelling_a_queued_export_ends_it_at_once(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    job_id = (await start(client))["jobId"]
    response = await client.post(f"{BASE}/{job_id}/cancel", headers=auth())
    assert response.status == 202
    body = await status(client, job_id)
    assert body["state"]["status"] == "cancelled"
    assert [e.type for e in await events(client, job_id)] == [
        "export:queued",
        "export:cancel-requested",
        "export:cancelled",
    ]


async def test_cancel_after_completion_answers_409_with_the_outcome(client: Client) -> None:
    job_id = (await start(client))["jobId"]
    await wait_status(client, job_id, {"completed"})
    response = await client.post(f"{BASE}/{job_id}/cancel", headers=auth())
    assert response.status == 409
    body = await response.json()
    assert body["error"]["outcome"] == "completed"


async def test_history_is_newest_first_in_cursor_pages(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    started = [(await start(client))["jobId"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        page = await (await client.get(f"{BASE}/history{query}", headers=auth())).json()
        seen += [job["jobId"] for job in page["jobs"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == list(reversed(started))
    bad = await client.get(f"{BASE}/history?cursor=nonsense", headers=auth())
    assert bad.status == 400


async def test_queued_jobs_report_their_place(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    jobs = [(await start(client))["jobId"] for _ in range(3)]
    places = [(await status(client, job))["queuePosition"] for job in jobs]
    assert places == [0, 1, 2]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": "Basic abc"}, "Bearer"),
        ({"Authorization": "Bearer not.a.token"}, "invalid"),
        (
            {"Authorization": "Bearer " + issue_token(SECRET, "alice", projects=["demo"], ttl=-60)},
            "expired",
        ),
        (
            {
                "Authorization": "Bearer "
                + issue_token("another-secret-entirely-long-enough", "a", projects=["demo"])
            },
            "invalid",
        ),
    ],
)
async def test_bad_tokens_are_refused_with_a_reason(
    client: Client, headers: dict[str, str], reason: str
) -> None:
    response = await client.get(f"{BASE}/history", headers=headers)
    assert response.status == 401
    assert reason in (await response.json())["error"]["message"]


async def test_a_user_reaches_only_their_projects(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    job_id = (await start(client))["jobId"]
    mallory = auth("mallory", ("other",))
    for method, path in [
        ("GET", f"{BASE}/{job_id}/status"),
        ("GET", f"{BASE}/{job_id}/events"),
        ("GET", f"{BASE}/{job_id}/download"),
        ("GET", f"{BASE}/history"),
        ("POST", f"{BASE}/{job_id}/cancel"),
        ("POST", BASE),
    ]:
        response = await client.request(method, path, headers=mallory)
        assert response.status == 403, (method, path)
    # The job is not visible through another project's path either.
    response = await client.get(f"/projects/other/export/{job_id}/status", headers=mallory)
    assert response.status == 404
    # An auditor reads every project but changes nothing.
    auditor = auth("audrey", (), roles=("auditor",))
    assert (await client.get(f"{BASE}/{job_id}/status", headers=auditor)).status == 200
    assert (await client.post(f"{BASE}/{job_id}/cancel", headers=auditor)).status == 403
    assert (await client.get("/v1/events", headers=auditor)).status == 200
    assert (await client.get("/v1/events", headers=auth())).status == 403


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/projects/secret/export", None, 403),
        ("POST", BASE, b"{not json", 400),
        ("POST", BASE, b'{"annotationFormats": ["pdf"]}', 422),
        (
            "POST",
            BASE,
            b'{"includeOriginalImages": false, "includeVisualizations": false,'
            b' "annotationFormats": [], "metricsFormats": []}',
            422,
        ),
        ("POST", BASE, b'{"annotationFormats": 5}', 422),
        ("GET", f"{BASE}/not-a-uuid/status", None, 400),
        ("GET", f"{BASE}/{uuid.uuid4()}/status", None, 404),
        ("GET", f"{BASE}/{uuid.uuid4()}/events?afterSeq=-1", None, 404),
        ("GET", "/projects/..%2F..%2Fetc/export/history", None, 400),
        ("GET", f"{BASE}/history?limit=0", None, 400),
    ],
)
async def test_bad_requests_get_a_json_reason(
    make_client: ClientFactory, method: str, path: str, body: bytes | None, status: int
) -> None:
    client = await make_client(workers=0)
    response = await client.request(
        method,
        path,
        headers={**auth(projects=("demo", "big", "nope")), "Content-Type": "application/json"},
        data=body,
    )
    assert response.status == status, await response.text()
    error = (await response.json())["error"]
    assert error["code"]
    assert error["message"]


async def test_an_unknown_project_folder_is_404(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    response = await client.post("/projects/ghost/export", headers=auth(projects=("ghost",)))
    assert response.status == 404
