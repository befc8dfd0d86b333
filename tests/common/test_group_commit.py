"""Group commit: appends of many jobs that arrive together share one transaction, and every
guarantee of the log holds for each of them as if it had been written alone.

Also the database's set-based check of inserted rows (migration 0006), which is what guards the
rows `append_events` writes with their hashes already computed: each rule is tried here with a
row that brings a correct hash, so that only that check can refuse it.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from schemas.chain import GENESIS_HASH, ChainLink, event_hash
from schemas.state import replay
from services.common.eventlog import (
    AppendMetrics,
    AppendRequest,
    AppendResult,
    ConflictError,
    EventLog,
    GroupCommit,
    JobClosedError,
    NewEvent,
    _packed,
)
from services.common.queries import QUERIES
from tests.support import cancelled, new_job, progress, queued, wait_for


def grouped(pool: asyncpg.Pool, *, in_flight: int = 1, max_batch: int = 500) -> EventLog:
    return EventLog(pool, group_commit=GroupCommit(max_batch=max_batch, in_flight=in_flight))


async def _jobs(log: EventLog, count: int) -> list[uuid.UUID]:
    return list(await asyncio.gather(*(new_job(log) for _ in range(count))))


async def test_appends_arriving_together_share_transactions(pool: asyncpg.Pool) -> None:
    log = grouped(pool)
    jobs = await _jobs(log, 60)
    before = log.batches
    rounds = 5
    for round_ in range(rounds):
        results = await asyncio.gather(
            *(log.append(job, 2 + round_, [progress(round_ + 1.0)]) for job in jobs)
        )
        assert all(isinstance(r, AppendResult) and not r.duplicate for r in results)
    transactions = log.batches - before
    # One transaction leaves at once; everything that queued behind it leaves in the next.
    assert transactions <= 2 * rounds < len(jobs) * rounds
    for job in jobs:
        events = await log.read_stream(job)
        assert [e.seq for e in events] == list(range(1, 3 + rounds))
        assert (await log.verify(job)).ok
        assert await log.job_state(job) == replay(events)


async def test_a_few_appends_wait_for_the_transaction_under_way(pool: asyncpg.Pool) -> None:
    """While a transaction is under way, fewer than `min_alongside` appends wait for it and then
    leave together; that many start a transaction of their own at once."""
    log = EventLog(pool, group_commit=GroupCommit(in_flight=3, min_alongside=5, max_wait=600))
    blocked, *jobs = await _jobs(log, 9)
    async with pool.acquire() as holder, holder.transaction():
        # The first transaction waits for this row lock: it stays under way.
        await holder.execute("SELECT 1 FROM jobs WHERE job_id = $1 FOR UPDATE", blocked)
        first = asyncio.ensure_future(log.append(blocked, 2, [progress(1)]))
        await wait_for(lambda: log._in_flight == 1 and not log._waiting)
        before = (log.batches, log.appends_batched)
        few = [asyncio.ensure_future(log.append(job, 2, [progress(1)])) for job in jobs[:4]]
        # Four wait (no second transaction), the fifth starts one with all five.
        await wait_for(lambda: len(log._waiting) == 4)
        assert log._in_flight == 1
        few.append(asyncio.ensure_future(log.append(jobs[4], 2, [progress(1)])))
        await asyncio.gather(*few)
        assert (log.batches, log.appends_batched) == (before[0] + 1, before[1] + 5)
        # Below the threshold again: these wait for the blocked transaction to end.
        rest = [asyncio.ensure_future(log.append(job, 2, [progress(1)])) for job in jobs[5:8]]
        await wait_for(lambda: len(log._waiting) == 3)
        assert not first.done()
    await first
    await asyncio.gather(*rest)
    # They left together, in one transaction after the blocked one.
    assert (log.batches, log.appends_batched) == (before[0] + 3, before[1] + 5 + 1 + 3)
    for job in [blocked, *jobs[:8]]:
        assert [e.seq for e in await log.read_stream(job)] == [1, 2, 3]


async def test_a_held_up_transaction_delays_the_others_by_max_wait_at_most(
    pool: asyncpg.Pool,
) -> None:
    """An append behind a transaction that cannot finish (its job row is locked elsewhere)
    starts a transaction of its own once it has waited `max_wait`, however few wait."""
    log = EventLog(pool, group_commit=GroupCommit(in_flight=2, min_alongside=50, max_wait=0.05))
    blocked, free = await _jobs(log, 2)
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM jobs WHERE job_id = $1 FOR UPDATE", blocked)
        first = asyncio.ensure_future(log.append(blocked, 2, [progress(1)]))
        await wait_for(lambda: log._in_flight == 1 and not log._waiting)
        result = await asyncio.wait_for(log.append(free, 2, [progress(1)]), timeout=5)
        assert result.last_seq == 3
        assert not first.done()
    assert (await first).last_seq == 3


async def test_a_refused_append_in_a_group_fails_alone(pool: asyncpg.Pool) -> None:
    log = grouped(pool)
    good = await _jobs(log, 20)
    stale, closed = await _jobs(log, 2)
    await log.append(closed, 2, [cancelled()])
    blocker = await new_job(log)
    fresh = uuid.uuid4()
    before = log.batches

    async def attempt(job: uuid.UUID, expected: int) -> object:
        try:
            return await log.append(job, expected, [progress(50)])
        except (ConflictError, JobClosedError) as exc:
            return exc

    # The blocker's transaction leaves first; everything else queues behind it, together.
    outcomes = await asyncio.gather(
        attempt(blocker, 2),
        *(attempt(job, 2) for job in good),
        attempt(stale, 1),
        attempt(closed, 3),
        log.append(fresh, 0, [queued()], project_id="p1", owner_id="alice"),
    )
    assert log.batches - before == 2
    assert isinstance(outcomes[-3], ConflictError)
    assert outcomes[-3].actual_seq == 2
    assert isinstance(outcomes[-2], JobClosedError)
    assert all(isinstance(r, AppendResult) for r in outcomes[: 1 + len(good)])
    assert isinstance(outcomes[-1], AppendResult)
    for job in good:
        assert [e.seq for e in await log.read_stream(job)] == [1, 2, 3]
    assert [e.seq for e in await log.read_stream(stale)] == [1, 2]
    assert [e.seq for e in await log.read_stream(closed)] == [1, 2, 3]
    assert [e.type for e in await log.read_stream(fresh)] == ["export:queued"]


async def test_a_group_sends_at_most_one_notify(pool: asyncpg.Pool) -> None:
    log = EventLog(pool, notify=True, group_commit=GroupCommit(in_flight=1))
    jobs = await _jobs(log, 40)
    heard: list[str] = []
    listener = await pool.acquire()
    try:
        await listener.add_listener("exportlog_events", lambda *args: heard.append(args[3]))
        before = log.batches
        await asyncio.gather(*(log.append(job, 2, [progress(1)]) for job in jobs))
        transactions = log.batches - before
        # Notifications arrive in commit order: once the marker sent afterwards is heard, every
        # notification of the appends has been heard too.
        async with pool.acquire() as conn:
            await conn.execute("NOTIFY exportlog_events, 'marker'")
        await wait_for(lambda: "marker" in heard)
    finally:
        await listener.reset()
        await pool.release(listener)
    assert len(heard) - 1 == transactions < len(jobs)


async def test_a_tail_never_skips_under_group_commit(pool: asyncpg.Pool) -> None:
    log = grouped(pool, in_flight=3, max_batch=16)
    jobs = await _jobs(log, 48)
    start = await log.head_position()
    seen: list[int] = []
    done = asyncio.Event()

    async def writer(job: uuid.UUID) -> None:
        seq = 2
        for value in range(1, 9):
            seq = (await log.append(job, seq, [progress(float(value))])).last_seq

    async def reader() -> None:
        cursor = start
        while True:
            finished = done.is_set()
            page = await log.tail(cursor, limit=50)
            for event in page:
                seen.append(event.position)
                cursor = event.position
            if finished and not page:
                return
            if not page:
                await asyncio.sleep(0)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(job) for job in jobs))
    done.set()
    await asyncio.wait_for(reading, 30)
    everything = [e.position for e in await log.tail(start, limit=10_000)]
    assert len(everything) == 48 * 8
    assert seen == everything


async def test_a_job_twice_in_one_group_is_written_in_order(pool: asyncpg.Pool) -> None:
    log = grouped(pool)
    blocker, job = await _jobs(log, 2)
    first = asyncio.ensure_future(log.append(blocker, 2, [progress(1)]))
    # Both appends of `job` queue behind the blocker and leave in one transaction.
    second = asyncio.ensure_future(log.append(job, 2, [progress(1)]))
    third = asyncio.ensure_future(log.append(job, 3, [progress(2), progress(3)]))
    results = await asyncio.gather(first, second, third)
    assert [(r.first_seq, r.last_seq) for r in results[1:]] == [(3, 3), (4, 5)]
    assert (await log.verify(job)).ok


_APPEND_EVENTS = (
    "SELECT * FROM append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
    " $15, $16)"
)


async def test_the_database_refuses_one_job_twice_in_one_call(pool: asyncpg.Pool) -> None:
    log = EventLog(pool)
    job = await new_job(log)
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(
                _APPEND_EVENTS,
                [job, job], [2, 3], [1, 1], ["", ""], ["", ""], ["running", "running"],
                ["{}", "{}"], [1, 2], [uuid.uuid4(), uuid.uuid4()],
                ["export:progress"] * 2, ["{}"] * 2, ["t"] * 2, [datetime.now(UTC)] * 2,
                [3, 4], [None, None], [None, None],
            )  # fmt: skip
    assert info.value.sqlstate == "22023"


@pytest.mark.parametrize(
    ("numbers", "counts"),
    [
        ([1, 1], [1, 1]),
        ([1, 3], [1, 1]),
        ([1, 2], [2, 1]),
        ([0, 1], [1, 1]),
        ([-1, 2], [1, 1]),
        ([1, 2], [None, 1]),
    ],
    ids=[
        "an append without events",
        "a number out of range",
        "a count too high",
        "number 0",
        "a negative number in place of 1",
        "a count missing",
    ],
)
async def test_the_database_refuses_appends_numbered_unlike_their_counts(
    pool: asyncpg.Pool, numbers: list[int], counts: list[int | None]
) -> None:
    """Migration 0009 reads everything an append carries by its number: numbers that do not run
    1 to n, or counts that do not match the events, would misfile it, so the call is refused
    before anything is written (0014 closed the last two cases)."""
    log = EventLog(pool)
    jobs = [await new_job(log), await new_job(log)]
    async with pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM events")
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(
                _APPEND_EVENTS,
                jobs, [1, 1], counts, ["", ""], ["", ""], ["running", "running"],
                ["{}", "{}"], numbers, [uuid.uuid4(), uuid.uuid4()],
                ["export:progress"] * 2, ["{}"] * 2, ["t"] * 2, [datetime.now(UTC)] * 2,
                [2, 2], [None, None], [None, None],
            )  # fmt: skip
        assert info.value.sqlstate == "22023"
        assert await conn.fetchval("SELECT count(*) FROM events") == before


_INNER = re.compile(r":(?:\w+\.)*righttree\s*\{(\w+)")
_BELOW = re.compile(r":(?:\w+\.)*lefttree\s*\{(\w+)")


def _nested_loop_inners(plan: str) -> list[str]:
    """The node type on the inner side of every nested loop of a plan tree as PostgreSQL prints
    it with debug_print_plan (``{NESTLOOP … :righttree {…}}``; version 16 names the field
    ``:join.plan.righttree``); through a Material node, the node it materialises."""
    inners: list[str] = []
    for found in re.finditer(r"\{NESTLOOP\s", plan):
        depth = 0
        for at in range(found.start(), len(plan)):
            char = plan[at]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    break
            elif depth == 1 and char == ":" and (inner := _INNER.match(plan, at)):
                kind = inner[1]
                if kind == "MATERIAL":
                    below = _BELOW.search(plan, inner.end())
                    kind = f"MATERIAL {below[1] if below else '?'}"
                inners.append(kind)
                break
    return inners


async def test_an_append_call_never_rescans_a_set_per_append(database_url: str) -> None:
    """Migration 0009: with a grown jobs table (analysed), the generic plan of 0007 joined the
    rows written to the verdicts by scanning every verdict again for each row, quadratic in the
    batch (78 ms of a 110 ms call of 300 appends). No statement of the call may put a computed
    set (a WITH query, a function's rows) on the inner side of a nested loop, where it is
    scanned again for every outer row. The plans are read as PostgreSQL prints them when it
    makes them (debug_print_plan), which needs no extension."""
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(
            "INSERT INTO jobs (job_id, project_id, owner_id, status, state)"
            " SELECT gen_random_uuid(), 'elsewhere', 'someone', 'completed', '{}'"
            " FROM generate_series(1, 20000)"
        )
        await admin.execute("ANALYZE jobs")
    finally:
        await admin.close()
    plans: list[str] = []
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        log = EventLog(pool)
        async with pool.acquire() as conn:
            await conn.execute("SET debug_print_plan = on; SET client_min_messages = log")

            def listen(_conn: asyncpg.Connection, message: asyncpg.PostgresLogMessage) -> None:
                plans.append(f"{message.message} {message.detail or ''}")

            conn.add_log_listener(listen)
            try:
                jobs = [uuid.uuid4() for _ in range(120)]
                created = await log.append_many(
                    [
                        AppendRequest(
                            job_id=job, expected_seq=0, events=[queued()],
                            project_id="p1", owner_id="o1",
                        )
                        for job in jobs
                    ],
                    conn=conn,
                )  # fmt: skip
                assert all(isinstance(r, AppendResult) for r in created)
                requests = [
                    AppendRequest(job_id=job, expected_seq=1, events=[progress(1)]) for job in jobs
                ]
                requests.append(
                    AppendRequest(job_id=uuid.uuid4(), expected_seq=3, events=[progress(2)])
                )
                later = await log.append_many(requests, conn=conn)
                assert [type(r) for r in later] == [AppendResult] * 120 + [ConflictError]
            finally:
                conn.remove_log_listener(listen)
                await conn.execute("RESET debug_print_plan; RESET client_min_messages")
    finally:
        await pool.close()
    inners = [inner for plan in plans for inner in _nested_loop_inners(plan)]
    # The plans were read: the call's lookups by key are nested loops over an index.
    assert "INDEXSCAN" in inners, plans[:3]
    rescanned = [i for i in inners if i.split()[-1] in {"CTESCAN", "FUNCTIONSCAN"}]
    assert rescanned == []


# -- the set-based check of rows that bring their hash -----------------------------------------


async def _insert_hashed(
    pool: asyncpg.Pool,
    job_id: uuid.UUID,
    seq: int,
    type_: str,
    *,
    prev_hash: bytes | None = None,
    project: str = "p1",
    owner: str = "alice",
    spoil_hash: bool = False,
) -> None:
    """Insert an event with a hash computed as the database would, linked to the stored
    predecessor unless `prev_hash` says otherwise."""
    async with pool.acquire() as conn:
        if prev_hash is None:
            stored = await conn.fetchval(
                "SELECT hash FROM events WHERE job_id = $1 AND seq = $2", job_id, seq - 1
            )
            prev_hash = bytes(stored) if stored is not None else GENESIS_HASH
        occurred = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
        link = ChainLink(
            job_id=job_id, seq=seq, event_id=uuid.uuid4(), type=type_, actor="t",
            project_id=project, owner_id=owner, occurred_at=occurred, data="{}",
            prev_hash=prev_hash, hash=b"",
        )  # fmt: skip
        digest = event_hash(prev_hash, link)
        if spoil_hash:
            digest = bytes(32)
        await conn.execute(
            """
            INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id, owner_id,
                                occurred_at, prev_hash, hash)
            VALUES ($1, $2, $3, $4, $5::json, $6, $7, $8, $9, $10, $11)
            """,
            link.job_id, link.seq, link.event_id, link.type, link.data, link.actor,
            link.project_id, link.owner_id, link.occurred_at, prev_hash, digest,
        )  # fmt: skip


async def test_a_row_with_a_correct_hash_is_accepted(pool: asyncpg.Pool) -> None:
    log = EventLog(pool)
    job = await new_job(log)
    await _insert_hashed(pool, job, 3, "export:progress")
    assert (await log.verify(job)).ok


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("spoiled hash", "EL005"),
        ("wrong link", "EL005"),
        ("gap", "EL001"),
        ("other project", "EL004"),
        ("other owner", "EL004"),
        ("download before completion", "EL002"),
        ("first event of the download phase", "EL002"),
        ("after cancelled", "EL002"),
    ],
)
async def test_the_set_based_check_refuses_each_broken_rule(
    pool: asyncpg.Pool, case: str, code: str
) -> None:
    log = EventLog(pool)
    job = await new_job(log)
    row: dict[str, object] = {"job_id": job, "seq": 3, "type_": "export:progress"}
    if case == "spoiled hash":
        row["spoil_hash"] = True
    elif case == "wrong link":
        row["prev_hash"] = bytes(range(32))
    elif case == "gap":
        row.update(seq=4, prev_hash=GENESIS_HASH)
    elif case == "other project":
        row["project"] = "p2"
    elif case == "other owner":
        row["owner"] = "mallory"
    elif case == "download before completion":
        row["type_"] = "export:download-started"
    elif case == "first event of the download phase":
        row.update(job_id=uuid.uuid4(), seq=1, type_="export:download-started")
    elif case == "after cancelled":
        await log.append(job, 2, [cancelled()])
        row["seq"] = 4
    with pytest.raises(asyncpg.PostgresError) as info:
        await _insert_hashed(pool, **row)  # type: ignore[arg-type]
    assert info.value.sqlstate == code, info.value


async def test_lease_renewals_and_group_commits_never_deadlock(pool: asyncpg.Pool) -> None:
    """Every statement that locks several job rows locks them in job id order, as a group
    commit does; a renewal of many leases that locked them in table order deadlocked with it."""
    log = grouped(pool, in_flight=2, max_batch=8)
    jobs = await _jobs(log, 24)
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE jobs SET lease_owner = 'w', lease_expires_at = now() + interval '1 minute'"
            " WHERE job_id = ANY ($1::uuid[])",
            jobs,
        )
    seqs = dict.fromkeys(jobs, 2)

    async def appends() -> None:
        for round_ in range(6):
            results = await asyncio.gather(
                *(log.append(job, seqs[job], [progress(round_ + 1.0)]) for job in jobs)
            )
            for result in results:
                seqs[result.job_id] = result.last_seq

    async def renewals() -> None:
        for _ in range(40):
            async with pool.acquire() as conn:
                rows = await conn.fetch(QUERIES["renew_leases"], "w", list(reversed(jobs)), 60)
            assert len(rows) == len(jobs)

    await asyncio.wait_for(asyncio.gather(appends(), renewals(), renewals()), 60)
    assert all(seq == 8 for seq in seqs.values())


async def test_metrics_count_every_append_once_whichever_way_it_came(pool: asyncpg.Pool) -> None:
    registry = CollectorRegistry()
    log = EventLog(pool, group_commit=GroupCommit(), metrics=AppendMetrics(registry, "t"))
    first, second = await _jobs(log, 2)  # 2 × (queued, started), through group commit
    await log.append_many(
        [
            AppendRequest(job_id=first, expected_seq=2, events=[progress(1), progress(2)]),
            AppendRequest(job_id=second, expected_seq=1, events=[progress(1)]),  # stale
        ]
    )
    with pytest.raises(JobClosedError):
        await log.append(second, 2, [cancelled(), progress(3)])

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert value("t_events_appended_total", type="export:queued") == 2
    assert value("t_events_appended_total", type="export:started") == 2
    assert value("t_events_appended_total", type="export:progress") == 2
    assert value("t_appends_refused_total", reason="conflict") == 1
    assert value("t_appends_refused_total", reason="closed") == 1
    assert value("t_append_seconds_count") == 4


async def test_an_append_the_statement_refuses_fails_alone(pool: asyncpg.Pool) -> None:
    """An event id already used by another job breaks the batch's statement (its unique index):
    the group's other appends are written all the same, and only that one fails."""
    log = grouped(pool)
    blocker, other, *good = await _jobs(log, 8)
    (taken,) = await log.read_stream(other, after_seq=1)
    reused = NewEvent(data=progress(5).data, actor="t", event_id=taken.event_id)
    outcomes = await asyncio.gather(
        log.append(blocker, 2, [progress(1)]),
        *(log.append(job, 2, [progress(1)]) for job in good),
        log.append(good[0], 3, [reused]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[-1], asyncpg.UniqueViolationError)
    assert all(isinstance(r, AppendResult) for r in outcomes[:-1])
    for job in good:
        assert [e.seq for e in await log.read_stream(job)] == [1, 2, 3]
    # The projection, updated before the insert (0012), went back with the refused append.
    for job in [blocker, *good]:
        state = await EventLog(pool).job_state(job)
        assert state is not None
        assert state.seq == 3
        assert state == replay(await log.read_stream(job))


async def test_events_out_of_order_within_one_append_are_refused_alone(pool: asyncpg.Pool) -> None:
    log = grouped(pool)
    blocker, job, other = await _jobs(log, 3)
    outcomes = await asyncio.gather(
        log.append(blocker, 2, [progress(1)]),
        log.append(job, 2, [cancelled(), progress(3)]),
        log.append(other, 2, [progress(1)]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], JobClosedError)
    assert isinstance(outcomes[0], AppendResult)
    assert isinstance(outcomes[2], AppendResult)
    assert [e.seq for e in await log.read_stream(job)] == [1, 2]


# -- the writer chains, the database checks (migration 0007) -----------------------------------


async def _arguments(log: EventLog, conn: asyncpg.Connection, request: AppendRequest) -> list[Any]:
    """The arguments the writer would send to `append_events` for one append."""
    return log._arguments(await log._prepare(conn, [request]))


_HASHES = 15
_PREVS = 14
_STATUSES = 5


async def test_the_writer_chains_what_the_database_would(pool: asyncpg.Pool) -> None:
    """Hashes the writer computes are the ones the database recomputes, whatever the text (not
    ASCII, empty) or the clock (a naive datetime is local time, as the driver sends it); a
    writer that knows nothing of the job (another process) reads its head first."""
    log = EventLog(pool)
    job = await new_job(log, project="prøject", owner="zoë")
    naive = NewEvent(data=progress(0.5).data, actor="wörker:1", occurred_at=datetime.now())
    await log.append(job, 2, [naive, progress(0.6), progress(0.7)])
    stranger = EventLog(pool)
    await stranger.append(job, 5, [NewEvent(data=progress(0.8).data, actor="")])
    assert (await log.verify(job)).ok
    async with pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["chain_links"], job)
    prev = GENESIS_HASH
    for row in rows:
        link = ChainLink(**{k: row[k] for k in ChainLink.__struct_fields__ if k in row})
        assert link.prev_hash == prev
        assert link.hash == event_hash(prev, link)
        prev = link.hash


