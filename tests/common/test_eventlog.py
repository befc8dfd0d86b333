"""Guarantees 1, 2, 4 and 5 of DESIGN.md, against a real PostgreSQL.

Where a guarantee is the database's, the test goes around `EventLog` and writes SQL directly: the
rule must hold for any writer, not only for ours.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import msgspec
import pytest

from schemas.chain import ChainLink, event_hash
from schemas.events import (
    EVENT_TYPES,
    OUTCOME_TYPES,
    POST_COMPLETION_TYPES,
    CancelRequested,
    DownloadCompleted,
    DownloadStarted,
    encode_data,
)
from schemas.state import replay
from services.common.eventlog import (
    AppendRequest,
    ConflictError,
    EventLog,
    JobClosedError,
    NewEvent,
)
from tests.support import cancelled, completed, failed, new_job, progress, queued, started

RAW_INSERT = """
    INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id, owner_id, occurred_at)
    VALUES ($1, $2, gen_random_uuid(), $3, $4::json, 'test', 'p1', 'alice', now())
"""


async def raw_insert(pool: asyncpg.Pool, job_id: uuid.UUID, seq: int, type_: str) -> None:
    async with pool.acquire() as conn:
        await conn.execute(RAW_INSERT, job_id, seq, type_, "{}")


# -- guarantee 1: per-job order -----------------------------------------------------------


async def test_seqs_are_contiguous_from_one(eventlog: EventLog) -> None:
    job_id = await new_job(eventlog)
    result = await eventlog.append(job_id, 2, [progress(10), progress(20), progress(30)])
    assert (result.first_seq, result.last_seq) == (3, 5)
    events = await eventlog.read_stream(job_id)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    positions = [e.position for e in events]
    assert positions == sorted(positions)
    assert [e.seq for e in await eventlog.read_stream(job_id, after_seq=3)] == [4, 5]


async def test_wrong_expected_seq_is_a_typed_conflict_and_writes_nothing(
    eventlog: EventLog,
) -> None:
    job_id = await new_job(eventlog)
    with pytest.raises(ConflictError) as info:
        await eventlog.append(job_id, 1, [progress(5)])
    assert (info.value.expected_seq, info.value.actual_seq) == (1, 2)
    with pytest.raises(ConflictError):
        await eventlog.append(job_id, 7, [progress(5)])
    with pytest.raises(ConflictError) as info:
        await eventlog.append(job_id, 0, [queued()], project_id="p1", owner_id="alice")
    assert info.value.actual_seq == 2
    with pytest.raises(ConflictError) as info:
        await eventlog.append(uuid.uuid4(), 3, [progress(5)])
    assert info.value.actual_seq == 0
    assert [e.seq for e in await eventlog.read_stream(job_id)] == [1, 2]


async def test_racing_appenders_one_wins_the_rest_conflict(pool: asyncpg.Pool) -> None:
    writers = [EventLog(pool) for _ in range(8)]
    job_id = await new_job(writers[0])
    conns = [await pool.acquire() for _ in writers]
    start = asyncio.Barrier(len(writers))

    async def race(writer: EventLog, conn: asyncpg.Connection, value: int) -> object:
        await start.wait()  # every writer has its connection and the same expected seq
        return await writer.append(job_id, 2, [progress(value)], conn=conn)

    try:
        outcomes = await asyncio.gather(
            *(race(w, c, i) for i, (w, c) in enumerate(zip(writers, conns, strict=True))),
            return_exceptions=True,
        )
    finally:
        for conn in conns:
            await pool.release(conn)
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(o, ConflictError) for o in outcomes if o not in winners)
    assert [e.seq for e in await writers[0].read_stream(job_id)] == [1, 2, 3]


async def test_many_writers_retrying_on_conflict_leave_no_gap_or_duplicate(
    pool: asyncpg.Pool,
) -> None:
    writers = [EventLog(pool) for _ in range(6)]
    job_id = await new_job(writers[0])

    async def writer(log: EventLog, count: int) -> None:
        written = 0
        while written < count:
            state = await log.job_state(job_id)
            assert state is not None
            try:
                await log.append(job_id, state.seq, [progress(state.progress + 0.1)])
                written += 1
            except ConflictError:
                await asyncio.sleep(random.random() / 1000)

    await asyncio.gather(*(writer(w, 10) for w in writers))
    events = await writers[0].read_stream(job_id)
    assert [e.seq for e in events] == list(range(1, 63))


async def test_the_database_refuses_gaps_and_duplicate_seqs(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    with pytest.raises(asyncpg.PostgresError) as info:
        await raw_insert(pool, job_id, 4, "export:progress")
    assert info.value.sqlstate == "EL001"
    with pytest.raises(asyncpg.UniqueViolationError):
        await raw_insert(pool, job_id, 2, "export:progress")
    with pytest.raises(asyncpg.PostgresError) as info:
        await raw_insert(pool, uuid.uuid4(), 2, "export:progress")
    assert info.value.sqlstate == "EL001"


async def test_the_database_refuses_an_event_of_another_project_or_owner(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    async with pool.acquire() as conn:
        for project, owner in (("p2", "alice"), ("p1", "mallory")):
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute(
                    """
                    INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id,
                                        owner_id, occurred_at)
                    VALUES ($1, 3, gen_random_uuid(), 'export:progress', '{}', 't', $2, $3, now())
                    """,
                    job_id,
                    project,
                    owner,
                )
            assert info.value.sqlstate == "EL004", (project, owner)


async def test_the_database_refuses_a_position_below_the_previous_event(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    (second,) = await eventlog.read_stream(job_id, after_seq=1)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(
                """
                INSERT INTO events (position, job_id, seq, event_id, type, data, actor,
                                    project_id, owner_id, occurred_at)
                OVERRIDING SYSTEM VALUE
                VALUES ($1, $2, 3, gen_random_uuid(), 'export:progress', '{}', 't', 'p1',
                        'alice', now())
                """,
                second.position - 1,
                job_id,
            )
    assert info.value.sqlstate == "EL001"


async def test_appending_the_same_event_id_again_returns_what_is_stored(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    batch = [progress(10), progress(20)]
    first = await eventlog.append(job_id, 2, batch)
    await eventlog.append(job_id, 4, [progress(30)])
    again = await EventLog(pool).append(job_id, 2, batch)
    assert again.duplicate
    assert (again.first_seq, again.last_seq) == (first.first_seq, first.last_seq)
    assert (again.first_position, again.last_position) == (
        first.first_position,
        first.last_position,
    )
    assert len(await eventlog.read_stream(job_id)) == 5
    # A retry that mixes stored and new events is not the same append: a conflict.
    with pytest.raises(ConflictError):
        await eventlog.append(job_id, 2, [batch[0], progress(40)])
    # A new job's first append, retried, is a duplicate too.
    job2 = uuid.uuid4()
    first_event = queued()
    await eventlog.append(job2, 0, [first_event], project_id="p1", owner_id="alice")
    again = await eventlog.append(job2, 0, [first_event], project_id="p1", owner_id="alice")
    assert again.duplicate
    assert again.last_seq == 1


async def test_appending_events_reaches_the_database_as_encoded(eventlog: EventLog) -> None:
    job_id = await new_job(eventlog)
    event = progress(12.5, stage="visualizations")
    await eventlog.append(job_id, 2, [event])
    (stored,) = await eventlog.read_stream(job_id, after_seq=2)
    assert isinstance(stored.data, msgspec.Raw)
    assert bytes(stored.data) == encode_data(event.data)
    assert stored.type == "export:progress"
    assert stored.actor == "worker:w1"
    assert stored.event_id == event.event_id


# -- guarantee 2: one outcome -------------------------------------------------------------


@pytest.mark.parametrize("first", ["completed", "failed", "cancelled"])
@pytest.mark.parametrize("second", ["completed", "failed", "cancelled"])
async def test_a_second_outcome_is_refused(eventlog: EventLog, first: str, second: str) -> None:
    make = {"completed": completed, "failed": failed, "cancelled": cancelled}
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [make[first]()])
    with pytest.raises(JobClosedError):
        await eventlog.append(job_id, 3, [make[second]()])
    assert [e.seq for e in await eventlog.read_stream(job_id)] == [1, 2, 3]


@pytest.mark.parametrize("outcome", sorted(OUTCOME_TYPES))
async def test_the_database_itself_refuses_a_second_outcome(
    eventlog: EventLog, pool: asyncpg.Pool, outcome: str
) -> None:
    job_id = await new_job(eventlog)
    await raw_insert(pool, job_id, 3, outcome)
    for other in sorted(OUTCOME_TYPES):
        with pytest.raises(asyncpg.PostgresError) as info:
            await raw_insert(pool, job_id, 4, other)
        assert info.value.sqlstate == "EL002"


async def test_one_outcome_holds_even_with_the_row_checks_disabled(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    # The unique index is the last line: it holds when a superuser disables the triggers.
    job_id = await new_job(eventlog)
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE events DISABLE TRIGGER events_check_and_chain")
        await conn.execute("ALTER TABLE events DISABLE TRIGGER events_verify_inserted")
        insert = RAW_INSERT.replace("occurred_at)", "occurred_at, prev_hash, hash)").replace(
            "now())", "now(), '', '')"
        )
        await conn.execute(insert, job_id, 3, "export:completed", "{}")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(insert, job_id, 4, "export:cancelled", "{}")


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
async def test_nothing_follows_failed_or_cancelled(
    eventlog: EventLog, pool: asyncpg.Pool, outcome: str
) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [{"failed": failed, "cancelled": cancelled}[outcome]()])
    for type_ in sorted(EVENT_TYPES):
        with pytest.raises(asyncpg.PostgresError) as info:
            await raw_insert(pool, job_id, 4, type_)
        assert info.value.sqlstate == "EL002", type_
    with pytest.raises(JobClosedError):
        await eventlog.append(job_id, 3, [progress(99)])


async def test_after_completed_only_the_download_phase(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [completed()])
    for type_ in sorted(set(EVENT_TYPES) - POST_COMPLETION_TYPES):
        with pytest.raises(asyncpg.PostgresError) as info:
            await raw_insert(pool, job_id, 4, type_)
        assert info.value.sqlstate == "EL002", type_
    result = await eventlog.append(
        job_id,
        3,
        [
            NewEvent(data=DownloadStarted(download_id="d1", total_bytes=10), actor="user:alice"),
            NewEvent(data=DownloadCompleted(download_id="d1", bytes_sent=10), actor="user:alice"),
        ],
    )
    assert result.state is not None
    assert result.state.status == "completed"
    assert result.state.progress == 100.0


async def test_download_events_before_completion_are_refused(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    with pytest.raises(JobClosedError):
        await eventlog.append(
            job_id, 2, [NewEvent(data=DownloadStarted(download_id="d", total_bytes=1), actor="u")]
        )
    for type_ in sorted(POST_COMPLETION_TYPES):
        with pytest.raises(asyncpg.PostgresError) as info:
            await raw_insert(pool, job_id, 3, type_)
        assert info.value.sqlstate == "EL002", type_


async def test_cancel_versus_complete_race_has_one_winner_everyone_sees(
    pool: asyncpg.Pool,
) -> None:
    """Seed 002: cancel and completion arrive together; whichever commits first wins."""
    for _ in range(20):
        worker, api = EventLog(pool), EventLog(pool)
        job_id = await new_job(worker)
        cancel = NewEvent(data=CancelRequested(requested_by="alice"), actor="user:alice")
        results = await asyncio.gather(
            worker.append(job_id, 2, [completed()]),
            api.append(job_id, 2, [cancel, cancelled()]),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        events = await worker.read_stream(job_id)
        outcomes = [e.type for e in events if e.type in OUTCOME_TYPES]
        assert len(outcomes) == 1
        state = replay(events)
        assert state is not None
        for reader in (worker, api, EventLog(pool)):
            projected = await reader.job_state(job_id)
            assert projected == state
        assert state.status == outcomes[0].removeprefix("export:")


# -- guarantee 4: append-only and the hash chain --------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET data = '{}' WHERE seq = 1",
        "UPDATE events SET type = 'export:cancelled'",
        "DELETE FROM events WHERE seq = 2",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
async def test_history_cannot_be_changed_or_removed(
    eventlog: EventLog, pool: asyncpg.Pool, statement: str
) -> None:
    job_id = await new_job(eventlog)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(statement)
    assert info.value.sqlstate == "EL003"
    assert [e.seq for e in await eventlog.read_stream(job_id)] == [1, 2]


async def test_each_event_links_to_the_previous_hash(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(10), completed()])
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT seq, prev_hash, hash FROM events WHERE job_id = $1 ORDER BY seq", job_id
        )
    assert bytes(rows[0]["prev_hash"]) == bytes(32)
    for before, after in itertools.pairwise(rows):
        assert after["prev_hash"] == before["hash"]
    assert len({bytes(r["hash"]) for r in rows}) == len(rows)
    report = await eventlog.verify(job_id)
    assert report.ok
    assert (report.events_checked, report.last_seq) == (4, 4)


async def _tamper(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    # What an attacker with superuser rights could do: switch the guards off and edit.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql, *args)


async def test_verify_names_an_altered_event(eventlog: EventLog, pool: asyncpg.Pool) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(10), progress(20), progress(30)])
    await _tamper(
        pool,
        'UPDATE events SET data = \'{"phase":"processing","progress":99,'
        '"phaseProgress":99}\' WHERE job_id = $1 AND seq = 4',
        job_id,
    )
    report = await eventlog.verify(job_id)
    assert not report.ok
    assert report.broken is not None
    assert report.broken.seq == 4
    assert "hash" in report.broken.reason


async def test_verify_names_a_removed_event(eventlog: EventLog, pool: asyncpg.Pool) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(10), progress(20), progress(30)])
    await _tamper(pool, "DELETE FROM events WHERE job_id = $1 AND seq = 3", job_id)
    report = await eventlog.verify(job_id)
    assert report.broken is not None
    assert report.broken.seq == 3


async def test_verify_notices_events_cut_from_the_end(
    eventlog: EventLog, pool: asyncpg.Pool
) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(10), progress(20)])
    await _tamper(pool, "DELETE FROM events WHERE job_id = $1 AND seq = 4", job_id)
    report = await eventlog.verify(job_id)
    assert report.broken is not None
    assert report.broken.seq == 4


@pytest.mark.parametrize(
    "change",
    [
        "actor = 'user:mallory'",
        "type = 'export:completed'",
        "occurred_at = occurred_at + interval '1 microsecond'",
        "owner_id = 'mallory'",
        "project_id = 'p2'",
        "event_id = gen_random_uuid()",
        'data = \'{"phase":"processing","progress":5,"phaseProgress":5}\'',
        'data = \'{"phase": "processing","progress":1,"phaseProgress":1}\'',
        "prev_hash = '\\x00'::bytea",
    ],
)
async def test_verify_notices_any_rewritten_field(
    eventlog: EventLog, pool: asyncpg.Pool, change: str
) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(1), progress(2)])
    await _tamper(pool, f"UPDATE events SET {change} WHERE job_id = $1 AND seq = 3", job_id)
    report = await eventlog.verify(job_id)
    assert report.broken is not None
    assert report.broken.seq == 3


async def test_python_and_sql_compute_the_same_hash(pool: asyncpg.Pool) -> None:
    """The verifier (and an auditor's offline check) recompute exactly what the database wrote."""
    link = ChainLink(
        job_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
        seq=7,
        event_id=uuid.UUID("00000000-0000-4000-8000-000000000002"),
        type="export:progress",
        actor='user:zoë "quoted", with: separators,',
        project_id="pröject/1",
        owner_id="",
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-5))),
        data='{"message":{"text":"Kopiere Bilder (5/50) – image_001.jpg"},"progress":12.5}',
        prev_hash=bytes(range(32)),
        hash=b"",
    )
    async with pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT event_hash($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            link.prev_hash, link.job_id, link.seq, link.event_id, link.type, link.actor,
            link.project_id, link.owner_id, link.occurred_at, link.data,
        )  # fmt: skip
    assert bytes(stored) == event_hash(link.prev_hash, link)


