"""Auditors over HTTP: history queries across jobs, formats, timelines, and the audit trail."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import structlog

from schemas.chain import ChainLink, event_hash
from schemas.events import (
    ArchiveInfo,
    Completed,
    EventData,
    Failed,
    Message,
    Progress,
    Queued,
    Started,
)
from services.common import audit
from services.common.audit import CSV_COLUMNS, EventQuery
from services.common.eventlog import EventLog, NewEvent
from tests.export.conftest import Client, ClientFactory, auth
from tests.export.test_openapi import Conformance
from tests.support import wait_for

EVENTS = "/v1/audit/events"
TIMELINE = "/projects/{project_id}/export/{job_id}/timeline"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AUDITOR = ("audra", ())
TRICKY_ACTOR = 'user:o"brien, jr\nthe second'


def auditor() -> dict[str, str]:
    return auth(*AUDITOR, roles=("auditor",))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new(data: EventData, actor: str, seconds: float) -> NewEvent:
    return NewEvent(data=data, actor=actor, occurred_at=at(seconds))


def step(value: float, text: str = "") -> Progress:
    return Progress(
        phase="processing",
        stage="images",
        progress=value,
        phase_progress=value,
        message=Message(key="export.images", text=text) if text else None,
    )


@dataclass
class Job:
    job_id: uuid.UUID
    project: str
    owner: str


async def seed(log: EventLog) -> list[Job]:
    """Three projects, five jobs, their events interleaved in the log and spread over time."""
    jobs = [
        Job(uuid.uuid4(), "demo", "alice"),
        Job(uuid.uuid4(), "other", "bob"),
        Job(uuid.uuid4(), "big", "carol"),
        Job(uuid.uuid4(), "demo", "dave"),
        Job(uuid.uuid4(), "other", "bob"),
    ]
    seqs = dict.fromkeys((job.job_id for job in jobs), 0)
    clock = 0.0

    async def add(job: Job, *datas: EventData, actor: str | None = None) -> None:
        nonlocal clock
        events = []
        for data in datas:
            clock += 1.5
            events.append(new(data, actor or f"user:{job.owner}", clock))
        await log.append(
            job.job_id, seqs[job.job_id], events, project_id=job.project, owner_id=job.owner
        )
        seqs[job.job_id] += len(datas)

    for job in jobs:
        await add(job, Queued(requested_by=job.owner))
    for job in jobs:
        await add(job, Started(worker_id="w1"), actor="worker:w1")
    await add(jobs[0], step(10, 'copying "a", then b'), step(20), actor="worker:w1")
    await add(jobs[1], Failed(code="disk_full"), actor="worker:w2")
    await add(jobs[2], step(50), actor=TRICKY_ACTOR)
    await add(jobs[3], step(5), step(6), step(7), actor="worker:w2")
    archive = ArchiveInfo(file_name="e.zip", size_bytes=1, sha256="00" * 32)
    await add(jobs[0], Completed(archive=archive), actor="worker:w1")
    await add(jobs[4], Failed(code="worker_lost", retryable=True), actor="worker:w1")
    await add(jobs[3], step(8), actor="worker:w2")
    return jobs


async def stored(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return list(await conn.fetch("SELECT * FROM events ORDER BY position"))


async def pages(
    client: Client, params: list[tuple[str, str]], headers: dict[str, str], limit: int = 3
) -> list[dict[str, Any]]:
    """Every event of a query, following `nextCursor` while `hasMore`."""
    found: list[dict[str, Any]] = []
    after = 0
    for _ in range(100):
        response = await client.get(
            EVENTS,
            params=[*params, ("after", str(after)), ("limit", str(limit))],
            headers=headers,
        )
        assert response.status == 200, await response.text()
        page = await response.json()
        assert len(page["events"]) <= limit
        found += page["events"]
        if page["events"]:
            assert page["nextCursor"] == page["events"][-1]["position"]
        after = page["nextCursor"]
        if not page["hasMore"]:
            return found
    raise AssertionError("the pages never ended")


Predicate = Callable[[asyncpg.Record], bool]


def scenarios(jobs: list[Job]) -> list[tuple[list[tuple[str, str]], Predicate]]:
    """Query parameters and the rows they must select, checked against the stored log."""
    one, two = jobs[0].job_id, jobs[3].job_id
    return [
        ([], lambda r: True),
        ([("project", "demo")], lambda r: r["project_id"] == "demo"),
        (
            [("project", "demo"), ("project", "other")],
            lambda r: r["project_id"] in ("demo", "other"),
        ),
        ([("job", str(one))], lambda r: r["job_id"] == one),
        ([("job", str(one)), ("job", str(two))], lambda r: r["job_id"] in (one, two)),
        ([("type", "export:failed")], lambda r: r["type"] == "export:failed"),
        (
            [("type", "export:failed"), ("type", "export:completed")],
            lambda r: r["type"] in ("export:failed", "export:completed"),
        ),
        ([("actor", "worker:w2")], lambda r: r["actor"] == "worker:w2"),
        (
            [("actor", "worker:w2"), ("actor", TRICKY_ACTOR)],
            lambda r: r["actor"] in ("worker:w2", TRICKY_ACTOR),
        ),
        (
            [("occurredFrom", "2026-03-01T12:00:10Z"), ("occurredTo", "2026-03-01T13:00:19+01:00")],
            lambda r: at(10) <= r["occurred_at"] < at(19),
        ),
        ([("fromPosition", "4"), ("toPosition", "11")], lambda r: 4 <= r["position"] <= 11),
        (
            [
                ("project", "demo"),
                ("project", "big"),
                ("type", "export:progress"),
                ("actor", "worker:w2"),
                ("actor", "worker:w1"),
                ("occurredFrom", "2026-03-01T12:00:05.5Z"),
            ],
            lambda r: (
                r["project_id"] in ("demo", "big")
                and r["type"] == "export:progress"
                and r["actor"] in ("worker:w1", "worker:w2")
                and r["occurred_at"] >= at(5.5)
            ),
        ),
        (
            [("job", str(one)), ("job", str(jobs[1].job_id)), ("type", "export:started")],
            lambda r: r["job_id"] in (one, jobs[1].job_id) and r["type"] == "export:started",
        ),
    ]


async def test_an_auditor_queries_every_project_with_filters_in_cursor_pages(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    client = await make_client(workers=0)
    jobs = await seed(eventlog)
    rows = await stored(pool)
    assert {r["project_id"] for r in rows} == {"demo", "other", "big"}
    for params, wanted in scenarios(jobs):
        found = await pages(client, params, auditor())
        expected = [r["position"] for r in rows if wanted(r)]
        assert expected, params
        assert [e["position"] for e in found] == expected, params

    # An offset whose '+' was not percent-encoded arrives as a space, and still counts.
    response = await client.get(
        EVENTS + "?occurredTo=2026-03-01T13:00:03+01:00&limit=1000", headers=auditor()
    )
    assert response.status == 200, await response.text()
    early = [e["position"] for e in (await response.json())["events"]]
    assert early == [r["position"] for r in rows if r["occurred_at"] < at(3)] == [1]

    # Each event is the stored one, with its chain link.
    found = await pages(client, [("job", str(jobs[0].job_id))], auditor(), limit=1000)
    first = rows[[r["job_id"] for r in rows].index(jobs[0].job_id)]
    assert found[0] == {
        "jobId": str(first["job_id"]),
        "projectId": "demo",
        "seq": 1,
        "position": first["position"],
        "eventId": str(first["event_id"]),
        "type": "export:queued",
        "occurredAt": "2026-03-01T12:00:01.500000Z",
        "actor": "user:alice",
        "data": json.loads(first["data"]),
        "ownerId": "alice",
        "recordedAt": audit.rfc3339(first["recorded_at"]),
        "prevHash": "00" * 32,
        "hash": bytes(first["hash"]).hex(),
    }


async def test_a_user_reads_only_the_projects_of_the_token(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    client = await make_client(workers=0)
    jobs = await seed(eventlog)
    rows = await stored(pool)
    user = auth("alice", ("demo", "big"))
    mine = [r["position"] for r in rows if r["project_id"] in ("demo", "big")]

    assert [e["position"] for e in await pages(client, [], user)] == mine
    failed = await pages(client, [("type", "export:failed")], user)
    assert failed == []  # both failures are in "other"
    # A job of another project: nothing, not even that it exists.
    assert await pages(client, [("job", str(jobs[1].job_id))], user) == []
    mixed = [("job", str(jobs[1].job_id)), ("job", str(jobs[0].job_id))]
    assert {e["jobId"] for e in await pages(client, mixed, user)} == {str(jobs[0].job_id)}

    for params in ([("project", "other")], [("project", "demo"), ("project", "other")]):
        response = await client.get(EVENTS, params=params, headers=user)
        assert response.status == 403
        body = await response.json()
        assert body["error"]["code"] == "forbidden"
        assert "'other'" in body["error"]["message"]
    response = await client.get(EVENTS, params={"format": "ndjson"}, headers=user)
    lines = (await response.text()).splitlines()
    assert [json.loads(line)["position"] for line in lines] == mine
    response = await client.get(EVENTS, params={"format": "csv"}, headers=user)
    records = list(csv.DictReader(io.StringIO(await response.text(), newline="")))
    assert [int(r["position"]) for r in records] == mine
    assert {r["projectId"] for r in records} == {"demo", "big"}

    # A token for every project, and a service, read everything.
    everything = [r["position"] for r in rows]
    assert [e["position"] for e in await pages(client, [], auth("x", ("*",)))] == everything
    service = auth("indexer", (), roles=("service",))
    assert [e["position"] for e in await pages(client, [], service)] == everything
    # A token with no project reads nothing.
    assert await pages(client, [], auth("nobody", ())) == []


@pytest.mark.parametrize(
    ("params", "status", "named"),
    [
        ({"occurredFrom": "yesterday"}, 400, "occurredFrom"),
        ({"occurredTo": "2026-03-01T12:00:00"}, 400, "occurredTo"),
        ({"occurredFrom": "2026-03-02T00:00:00Z", "occurredTo": "2026-03-01T00:00:00Z"}, 422,
         "occurredFrom"),
        ({"job": "not-a-uuid"}, 400, "job"),
        ({"project": ".hidden"}, 400, "project"),
        ({"type": "failed"}, 400, "type"),
        ({"actor": "x" * 201}, 400, "actor"),
        ({"fromPosition": "0"}, 400, "fromPosition"),
        ({"toPosition": "ten"}, 400, "toPosition"),
        ({"fromPosition": "9", "toPosition": "3"}, 422, "fromPosition"),
        ({"after": "-1"}, 400, "after"),
        ({"limit": "0"}, 400, "limit"),
        ({"limit": "1001"}, 400, "limit"),
        ({"format": "xml"}, 400, "format"),
        ({"projectId": "demo"}, 400, "projectId"),
        ([("after", "1"), ("after", "2")], 400, "after"),
    ],
)  # fmt: skip
async def test_bad_filters_are_refused_with_a_reason_naming_the_parameter(
    make_client: ClientFactory, params: Any, status: int, named: str
) -> None:
    client = await make_client(workers=0)
    api = Conformance()
    response = await client.get(EVENTS, params=params, headers=auditor())
    assert response.status == status, await response.text()
    body = await api.check(response, EVENTS)
    assert body["error"]["code"] == ("bad_request" if status == 400 else "invalid")
    assert named in body["error"]["message"]


async def test_the_routes_need_a_token(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    api = Conformance()
    job = TIMELINE.format(project_id="demo", job_id=uuid.uuid4())
    for url, path in ((EVENTS, EVENTS), (job, TIMELINE), ("/v1/verify", "/v1/verify")):
        response = await client.get(url)
        assert response.status == 401
        await api.check(response, path)


async def test_ndjson_and_csv_stream_the_same_events_as_the_pages(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    client = await make_client(workers=0)
    await seed(eventlog)
    head = (await stored(pool))[-1]["position"]
    api = Conformance()
    params = [("project", "demo"), ("project", "big")]
    paged = await pages(client, params, auditor())

    for how in ({"Accept": "application/x-ndjson"}, {"format": "ndjson"}):
        query = [*params, *[(k, v) for k, v in how.items() if k == "format"]]
        headers = {**auditor(), **{k: v for k, v in how.items() if k == "Accept"}}
        response = await client.get(EVENTS, params=query, headers=headers)
        assert response.status == 200
        assert response.headers["X-Log-Head"] == str(head)
        assert "Content-Length" not in response.headers  # streamed, chunked
        body = await api.check(response, EVENTS)
        assert response.content_type == "application/x-ndjson"
        lines = body.decode().splitlines()
        assert [json.loads(line) for line in lines] == paged

    for how in ({"Accept": "text/csv;q=0.9, application/json;q=0.5"}, {"format": "csv"}):
        query = [*params, *[(k, v) for k, v in how.items() if k == "format"]]
        headers = {**auditor(), **{k: v for k, v in how.items() if k == "Accept"}}
        response = await client.get(EVENTS, params=query, headers=headers)
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
        body = await api.check(response, EVENTS)
        records = list(csv.reader(io.StringIO(body.decode(), newline="")))
        assert tuple(records[0]) == CSV_COLUMNS
        assert len(records) == len(paged) + 1
        for record, event in zip(records[1:], paged, strict=True):
            row = dict(zip(CSV_COLUMNS, record, strict=True))
            assert json.loads(row.pop("data")) == event["data"]
            assert row == {key: str(event[key]) for key in row}
            # Everything the chain covers is in the row: an auditor can check it offline.
            link = ChainLink(
                job_id=uuid.UUID(row["jobId"]),
                seq=int(row["seq"]),
                event_id=uuid.UUID(row["eventId"]),
                type=row["type"],
                actor=row["actor"],
                project_id=row["projectId"],
                owner_id=row["ownerId"],
                occurred_at=datetime.fromisoformat(row["occurredAt"]),
                data=record[CSV_COLUMNS.index("data")],
                prev_hash=bytes.fromhex(row["prevHash"]),
                hash=bytes.fromhex(row["hash"]),
            )
            assert event_hash(link.prev_hash, link).hex() == row["hash"]
        assert TRICKY_ACTOR in {dict(zip(CSV_COLUMNS, r, strict=True))["actor"] for r in records}

    # An Accept the service has no other answer for gets JSON.
    response = await client.get(EVENTS, headers={**auditor(), "Accept": "text/html"})
    assert response.content_type == "application/json"
    assert {"events", "nextCursor", "hasMore"} <= set(await api.check(response, EVENTS))


async def test_an_empty_result_streams_a_header_only(make_client: ClientFactory) -> None:
    client = await make_client(workers=0)
    response = await client.get(EVENTS, params={"format": "csv"}, headers=auditor())
    assert response.status == 200
    assert response.headers["X-Log-Head"] == "0"
    assert (await response.text()).splitlines() == [",".join(CSV_COLUMNS)]
    response = await client.get(EVENTS, params={"format": "ndjson"}, headers=auditor())
    assert await response.read() == b""


async def big_log(log: EventLog, events: int, per_job: int = 1000) -> None:
    """`events` events in jobs of `per_job`, each progress event with a message of some size."""
    for _ in range(events // per_job):
        job_id = uuid.uuid4()
        await log.append(
            job_id, 0, [new(Queued(requested_by="alice"), "user:alice", 0)],
            project_id="big", owner_id="alice",
        )  # fmt: skip
        batch = [
            new(step(i / per_job * 90, f"Copying image_{i:05d}.jpg, of many"), "worker:w1", i)
            for i in range(1, per_job)
        ]
        await log.append(job_id, 1, batch)


async def test_a_large_result_streams_in_pages_with_bounded_memory(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    total = 20_000
    await big_log(eventlog, total)

    # The stream is read a page at a time from the database, never in one fetch.
    sizes = [
        len(rows)
        async for rows in audit.pages(
            pool, EventQuery(projects=("big",)), upto=total, page_size=500
        )
    ]
    assert sizes == [500] * 40

    client = await make_client(workers=0, audit_page_size=250)
    received = 0
    lines = 0
    last = 0
    tail = b""
    tracemalloc.start()
    try:
        response = await client.get(EVENTS, params={"format": "ndjson"}, headers=auditor())
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding") == "chunked"
        async for chunk in response.content.iter_chunked(1 << 16):
            received += len(chunk)
            *complete, tail = (tail + chunk).split(b"\n")
            for line in complete:
                position = json.loads(line)["position"]
                assert position > last
                last = position
                lines += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (lines, tail, last) == (total, b"", total)
    # Client and server share this process: together they held a small part of the answer.
    assert received > 8_000_000
    assert peak < received / 4, (peak, received)


async def test_pages_walk_an_index_in_position_order(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    await big_log(eventlog, 4000, per_job=200)
    await seed(eventlog)
    async with pool.acquire() as conn:
        await conn.execute("ANALYZE events")
        job_id = await conn.fetchval("SELECT job_id FROM events WHERE project_id = 'demo'")
        cases = [
            (EventQuery(jobs=(job_id,)), "events_job_position"),
            (EventQuery(jobs=(job_id, uuid.uuid4())), "events_job_position"),
            (EventQuery(projects=("demo", "other")), "events_project_position"),
            (EventQuery(within=frozenset({"demo"})), "events_project_position"),
            (EventQuery(actors=("worker:w2",)), "events_actor_position"),
            (EventQuery(types=("export:failed",)), "events_type_position_sparse"),
            (
                EventQuery(types=("export:failed", "export:completed")),
                "events_type_position_sparse",
            ),
            # Progress events are most of the log and not in the type index (migration 0010).
            (EventQuery(types=("export:progress",)), "events_pkey"),
            (EventQuery(types=("export:progress", "export:failed")), "events_pkey"),
            (EventQuery(), "events_pkey"),
            (EventQuery(occurred_from=at(100)), "events_pkey"),
        ]
        for query, index in cases:
            built = audit.page_sql(query, 1000, 100)
            assert built is not None
            sql, args = built
            plan = "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + sql, *args))
            # An index walked in order, or (for a handful of rows) read through a bitmap.
            assert f"Index Scan using {index} " in plan or f"Index Scan on {index} " in plan, plan
            assert "Seq Scan" not in plan, (query, plan)

        # The driver keeps each statement prepared, and PostgreSQL may then settle on a generic
        # plan, made without the values, which walked the primary key through the rest of the
        # log for a job, a project or an actor. Forced here, the generic plans PostgreSQL makes
        # for the pages (debug_print_plan prints each as it is made) scan the index above.
        oids = {
            row["relname"]: row["oid"]
            for row in await conn.fetch(
                "SELECT c.relname, c.oid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid"
                " WHERE i.indrelid = 'events'::regclass"
            )
        }
        plans: list[str] = []

        def listen(_conn: asyncpg.Connection, message: asyncpg.PostgresLogMessage) -> None:
            plans.append(f"{message.message} {message.detail or ''}")

        await conn.execute(
            "SET plan_cache_mode = force_generic_plan; SET debug_print_plan = on;"
            " SET client_min_messages = log"
        )
        conn.add_log_listener(listen)
        try:
            planned: set[str] = set()
            for query, index in cases:
                built = audit.page_sql(query, 1000, 100)
                assert built is not None
                if built[0] in planned:
                    continue  # the same statement: its plan, made once, was checked
                planned.add(built[0])
                plans.clear()
                await audit.fetch_page(conn, query, 1000, 100)
                scanned = {
                    int(oid) for plan in plans for oid in re.findall(r":indexid (\d+)", plan)
                }
                assert oids[index] in scanned, (query, index, scanned)
                if index != "events_pkey":
                    assert oids["events_pkey"] not in scanned, (query, scanned)
        finally:
            conn.remove_log_listener(listen)
            await conn.execute(
                "RESET plan_cache_mode; RESET debug_print_plan; RESET client_min_messages"
            )


async def test_a_timeline_gives_the_time_between_events(
    make_client: ClientFactory, eventlog: EventLog
) -> None:
    client = await make_client(workers=0)
    api = Conformance()
    offsets = [0.0, 2.5, 2.75, 10.0, 9.5, 70.000001]  # a clock that went back once
    datas: list[EventData] = [Queued(requested_by="alice"), Started(worker_id="w1")]
    datas += [step(v) for v in (10, 20, 30, 40)]
    job_id = uuid.uuid4()
    await eventlog.append(
        job_id,
        0,
        [new(d, "user:alice", s + 100) for d, s in zip(datas, offsets, strict=True)],
        project_id="demo",
        owner_id="alice",
    )
    url = TIMELINE.format(project_id="demo", job_id=job_id)

    response = await client.get(url, headers=auth("bob", ("demo",)))
    body = await api.check(response, TIMELINE)
    assert (body["jobId"], body["ownerId"], body["status"]) == (str(job_id), "alice", "running")
    assert body["firstOccurredAt"] == "2026-03-01T12:01:40Z"
    assert [e["event"]["seq"] for e in body["entries"]] == [1, 2, 3, 4, 5, 6]
    assert [e["sinceFirst"] for e in body["entries"]] == offsets
    assert [e["sincePrevious"] for e in body["entries"]] == [None, 2.5, 0.25, 7.25, -0.5, 60.500001]
    assert body["hasMore"] is False

    # In pages: each page's first interval is still from the event before it.
    response = await client.get(url, params={"afterSeq": 3, "limit": 2}, headers=auth())
    page = await api.check(response, TIMELINE)
    assert [e["event"]["seq"] for e in page["entries"]] == [4, 5]
    assert [e["sincePrevious"] for e in page["entries"]] == [7.25, -0.5]
    assert (page["nextCursor"], page["hasMore"]) == (5, True)
    response = await client.get(url, params={"afterSeq": 5, "limit": 2}, headers=auth())
    page = await api.check(response, TIMELINE)
    assert [(e["event"]["seq"], e["sincePrevious"]) for e in page["entries"]] == [(6, 60.500001)]
    assert (page["nextCursor"], page["hasMore"]) == (6, False)

    # The owner, even without the project in the token; auditors; nobody else.
    assert (await client.get(url, headers=auth("alice", ()))).status == 200
    assert (await client.get(url, headers=auditor())).status == 200
    response = await client.get(url, headers=auth("mallory", ("other",)))
    assert response.status == 403
    await api.check(response, TIMELINE)
    # A job of another project, or none, is 404 to a member and 403 to an outsider.
    elsewhere = TIMELINE.format(project_id="other", job_id=job_id)
    assert (await client.get(elsewhere, headers=auth("mallory", ("other",)))).status == 404
    assert (await client.get(elsewhere, headers=auth("alice", ()))).status == 403
    response = await client.get(
        TIMELINE.format(project_id="demo", job_id=uuid.uuid4()), headers=auth()
    )
    assert response.status == 404
    await api.check(response, TIMELINE)
    for bad in ({"afterSeq": "-1"}, {"limit": "0"}, {"since": "1"}):
        response = await client.get(url, params=bad, headers=auth())
        assert response.status == 400
        assert next(iter(bad)) in (await api.check(response, TIMELINE))["error"]["message"]


# --- the audit trail -----------------------------------------------------------------------------


@pytest.fixture
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog lines at info and up (the test session keeps only warnings otherwise)."""
    previous = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(wrapper_class=previous)


