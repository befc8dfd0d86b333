"""Guarantee 3: a reader tailing the log by position never skips an event.

The trap: positions come from a sequence when a row is formed, but become visible when its
transaction commits. If position 10's transaction commits after position 11's, a reader can read
11, move its cursor past 10, and never see 10. The log hands out positions in commit order (an
append lock held from the first position drawn to the commit), so this cannot happen.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid

import asyncpg

from services.common.eventlog import EventLog
from services.common.queries import QUERIES
from tests.support import new_job, progress, wait_for


async def _lock_waiters(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
    return count


async def test_a_late_commit_holds_back_later_positions(pool: asyncpg.Pool) -> None:
    log = EventLog(pool)
    first_job, second_job = await new_job(log), await new_job(log)
    cursor = await log.head_position()

    slow = await pool.acquire()
    fast_task: asyncio.Task[object] | None = None
    try:
        transaction = slow.transaction()
        await transaction.start()
        await log.append(first_job, 2, [progress(1)], conn=slow)  # draws the next position

        fast_task = asyncio.create_task(log.append(second_job, 2, [progress(1)]))
        # The second append waits for the first to commit before it can draw a position.
        await wait_for(lambda: _has_waiter(pool))
        assert not fast_task.done()
        assert await log.tail(cursor) == []

        await transaction.commit()
        await asyncio.wait_for(fast_task, 10)
    finally:
        if fast_task is not None and not fast_task.done():
            fast_task.cancel()
        await pool.release(slow)

    seen = await log.tail(cursor)
    assert [(e.job_id, e.seq) for e in seen] == [(first_job, 3), (second_job, 3)]
    assert seen[0].position < seen[1].position


async def _has_waiter(pool: asyncpg.Pool) -> bool:
    return await _lock_waiters(pool) > 0


async def test_without_the_append_lock_a_tailer_would_skip(pool: asyncpg.Pool) -> None:
    """The trap is real: with the lock switched off, the same schedule loses an event."""
    log = EventLog(pool)
    first_job, second_job = await new_job(log), await new_job(log)
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE events DISABLE TRIGGER events_serialize_appends")
    cursor = await log.head_position()

    async with pool.acquire() as slow:
        transaction = slow.transaction()
        await transaction.start()
        await log.append(first_job, 2, [progress(1)], conn=slow)  # position p, not committed
        await log.append(second_job, 2, [progress(1)])  # position p + 1, committed
        seen = await log.tail(cursor)
        assert [e.job_id for e in seen] == [second_job]
        cursor = seen[-1].position
        await transaction.commit()

    assert await log.tail(cursor) == []  # the event at position p is never seen
    assert len(await log.read_stream(first_job, after_seq=2)) == 1


async def test_tailer_sees_every_event_once_in_order_despite_late_commits(
    pool: asyncpg.Pool,
) -> None:
    writers, rounds = 8, 30
    log = EventLog(pool)
    jobs = [await new_job(log) for _ in range(writers)]
    start = await log.head_position()
    done = asyncio.Event()

    async def writer(job_id: uuid.UUID, seed: int) -> None:
        rng = random.Random(seed)
        seq = 2
        async with pool.acquire() as conn:
            for _ in range(rounds):
                transaction = conn.transaction()
                await transaction.start()
                count = rng.randint(1, 3)
                await log.append(job_id, seq, [progress(seq) for _ in range(count)], conn=conn)
                # Hold the commit back for a while, so commits land out of position order
                # if anything lets them.
                await asyncio.sleep(rng.random() * 0.003)
                if rng.random() < 0.1:
                    await transaction.rollback()  # leaves a hole in the positions
                else:
                    await transaction.commit()
                    seq += count

    seen: list[tuple[int, uuid.UUID, int]] = []

    async def tailer() -> None:
        cursor = start
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            finished = done.is_set()
            batch = await log.tail(cursor, 50)
            for event in batch:
                assert event.position > cursor
                cursor = event.position
                seen.append((event.position, event.job_id, event.seq))
            if finished and not batch:
                return
            if not batch:
                await asyncio.sleep(0.0005)
        raise AssertionError("tailer did not finish")

    async def writers_then_done() -> None:
        await asyncio.gather(*(writer(job, i) for i, job in enumerate(jobs)))
        done.set()

    await asyncio.gather(writers_then_done(), tailer())

    async with pool.acquire() as conn:
        stored = [
            (r["position"], r["job_id"], r["seq"])
            for r in await conn.fetch(
                "SELECT position, job_id, seq FROM events WHERE position > $1 ORDER BY position",
                start,
            )
        ]
    assert len(stored) > writers * rounds  # most of the transactions committed
    assert seen == stored  # every event once, in position order
    per_job: dict[uuid.UUID, list[int]] = {}
    for _, job_id, seq in seen:
        per_job.setdefault(job_id, []).append(seq)
    for seqs in per_job.values():
        assert seqs == list(range(3, 3 + len(seqs)))


async def test_the_tail_follows_commit_order_not_start_order(pool: asyncpg.Pool) -> None:
    """A transaction that began first but commits last comes last in the log."""
    log = EventLog(pool)
    early, late = await new_job(log), await new_job(log)
    cursor = await log.head_position()
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.fetchval("SELECT now()")  # this transaction's clock starts here
        await log.append(late, 2, [progress(1)])  # begins later, commits first
        await log.append(early, 2, [progress(1)], conn=conn)
        await transaction.commit()
    seen = await log.tail(cursor)
    assert [e.job_id for e in seen] == [late, early]
    assert seen[0].position < seen[1].position


# -- reading one project's stream -----------------------------------------------------------


async def _plan(
    conn: asyncpg.Connection, sql: str, literals: str | None = None, *, generic: bool
) -> str:
    """The plan of a prepared statement for these arguments (None: a NULL for each parameter,
    enough for a generic plan), or its generic plan (the one PostgreSQL may settle on after a
    few executions, made without the values)."""
    mode = "force_generic_plan" if generic else "force_custom_plan"
    await conn.execute(f"SET plan_cache_mode = {mode}; PREPARE probe AS {sql}")
    try:
        if literals is None:
            count = await conn.fetchval(
                "SELECT cardinality(parameter_types) FROM pg_prepared_statements"
                " WHERE name = 'probe'"
            )
            literals = ", ".join(["NULL"] * count)
        arguments = f"({literals})" if literals else ""
        rows = await conn.fetch(f"EXPLAIN EXECUTE probe{arguments}")
    finally:
        await conn.execute("DEALLOCATE probe; RESET plan_cache_mode")
    return "\n".join(row[0] for row in rows)


async def _skewed_log(conn: asyncpg.Connection) -> None:
    """30,000 events in three big projects and one small one, and 5,000 jobs, analysed: rows
    for the planner's statistics only (the checks of the log are not the point)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id,"
            " owner_id, occurred_at, prev_hash, hash)"
            " SELECT gen_random_uuid(), 1, gen_random_uuid(), 'export:progress', '{}', 'w',"
            " CASE WHEN g % 1000 = 0 THEN 'small' ELSE 'big-' || g % 3 END, 'o', now(),"
            " '\\x00', '\\x00' FROM generate_series(1, 30000) AS g"
        )
        await conn.execute(
            "INSERT INTO jobs (job_id, project_id, owner_id, status, state)"
            " SELECT gen_random_uuid(), 'big-' || g % 3, 'o' || g % 50,"
            " CASE WHEN g % 10 = 0 THEN 'running' ELSE 'completed' END, '{}'"
            " FROM generate_series(1, 5000) AS g"
        )
    await conn.execute("ANALYZE events, jobs")