# -- guarantee 5: authoritative state -------------------------------------------------------


async def test_projection_equals_fold_of_the_log(pool: asyncpg.Pool) -> None:
    rng = random.Random(5)
    logs = [EventLog(pool), EventLog(pool, state_cache_size=0)]
    jobs = [await new_job(logs[0]) for _ in range(10)]
    for _ in range(120):
        job_id = rng.choice(jobs)
        log = rng.choice(logs)
        state = await log.job_state(job_id)
        assert state is not None
        if state.is_terminal:
            continue
        choice = rng.random()
        if choice < 0.8:
            batch = [progress(rng.uniform(0, 100)) for _ in range(rng.randint(1, 3))]
        elif choice < 0.85:
            batch = [NewEvent(data=CancelRequested(requested_by="alice"), actor="user:alice")]
        else:
            batch = [rng.choice([completed, failed, cancelled])()]
        await log.append(job_id, state.seq, batch)
    for job_id in jobs:
        events = await logs[0].read_stream(job_id)
        assert await logs[0].job_state(job_id) == replay(events)


async def test_projection_rebuilds_from_the_log(eventlog: EventLog, pool: asyncpg.Pool) -> None:
    jobs = [await new_job(eventlog) for _ in range(3)]
    await eventlog.append(jobs[0], 2, [progress(50), completed()])
    await eventlog.append(jobs[1], 2, [cancelled()])
    columns = "job_id, project_id, owner_id, status, last_seq, state::text"

    async def rows() -> list[tuple[object, ...]]:
        async with pool.acquire() as conn:
            return [tuple(r) for r in await conn.fetch(f"SELECT {columns} FROM jobs ORDER BY 1")]

    expected = await rows()
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM jobs")
    assert await eventlog.job_state(jobs[0]) is None
    assert await eventlog.rebuild_projection() == 3
    assert await rows() == expected

    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE jobs SET state = '{}'::json, status = 'queued', last_seq = 1, "
            "project_id = 'x', owner_id = 'y'"
        )
    assert await eventlog.rebuild_projection([jobs[1]]) == 1
    assert (await rows())[[r[0] for r in expected].index(jobs[1])] == next(
        r for r in expected if r[0] == jobs[1]
    )
    # The rebuilt projection drives the append checks again: the cancelled job stays closed.
    with pytest.raises(JobClosedError):
        await EventLog(pool).append(jobs[1], 3, [progress(60)])