async def audit_records(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM audit_reads ORDER BY id")
    return [dict(row) | {"filters": json.loads(row["filters"])} for row in rows]


async def test_reads_by_auditors_are_recorded_and_logged(
    make_client: ClientFactory,
    eventlog: EventLog,
    pool: asyncpg.Pool,
    captured_logs: list[MutableMapping[str, Any]],
) -> None:
    client = await make_client(workers=0)
    jobs = await seed(eventlog)
    job = jobs[0].job_id
    started = datetime.now(UTC)
    name = f"auditor-{uuid.uuid4()}"  # this test's lines, whatever else logs meanwhile
    headers = auth(name, (), roles=("auditor",))

    # Ordinary users leave no record.
    await client.get(EVENTS, params={"project": "demo"}, headers=auth())
    await client.get(TIMELINE.format(project_id="demo", job_id=job), headers=auth())
    assert await audit_records(pool) == []
    assert not [e for e in captured_logs if e.get("auditor") == "alice"]

    reads: list[tuple[str, list[tuple[str, str]]]] = [
        (EVENTS, [("type", "export:failed"), ("type", "export:completed"), ("limit", "10")]),
        (EVENTS, [("project", "other"), ("format", "csv")]),
        (TIMELINE.format(project_id="demo", job_id=job), []),
        ("/v1/verify", [("from", "1"), ("to", "6")]),
        (f"/projects/demo/export/{job}/status", []),
        (EVENTS, [("limit", "0")]),
    ]
    for url, params in reads:
        await (await client.get(url, params=params, headers=headers)).read()
    # Not a read: refused, and not recorded.
    assert (await client.post(f"/projects/demo/export/{job}/cancel", headers=headers)).status == 403

    def logged() -> list[MutableMapping[str, Any]]:
        return [e for e in captured_logs if e["event"] == "auditor read" and e["auditor"] == name]

    async def finished() -> bool:
        # A stream's record is finished (and logged) just after its last byte is sent.
        records = await audit_records(pool)
        done = len(records) == len(reads) and all(r["finished_at"] for r in records)
        return done and len(logged()) == len(reads)

    await wait_for(finished)
    records = await audit_records(pool)
    summary = [
        (r["endpoint"], r["path"], r["filters"], r["row_count"], r["status"], r["completed"])
        for r in records
    ]
    assert summary == [
        (EVENTS, EVENTS, {"type": ["export:failed", "export:completed"], "limit": ["10"]}, 3,
         200, True),
        (EVENTS, EVENTS, {"project": ["other"], "format": ["csv"]}, 6, 200, True),
        (TIMELINE, f"/projects/demo/export/{job}/timeline", {}, 5, 200, True),
        ("/v1/verify", "/v1/verify", {"from": ["1"], "to": ["6"]}, 6, 200, True),
        ("/projects/{project_id}/export/{job_id}/status", f"/projects/demo/export/{job}/status",
         {}, None, 200, True),
        (EVENTS, EVENTS, {"limit": ["0"]}, None, 400, False),
    ]  # fmt: skip
    for record in records:
        assert (record["auditor"], record["roles"], record["method"]) == (
            name,
            ["auditor"],
            "GET",
        )
        assert started - timedelta(seconds=5) < record["read_at"] <= record["finished_at"]

    lines = logged()
    assert [(e["endpoint"], e["rows"], e["status"]) for e in lines] == [
        (s[0], s[3], s[4]) for s in summary
    ]
    assert lines[0]["filters"] == {"type": ["export:failed", "export:completed"], "limit": ["10"]}
    assert lines[0]["audit_id"] == records[0]["id"]

    # The trail is kept: finished once, never changed or removed.
    async with pool.acquire() as conn:
        for sql in (
            "UPDATE audit_reads SET row_count = 0 WHERE id = $1",
            "UPDATE audit_reads SET finished_at = NULL, row_count = 0 WHERE id = $1",
            "DELETE FROM audit_reads WHERE id = $1",
        ):
            with pytest.raises(asyncpg.PostgresError, match=r"audit record|audit records are kept"):
                await conn.execute(sql, records[0]["id"])
        with pytest.raises(asyncpg.PostgresError, match="audit records are kept"):
            await conn.execute("TRUNCATE audit_reads")


async def test_a_stream_cut_short_is_recorded_as_incomplete(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    await big_log(eventlog, 4000)
    client = await make_client(workers=0, audit_page_size=50)
    response = await client.get(EVENTS, params={"format": "ndjson"}, headers=auditor())
    assert response.status == 200
    assert await response.content.readany()
    # Hold the service's next page back until the client has hung up.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        response.close()

    async def finished() -> bool:
        records = await audit_records(pool)
        return bool(records and records[0]["finished_at"] is not None)

    await wait_for(finished, timeout=30, interval=0.05)
    (record,) = await audit_records(pool)
    assert (record["status"], record["completed"]) == (200, False)
    assert 0 < record["row_count"] < 4000