@pytest.mark.parametrize("spoil", [_HASHES, _PREVS])
async def test_a_hash_the_writer_got_wrong_is_refused(pool: asyncpg.Pool, spoil: int) -> None:
    log = EventLog(pool)
    job = await new_job(log)
    request = AppendRequest(job_id=job, expected_seq=2, events=[progress(0.5)])
    async with pool.acquire() as conn:
        arguments = await _arguments(log, conn, request)
        arguments[spoil] = [bytes(32)]
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(QUERIES["append_events"], *arguments)
    assert info.value.sqlstate == "EL005"
    assert [e.seq for e in await log.read_stream(job)] == [1, 2]


async def test_rows_without_a_hash_are_chained_by_the_database(pool: asyncpg.Pool) -> None:
    log = EventLog(pool)
    job = await new_job(log)
    request = AppendRequest(job_id=job, expected_seq=2, events=[progress(0.5), progress(0.6)])
    async with pool.acquire() as conn:
        arguments = await _arguments(log, conn, request)
        arguments[_PREVS] = arguments[_HASHES] = [None, None]
        (row,) = await conn.fetch(QUERIES["append_events"], *arguments)
    assert (row["result"], row["current_seq"]) == ("ok", 4)
    assert (await log.verify(job)).ok


async def test_an_append_the_writer_could_not_fold_is_never_accepted(pool: asyncpg.Pool) -> None:
    """A writer that does not know the job at the expected seq sends no state ('' status): even
    if the job has reached that seq meanwhile, the database answers conflict rather than write
    a projection from nothing."""
    log = EventLog(pool)
    job = await new_job(log)
    request = AppendRequest(job_id=job, expected_seq=2, events=[progress(0.5)])
    async with pool.acquire() as conn:
        arguments = await _arguments(log, conn, request)
        arguments[_STATUSES] = [""]
        (row,) = await conn.fetch(QUERIES["append_events"], *arguments)
    assert (row["result"], row["current_seq"]) == ("conflict", 2)
    assert [e.seq for e in await log.read_stream(job)] == [1, 2]
    assert (await log.job_state(job)) == replay(await log.read_stream(job))