async def test_projection_moves_with_the_log_in_one_transaction(pool: asyncpg.Pool) -> None:
    """No reader, in any snapshot, sees events the projection does not reflect, or the reverse."""
    log = EventLog(pool)
    job_id = await new_job(log)
    stop = asyncio.Event()

    async def writer() -> None:
        for seq in range(2, 202):
            await log.append(job_id, seq, [progress(seq / 3)])
        stop.set()

    async def reader() -> int:
        checks = 0
        async with pool.acquire() as conn:
            while not stop.is_set():
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    last = await conn.fetchval(
                        "SELECT max(seq) FROM events WHERE job_id = $1", job_id
                    )
                    projected = await conn.fetchval(
                        "SELECT last_seq FROM jobs WHERE job_id = $1", job_id
                    )
                    state = msgspec.json.decode(
                        await conn.fetchval("SELECT state FROM jobs WHERE job_id = $1", job_id)
                    )
                assert last == projected == state["seq"]
                checks += 1
        return checks

    _, checks = await asyncio.gather(writer(), reader())
    assert checks > 0


async def test_append_many_commits_the_good_and_refuses_the_bad_alone(
    eventlog: EventLog,
) -> None:
    good, stale, closed = [await new_job(eventlog) for _ in range(3)]
    await eventlog.append(closed, 2, [cancelled()])
    fresh = uuid.uuid4()
    results = await eventlog.append_many(
        [
            AppendRequest(job_id=good, expected_seq=2, events=[progress(10)]),
            AppendRequest(job_id=stale, expected_seq=1, events=[progress(10)]),
            AppendRequest(job_id=closed, expected_seq=3, events=[progress(10)]),
            AppendRequest(
                job_id=fresh, expected_seq=0, events=[queued()], project_id="p", owner_id="o"
            ),
            AppendRequest(job_id=fresh, expected_seq=1, events=[started(), progress(1)]),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "AppendResult",
        "ConflictError",
        "JobClosedError",
        "AppendResult",
        "AppendResult",
    ]
    assert [e.seq for e in await eventlog.read_stream(fresh)] == [1, 2, 3]
    assert [e.seq for e in await eventlog.read_stream(good)] == [1, 2, 3]
    state = await eventlog.job_state(fresh)
    assert state is not None
    assert state.seq == 3
    assert state.status == "running"
