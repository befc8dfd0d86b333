"""Replay reads coalesced across clients: one query per kind per round, each answer exact."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest

from schemas.events import Event, Progress, encode_event
from schemas.state import JobState
from services.common.eventlog import EventLog
from services.gateway.reader import EventCache, Reader, ReaderError, merge_ranges
from tests.support import new_job, progress


@pytest.fixture
async def reader(pool: asyncpg.Pool) -> AsyncIterator[Reader]:
    reader = Reader(pool)
    task = asyncio.create_task(reader.run())
    try:
        yield reader
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def stub_event(job_id: uuid.UUID, seq: int) -> Event:
    return Event(
        job_id=job_id,
        project_id="p1",
        seq=seq,
        position=seq,
        event_id=uuid.uuid4(),
        type=Progress.TYPE,
        occurred_at=datetime.now(UTC),
        actor="test",
        data=Progress(phase="processing", progress=0, phase_progress=0),
    )


def test_touching_ranges_merge_and_distant_ones_do_not() -> None:
    assert merge_ranges([(0, 5), (3, 10), (20, 5), (13, 2), (40, 1)]) == [
        (0, 15),
        (20, 25),
        (40, 41),
    ]
    assert merge_ranges([(7, 3), (7, 3)]) == [(7, 10)]


async def test_a_thousand_clients_at_one_seq_cost_one_query(
    reader: Reader, eventlog: EventLog
) -> None:
    job = await new_job(eventlog)
    await eventlog.append(job, 2, [progress(i) for i in range(100)])
    pages = await asyncio.gather(*(reader.job_page(job, 2, 50) for _ in range(1000)))
    assert reader.queries == 1
    assert [e.seq for e in pages[0].events] == list(range(3, 53))
    # The same page, framed once for all of them.
    assert len({id(page.frame()) for page in pages}) == 1


async def test_requests_of_one_job_at_different_seqs_get_exact_slices(
    reader: Reader, eventlog: EventLog
) -> None:
    job = await new_job(eventlog)
    await eventlog.append(job, 2, [progress(i) for i in range(28)])  # seqs 1..30
    other = await new_job(eventlog)
    asks = [(0, 5), (3, 10), (20, 5), (28, 10), (40, 5), (29, 1), (0, 30)]
    pages = await asyncio.gather(
        *(reader.job_page(job, after, limit) for after, limit in asks),
        reader.job_page(other, 0, 10),
    )
    assert reader.queries == 1
    for (after, limit), page in zip(asks, pages, strict=False):
        expected = list(range(after + 1, min(after + limit, 30) + 1))
        assert [e.seq for e in page.events] == expected, (after, limit)
        assert page.encoded == [encode_event(e) for e in page.events]
        frame = msgspec.json.decode(page.frame())
        assert frame["type"] == "export:replay"
        assert frame["jobId"] == str(job)
        assert [e["seq"] for e in frame["events"]] == expected
    assert [e.seq for e in pages[-1].events] == [1, 2]
    assert [e["seq"] for e in msgspec.json.decode(pages[1].frame(2, 4))["events"]] == [6, 7]


async def test_states_of_many_jobs_are_one_query(reader: Reader, eventlog: EventLog) -> None:
    jobs = [await new_job(eventlog) for _ in range(20)]
    missing = uuid.uuid4()
    states = await asyncio.gather(*(reader.job_state(j) for j in [*jobs, missing, *jobs]))
    assert reader.queries == 1
    assert states[20] is None
    for job, state in zip(jobs, states, strict=False):
        assert state == await eventlog.job_state(job)


async def test_project_and_log_streams_are_one_query_each(
    reader: Reader, eventlog: EventLog
) -> None:
    a = await new_job(eventlog, project="pa")
    await new_job(eventlog, project="pb")
    await eventlog.append(a, 2, [progress(5)])
    everything = await eventlog.tail(0, 100)
    snapshots = await asyncio.gather(
        reader.stream_snapshot("pa"), reader.stream_snapshot("pb"), reader.stream_snapshot(None)
    )
    assert reader.queries == 1
    head = everything[-1].position
    assert {s.head for s in snapshots} == {head}
    assert snapshots[2].jobs_json is None
    assert snapshots[0].jobs_json is not None
    states = msgspec.json.decode(snapshots[0].jobs_json, type=list[JobState])
    assert states == [await eventlog.job_state(a)]

    before = reader.queries
    pa, pb, whole, tail = await asyncio.gather(
        reader.stream_page("pa", 0, 100),
        reader.stream_page("pb", 0, 1),
        reader.stream_page(None, 0, 100),
        reader.stream_page(None, 2, 2),
    )
    assert reader.queries == before + 2
    assert [e.position for e in pa.events] == [
        e.position for e in everything if e.project_id == "pa"
    ]
    assert len(pb.events) == 1
    assert pb.events[0].project_id == "pb"
    assert [e.position for e in whole.events] == [e.position for e in everything]
    assert [e.position for e in tail.events] == [e.position for e in everything if e.position > 2][
        :2
    ]


async def test_a_failed_read_fails_every_asker_with_a_reader_error(
    database_url: str, eventlog: EventLog
) -> None:
    job = await new_job(eventlog)
    broken = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    reader = Reader(broken)
    task = asyncio.create_task(reader.run())
    try:
        async with broken.acquire() as conn:
            await conn.execute("ALTER TABLE events RENAME TO events_gone")
        try:
            results = await asyncio.gather(
                reader.job_page(job, 0, 10), reader.job_page(job, 0, 10), return_exceptions=True
            )
        finally:
            async with broken.acquire() as conn:
                await conn.execute("ALTER TABLE events_gone RENAME TO events")
        assert all(isinstance(r, ReaderError) for r in results)
        # The reader keeps serving.
        assert [e.seq for e in (await reader.job_page(job, 0, 10)).events] == [1, 2]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broken.close()


def test_the_event_cache_gives_runs_without_gaps_and_keeps_the_latest() -> None:
    job, other = uuid.UUID(int=1), uuid.UUID(int=2)
    cache = EventCache(5)
    made = {seq: stub_event(job, seq) for seq in (1, 2, 3, 5)}
    for event in made.values():
        cache.add(event, b"%d" % event.seq)
    cache.add(stub_event(other, 4), b"other")
    assert [e.seq for e, _ in cache.run(job, 0, 10)] == [1, 2, 3]  # stops before the gap at 4
    assert [b for _, b in cache.run(job, 1, 2)] == [b"2"]  # and at `upto`
    assert cache.run(job, 3, 10) == []
    cache.add(stub_event(job, 6), b"6")  # a sixth: the oldest read (seq 1) goes
    assert len(cache) == 5
    assert cache.run(job, 0, 10) == []
    assert [e.seq for e, _ in cache.run(job, 1, 10)] == [2, 3]


async def test_pages_come_from_the_cache_and_the_log_together_and_miss_nothing_new(
    reader: Reader, eventlog: EventLog
) -> None:
    job = await new_job(eventlog)  # seqs 1..2
    await eventlog.append(job, 2, [progress(i) for i in range(8)])  # 3..10
    first = await reader.job_page(job, 0, 50)
    assert [e.seq for e in first.events] == list(range(1, 11))
    assert len(reader.cache) == 10
    # Committed since: a page read now has the cached run and the new events, in order, once.
    await eventlog.append(job, 10, [progress(50 + i) for i in range(5)])  # 11..15
    again, later = await asyncio.gather(reader.job_page(job, 0, 50), reader.job_page(job, 4, 8))
    log = await eventlog.read_stream(job)
    assert [e.seq for e in again.events] == [e.seq for e in log] == list(range(1, 16))
    assert again.encoded == [encode_event(e) for e in log]
    assert [e.seq for e in later.events] == list(range(5, 13))
    assert later.encoded == [encode_event(e) for e in log[4:12]]
    assert len(reader.cache) == 15


async def test_cached_runs_of_distant_ranges_and_rows_read_after_them_come_in_seq_order(
    reader: Reader, eventlog: EventLog
) -> None:
    job = await new_job(eventlog)
    await eventlog.append(job, 2, [progress(i) for i in range(38)])  # seqs 1..40
    await asyncio.gather(reader.job_page(job, 0, 5), reader.job_page(job, 20, 5))
    assert len(reader.cache) == 10  # 1..5 and 21..25
    near, far = await asyncio.gather(reader.job_page(job, 0, 10), reader.job_page(job, 20, 10))
    assert [e.seq for e in near.events] == list(range(1, 11))
    assert [e.seq for e in far.events] == list(range(21, 31))
    log = await eventlog.read_stream(job)
    assert far.encoded == [encode_event(e) for e in log[20:30]]