INSERT_WITHOUT_HASH = """
    INSERT INTO events (job_id, seq, event_id, type, data, actor, project_id, owner_id,
                        occurred_at)
    VALUES ($1, $2, $3, $4, $5::json, 'user:a', 'p1', 'alice', now())
"""


PROGRESS_JSON = '{"phase": "processing", "progress": 1, "phaseProgress": 1}'


async def _index_counters(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes"
        " WHERE relname = 'events'"
    )
    return {r["indexrelname"]: (r["idx_scan"], r["idx_tup_read"]) for r in rows}


async def test_a_row_without_a_hash_reads_only_its_predecessor_in_a_new_database(
    database_url: str,
) -> None:
    """Migration 0008: on a log without statistics the row trigger's lookup of a hash-less row's
    predecessor walked every event of the job through (job_id, position), once its plan was
    made. It must read by key. The index counters are read from another session once the
    writer's are flushed (the statement check's scan of (job_id, seq) says when)."""
    writer = await asyncpg.connect(database_url)
    reader = await asyncpg.connect(database_url)
    try:
        before = await _index_counters(reader)
        job = uuid.uuid4()
        await writer.execute(INSERT_WITHOUT_HASH, job, 1, uuid.uuid4(), "export:queued", "{}")
        for seq in range(2, 301):
            await writer.execute(
                INSERT_WITHOUT_HASH, job, seq, uuid.uuid4(), "export:progress", PROGRESS_JSON
            )
        await writer.execute("SELECT pg_stat_force_next_flush()")
        after = before

        async def flushed() -> bool:
            nonlocal after
            after = await _index_counters(reader)
            return (
                after.get("events_job_seq", (0, 0))[0]
                >= before.get("events_job_seq", (0, 0))[0] + 299
            )

        await wait_for(flushed, timeout=30, interval=0.05)
        walked = after["events_job_position"][1] - before.get("events_job_position", (0, 0))[1]
        assert walked < 300, f"the lookups read {walked} rows through (job_id, position)"
        assert await writer.fetchval("SELECT max(seq) FROM events WHERE job_id = $1", job) == 300
    finally:
        await writer.close()
        await reader.close()