def _log_walks(plan: str) -> list[str]:
    """The nodes of a plan that read the log and throw rows away: a sequential scan of events,
    or a walk of its primary key with a filter."""
    nodes = re.split(r"\n(?=\s*->)", plan)
    return [
        node
        for node in nodes
        if "Seq Scan on events" in node or ("using events_pkey" in node and "Filter:" in node)
    ]


async def test_no_named_query_walks_the_log_to_filter_it_whatever_the_plan(
    pool: asyncpg.Pool,
) -> None:
    """The trap `project_tail` fell into, checked for every query of `queries.sql`: in its
    generic plan (the one PostgreSQL may settle on after a few executions of a prepared
    statement, made without the values) no query may read the log and skip rows, which on a
    large log is a walk through all of it for each call."""
    async with pool.acquire() as conn:
        await _skewed_log(conn)
        walks: dict[str, list[str]] = {}
        for name, sql in QUERIES.items():
            found = _log_walks(await _plan(conn, sql, generic=True))
            if found:
                walks[name] = found
    assert len(QUERIES) > 30  # every query was planned
    assert walks == {}


async def test_a_small_projects_stream_is_read_through_its_index_whatever_the_plan(
    pool: asyncpg.Pool,
) -> None:
    """A project with few events in a log of many others: a page of its stream (`project_tail`,
    and the gateway's `project_pages`) must read that project's events, not walk the log from
    the cursor and skip the rest. Written as "project_id = $1 AND position > $2", the generic
    plan of the prepared statement did just that, and the gateway's walk did it in every plan."""
    async with pool.acquire() as conn:
        await _skewed_log(conn)
        tail = QUERIES["project_tail"].strip().rstrip(";")
        walk = QUERIES["project_pages"].strip().rstrip(";")
        for generic in (False, True):
            for plan in (
                await _plan(conn, tail, "'small', 0, 100", generic=generic),
                await _plan(conn, walk, "'{small,big-1}', '{0,0}', '{100,100}'", generic=generic),
            ):
                assert "events_project_position" in plan, plan
                assert "events_pkey" not in plan, plan
        rows = await conn.fetch(QUERIES["project_tail"], "small", 0, 100)
        assert len(rows) == 30
        assert [r["position"] for r in rows] == sorted(r["position"] for r in rows)
        assert {r["project_id"] for r in rows} == {"small"}
        later = await conn.fetch(QUERIES["project_tail"], "small", rows[9]["position"], 5)
        assert [r["position"] for r in later] == [r["position"] for r in rows[10:15]]
