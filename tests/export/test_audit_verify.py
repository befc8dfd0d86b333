"""Verification over HTTP: one job's chain, and the chains of a range of the log, against events
altered behind the database's back."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from schemas.chain import check_link, verify_chain
from services.common.eventlog import EventLog
from tests.export.conftest import Client, ClientFactory, auth
from tests.export.test_audit import auditor, seed
from tests.export.test_openapi import Conformance
from tests.schemas.test_chain import chain

RANGE = "/v1/verify"
JOB_VERIFY = "/projects/{project_id}/export/{job_id}/verify"


async def tamper(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    """What a superuser can do: switch the append-only guards off for one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql, *args)


async def event(pool: asyncpg.Pool, job_id: uuid.UUID, seq: int) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT position, event_id FROM events WHERE job_id = $1 AND seq = $2", job_id, seq
        )
    assert row is not None
    return row


async def head(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        value: int = await conn.fetchval("SELECT max(position) FROM events")
    return value


async def verify_range(client: Client, first: int, last: int) -> dict[str, Any]:
    response = await client.get(RANGE, params={"from": first, "to": last}, headers=auditor())
    body: dict[str, Any] = await Conformance().check(response, RANGE)
    assert response.status == 200, body
    return body


async def test_both_verifications_name_an_event_altered_by_a_superuser(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    client = await make_client(workers=0)
    jobs = await seed(eventlog)
    total = await head(pool)
    assert (await verify_range(client, 1, total))["ok"] is True

    victim = jobs[3]  # project demo, six events
    altered = await event(pool, victim.job_id, 4)
    await tamper(
        pool,
        """UPDATE events SET data = '{"phase":"processing","progress":99,"phaseProgress":99}'
            WHERE job_id = $1 AND seq = 4""",
        victim.job_id,
    )

    # The job's own verification.
    response = await client.get(
        JOB_VERIFY.format(project_id="demo", job_id=victim.job_id), headers=auth()
    )
    report = await Conformance().check(response, JOB_VERIFY)
    assert report["ok"] is False
    assert report["jobId"] == str(victim.job_id)
    assert report["broken"] == {
        "seq": 4,
        "eventId": str(altered["event_id"]),
        "position": altered["position"],
        "reason": "hash does not match the stored fields",
    }

    # The whole log as one range: every other job verifies, the first break is that event.
    report = await verify_range(client, 1, total)
    assert report["ok"] is False
    assert (report["fromPosition"], report["toPosition"]) == (1, total)
    assert (report["eventsChecked"], report["jobsChecked"]) == (total, len(jobs))
    assert report["broken"] == {
        "jobId": str(victim.job_id),
        "projectId": "demo",
        "seq": 4,
        "position": altered["position"],
        "eventId": str(altered["event_id"]),
        "reason": "hash does not match the stored fields",
    }
    results = {r["jobId"]: r for r in report["jobs"]}
    assert {job_id for job_id, r in results.items() if not r["ok"]} == {str(victim.job_id)}
    assert results[str(victim.job_id)]["broken"] == {
        key: report["broken"][key] for key in ("seq", "eventId", "position", "reason")
    }
    assert [r["firstPosition"] for r in report["jobs"]] == sorted(
        r["firstPosition"] for r in report["jobs"]
    )

    # Ranges that hold the event name it; ranges beside it verify.
    position = altered["position"]
    assert (await verify_range(client, position, position))["broken"]["position"] == position
    assert (await verify_range(client, position - 1, position + 1))["broken"]["seq"] == 4
    assert (await verify_range(client, 1, position - 1))["ok"] is True
    after = await verify_range(client, position + 1, total)
    # The next event of the job follows the altered one's stored hash, which was not changed:
    # the range after it is sound, and only a range holding the event can tell.
    assert after["ok"] is True
    assert str(victim.job_id) in {r["jobId"] for r in after["jobs"]}

    # The function behind it, as a CLI calls it, reads the range in pages to the same verdict.
    direct = await eventlog.verify_range(1, total, page_size=2)
    assert direct.broken is not None
    assert (direct.broken.job_id, direct.broken.seq, direct.broken.position) == (
        victim.job_id,
        4,
        position,
    )
    assert direct.events_checked == total


async def test_range_verification_checks_the_links_at_its_edges(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    client = await make_client(workers=0)
    jobs = await seed(eventlog)
    total = await head(pool)
    last_of = {}
    for job in jobs:
        async with pool.acquire() as conn:
            last_of[job.job_id] = await conn.fetchval(
                "SELECT max(seq) FROM events WHERE job_id = $1", job.job_id
            )

    # Job 0 (5 events): the event before the range is re-hashed, as a forger re-chaining it
    # would. The range starts at its event 3.
    rechained = await event(pool, jobs[0].job_id, 2)
    third = await event(pool, jobs[0].job_id, 3)
    await tamper(
        pool,
        "UPDATE events SET hash = sha256(hash) WHERE job_id = $1 AND seq = 2",
        jobs[0].job_id,
    )
    report = await verify_range(client, third["position"], total)
    assert report["broken"] == {
        "jobId": str(jobs[0].job_id),
        "projectId": "demo",
        "seq": 3,
        "position": third["position"],
        "eventId": str(third["event_id"]),
        "reason": "prev_hash does not match the stored hash of event 2, before the range",
    }
    # From event 2 on, that event itself is named.
    report = await verify_range(client, rechained["position"], total)
    assert (report["broken"]["seq"], report["broken"]["position"]) == (2, rechained["position"])

    # Job 3 (6 events): event 5 removed from the middle.
    gone = await event(pool, jobs[3].job_id, 5)
    await tamper(pool, "DELETE FROM events WHERE job_id = $1 AND seq = 5", jobs[3].job_id)
    # Job 2 (3 events, ends inside the range): its last event removed.
    await tamper(pool, "DELETE FROM events WHERE job_id = $1 AND seq = $2", jobs[2].job_id, 3)
    report = await verify_range(client, 1, total)
    results = {r["jobId"]: r for r in report["jobs"]}
    assert results[str(jobs[3].job_id)]["broken"] == {
        "seq": 5,
        "eventId": None,
        "position": None,
        "reason": "event 5 is missing (next is 6)",
    }
    assert results[str(jobs[2].job_id)]["broken"] == {
        "seq": 3,
        "eventId": None,
        "position": None,
        "reason": f"events 3 to {last_of[jobs[2].job_id]} are missing",
    }
    assert results[str(jobs[0].job_id)]["broken"]["seq"] == 2
    assert results[str(jobs[1].job_id)]["ok"]
    assert results[str(jobs[4].job_id)]["ok"]
    # The first break overall is the one a reader of the log meets first.
    assert report["broken"]["jobId"] == str(jobs[0].job_id)

    # A range starting just after the removed event: the one before the range is missing.
    report = await verify_range(client, gone["position"] + 1, total)
    assert report["broken"] == {
        "jobId": str(jobs[3].job_id),
        "projectId": "demo",
        "seq": 5,
        "position": None,
        "eventId": None,
        "reason": "event 5, just before the range, is missing",
    }


async def test_range_verification_is_for_auditors_and_services(
    make_client: ClientFactory, eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    client = await make_client(workers=0)
    api = Conformance()
    await seed(eventlog)
    total = await head(pool)

    response = await client.get(RANGE, headers=auth("alice", ("*",)))
    assert response.status == 403
    assert "auditor or service" in (await api.check(response, RANGE))["error"]["message"]
    response = await client.get(RANGE, headers=auth("indexer", (), roles=("service",)))
    assert response.status == 200
    # Without `to`, up to the head; past the head, cut at it.
    body = await api.check(response, RANGE)
    assert (body["fromPosition"], body["toPosition"], body["ok"]) == (1, total, True)
    body = await verify_range(client, 3, total + 1000)
    assert (body["toPosition"], body["eventsChecked"]) == (total, total - 2)


@pytest.mark.parametrize(
    ("params", "status", "named"),
    [
        ({"from": "0"}, 400, "from"),
        ({"to": "last"}, 400, "to"),
        ({"from": "5", "to": "4"}, 422, "from"),
        ({"from": "1", "to": "1000001"}, 422, "to"),
        ({"position": "1"}, 400, "position"),
    ],
)
async def test_range_verification_refuses_bad_ranges(
    make_client: ClientFactory, params: dict[str, str], status: int, named: str
) -> None:
    client = await make_client(workers=0)
    response = await client.get(RANGE, params=params, headers=auditor())
    assert response.status == status
    assert named in (await Conformance().check(response, RANGE))["error"]["message"]


def test_a_chain_checked_from_an_anchor() -> None:
    """The building block of range verification: a chain that starts after seq k."""
    links = chain(6)
    tail = links[3:]
    assert verify_chain(tail, after_seq=3, anchor=links[2].hash) is None
    broken = verify_chain(tail, after_seq=3, anchor=links[1].hash)
    assert broken is not None
    assert (broken.seq, broken.reason) == (4, "prev_hash does not match the previous event")
    broken = verify_chain(tail, after_seq=2, anchor=links[2].hash)
    assert broken is not None
    assert (broken.seq, broken.event_id) == (3, None)
    positioned = [msgspec.structs.replace(link, position=10 * link.seq) for link in links]
    altered = msgspec.structs.replace(positioned[4], actor="user:mallory")
    broken = check_link(altered, 4, positioned[3].hash)
    assert broken is not None
    assert (broken.seq, broken.position) == (5, 50)