# -- packed arguments (migration 0013) -----------------------------------------------------------


async def test_the_writer_sends_its_texts_times_and_hashes_packed(pool: asyncpg.Pool) -> None:
    """A batch of several appends goes packed: each text, time and hash array as one text."""
    log = EventLog(pool)
    jobs = await _jobs(log, 3)
    requests = [AppendRequest(job_id=job, expected_seq=2, events=[progress(0.5)]) for job in jobs]
    async with pool.acquire() as conn:
        packed = _packed(log._arguments(await log._prepare(conn, requests)))
    assert packed is not None
    assert all(isinstance(packed[index], str) for index in (3, 4, 5, 6, 9, 10, 11, 12, 14, 15))
    assert packed[12].count("\x1f") == 2
    assert all(isinstance(packed[index], list) for index in (0, 1, 2, 7, 8, 13))


async def test_packed_fields_keep_empty_and_missing_elements(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT unpack_fields('')") == [""]
        assert await conn.fetchval("SELECT unpack_fields('', '')") == [None]
        assert await conn.fetchval("SELECT unpack_fields(E'a\\x1f\\x1fb')") == ["a", "", "b"]
        assert await conn.fetchval("SELECT unpack_fields(E'\\x1fb', '')") == [None, "b"]


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 24, 5, 30, 0, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 2, 30, 0, 654321),  # naive: local time, as the driver takes it
    ],
)
async def test_packed_event_times_are_stored_to_the_microsecond(
    pool: asyncpg.Pool, moment: datetime
) -> None:
    log = EventLog(pool)
    job = await new_job(log)
    event = NewEvent(data=progress(0.5).data, actor="worker:w1", occurred_at=moment)
    await log.append(job, 2, [event, progress(0.6)])
    stored = (await log.read_stream(job))[2].occurred_at
    expected = moment if moment.tzinfo is not None else moment.astimezone(UTC)
    assert stored == expected
    assert (await log.verify(job)).ok


async def test_a_text_holding_the_separator_goes_as_arrays(pool: asyncpg.Pool) -> None:
    """Projects, owners and actors are the caller's: one that holds the separator makes its
    call go as arrays, whole and in order, alongside appends that hold none."""
    log = grouped(pool)
    odd = await new_job(log, project="p\x1f1", owner="al\x1fice")
    plain = await new_job(log)
    strange = NewEvent(data=progress(0.5).data, actor="worker:\x1fw1")
    request = AppendRequest(job_id=plain, expected_seq=2, events=[strange])
    async with pool.acquire() as conn:
        assert _packed(log._arguments(await log._prepare(conn, [request]))) is None
    results = await asyncio.gather(
        log.append(odd, 2, [progress(0.5)]), log.append(plain, 2, [strange, progress(0.6)])
    )
    assert [r.last_seq for r in results] == [3, 4]
    odd_events = await log.read_stream(odd)
    assert {(e.project_id, e.actor) for e in odd_events[:1]} == {("p\x1f1", "user:al\x1fice")}
    assert [e.actor for e in await log.read_stream(plain)][2:] == ["worker:\x1fw1", "worker:w1"]
    assert (await log.verify(odd)).ok
    assert (await log.verify(plain)).ok


async def test_a_lone_append_the_writer_cannot_fold_goes_packed_and_conflicts(
    pool: asyncpg.Pool,
) -> None:
    """One append whose status is unknown packs to '' (one empty element, not none)."""
    log = EventLog(pool)
    job = await new_job(log)
    stranger = EventLog(pool)
    request = AppendRequest(job_id=job, expected_seq=7, events=[progress(0.5)])
    async with pool.acquire() as conn:
        packed = _packed(stranger._arguments(await stranger._prepare(conn, [request])))
        assert packed is not None
        assert packed[5] == ""
        (row,) = await conn.fetch(QUERIES["append_events_packed"], *packed)
    assert (row["result"], row["current_seq"]) == ("conflict", 2)
