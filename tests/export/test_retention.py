"""Archive retention against the real database: expiry by event, then the file; never twice.

A sweeper appends `export:archive-expired` to completed jobs whose archive is older than the
retention and then deletes the archive; failed and cancelled jobs, and archives inside the
retention, are left alone; concurrent sweepers append one event per job; a sweep that fails
on the database is retried and the sweeper carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from schemas.events import ArchiveExpired, ArchiveInfo, Completed, Queued, Started
from services.common.db import create_pool
from services.common.eventlog import EventLog, NewEvent
from services.common.queries import QUERIES
from services.export.app import create_app
from services.export.config import ExportConfig
from services.export.keys import TASKS
from services.export.retention import ACTOR, RetentionSweeper, parse_duration
from tests.export.conftest import ClientFactory, auth
from tests.support import cancelled, failed, new_job, wait_for

ARCHIVE = "export.zip"


# -- helpers ---------------------------------------------------------------------------------


async def completed_job(
    eventlog: EventLog, archive_root: Path, *, ago: timedelta | None = None, project: str = "p1"
) -> uuid.UUID:
    """A completed job with its archive on disk; `ago`: as if it had completed that long ago."""
    job_id = uuid.uuid4()
    now = datetime.now(UTC)
    at = now - ago if ago is not None else now
    archive = ArchiveInfo(file_name=ARCHIVE, size_bytes=5, sha256="00" * 32)
    await eventlog.append(
        job_id,
        0,
        [
            NewEvent(data=Queued(requested_by="alice"), actor="user:alice", occurred_at=at),
            NewEvent(data=Started(worker_id="w1"), actor="worker:w1", occurred_at=at),
            NewEvent(data=Completed(archive=archive), actor="worker:w1", occurred_at=at),
        ],
        project_id=project,
        owner_id="alice",
    )
    if ago is not None:
        # The projection row was created now; the job was created when it completed.
        async with eventlog.pool.acquire() as conn:
            await conn.execute(
                "UPDATE jobs SET created_at = now() - $2::interval WHERE job_id = $1", job_id, ago
            )
    write_archive(archive_root, job_id)
    return job_id


def write_archive(archive_root: Path, job_id: uuid.UUID) -> Path:
    folder = archive_root / str(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ARCHIVE
    path.write_bytes(b"PK..!")
    return path


async def expiries(pool: asyncpg.Pool, job_id: uuid.UUID) -> int:
    async with pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM events WHERE job_id = $1 AND type = 'export:archive-expired'",
            job_id,
        )
    return count


async def is_expired(eventlog: EventLog, job_id: uuid.UUID) -> bool:
    state = await eventlog.job_state(job_id)
    return state is not None and state.archive_expired


def sweeper_for(
    pool: asyncpg.Pool, config: ExportConfig, eventlog: EventLog | None = None, **changes: Any
) -> tuple[RetentionSweeper, CollectorRegistry]:
    registry = CollectorRegistry()
    sweeper = RetentionSweeper(
        pool,
        eventlog or EventLog(pool),
        dataclasses.replace(config, **changes),
        registry=registry,
    )
    return sweeper, registry


@contextlib.asynccontextmanager
async def running(*sweepers: RetentionSweeper) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run(), name="retention") for s in sweepers]
    try:
        yield
        for task in tasks:
            assert not task.done(), "a sweeper stopped by itself"
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def expired_count(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("export_archives_expired_total") or 0.0


def error_count(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("export_retention_sweep_errors_total") or 0.0


async def rounds_after(sweeper: RetentionSweeper, more: int) -> None:
    """Wait until the sweeper has finished `more` further rounds."""
    target = sweeper.rounds + more
    await wait_for(lambda: sweeper.rounds >= target)


# -- the setting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("", 0.0),
        ("0", 0.0),
        ("3600", 3600.0),
        ("0.25", 0.25),
        ("90m", 5400.0),
        ("36h", 129600.0),
        ("7d", 604800.0),
        ("1w", 604800.0),
        ("1d12h", 129600.0),
        (" 2H ", 7200.0),
    ],
)
def test_durations_are_read_in_seconds_or_with_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "7 days", "-1", "1d2", "h", "1e3"])
def test_a_bad_retention_is_refused_at_start(export_config: ExportConfig, text: str) -> None:
    with pytest.raises(ValueError, match="EXPORT_ARCHIVE_RETENTION"):
        create_app(dataclasses.replace(export_config, archive_retention=text))


async def test_the_app_sweeps_only_with_a_retention(make_client: ClientFactory) -> None:
    default = await make_client(workers=0)
    assert "retention" in [task.get_name() for task in default.app[TASKS]]
    forever = await make_client(workers=0, archive_retention="0")
    assert "retention" not in [task.get_name() for task in forever.app[TASKS]]
    metrics = await (await forever.get("/metrics")).text()
    assert "export_archives_expired_total 0.0" in metrics


# -- expiry ----------------------------------------------------------------------------------


async def test_an_expired_archive_gets_its_event_and_then_answers_410(
    make_client: ClientFactory, export_config: ExportConfig
) -> None:
    client = await make_client(archive_retention="1", retention_interval=0.05)
    response = await client.post("/projects/demo/export", headers=auth())
    assert response.status == 202, await response.text()
    job_id = (await response.json())["jobId"]
    url = f"/projects/demo/export/{job_id}"
    seen: dict[str, Any] = {}

    async def state() -> dict[str, Any]:
        response = await client.get(f"{url}/status", headers=auth())
        assert response.status == 200, await response.text()
        seen.update((await response.json())["state"])
        return seen

    async def finished() -> bool:
        return (await state())["status"] in ("completed", "failed", "cancelled")

    await wait_for(finished, timeout=30, interval=0.05)
    assert seen["status"] == "completed", seen
    folder = Path(export_config.archive_root) / job_id
    assert (folder / seen["archive"]["fileName"]).is_file() or seen["archiveExpired"]

    async def expired() -> bool:
        return bool((await state())["archiveExpired"])

    await wait_for(expired, timeout=10, interval=0.05)
    assert seen["status"] == "completed"  # the outcome stands; only the file is gone
    await wait_for(lambda: not folder.exists())

    page = await (await client.get(f"{url}/events?afterSeq=0", headers=auth())).json()
    last = page["events"][-1]
    assert last["type"] == "export:archive-expired"
    assert last["actor"] == ACTOR
    assert last["data"].get("reason", "retention") == "retention"  # the default is omitted
    assert [e["type"] for e in page["events"]].count("export:archive-expired") == 1

    gone = await client.get(f"{url}/download", headers=auth())
    assert gone.status == 410
    error = (await gone.json())["error"]
    assert error["code"] == "gone"
    assert "expired" in error["message"]
    assert "new export" in error["message"]

    metrics = await (await client.get("/metrics")).text()
    assert "export_archives_expired_total 1.0" in metrics


async def test_an_archive_inside_the_retention_is_untouched(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    recent = await completed_job(eventlog, root, ago=timedelta(minutes=50))
    old = await completed_job(eventlog, root, ago=timedelta(minutes=70))
    sweeper, registry = sweeper_for(
        pool, export_config, eventlog, archive_retention="1h", retention_interval=0.02
    )
    async with running(sweeper):
        await wait_for(lambda: is_expired(eventlog, old))
        await rounds_after(sweeper, 3)
    assert await expiries(pool, old) == 1
    assert not (root / str(old)).exists()
    assert await expiries(pool, recent) == 0
    assert (root / str(recent) / ARCHIVE).is_file()
    state = await eventlog.job_state(recent)
    assert state is not None
    assert not state.archive_expired
    assert expired_count(registry) == 1


async def test_failed_and_cancelled_jobs_are_not_touched(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    ended = []
    for outcome in (failed(), cancelled()):
        job_id = await new_job(eventlog)
        await eventlog.append(job_id, 2, [outcome])
        write_archive(root, job_id)  # whatever a crashed worker may have left
        ended.append(job_id)
    control = await completed_job(eventlog, root)
    sweeper, _ = sweeper_for(
        pool, export_config, eventlog, archive_retention="0.05", retention_interval=0.02
    )
    sweeper.leftover_scan_every = 0  # look for leftovers every round too
    async with running(sweeper):
        await wait_for(lambda: is_expired(eventlog, control))
        await rounds_after(sweeper, 3)
    for job_id in ended:
        assert await expiries(pool, job_id) == 0
        assert (root / str(job_id) / ARCHIVE).is_file()
        state = await eventlog.job_state(job_id)
        assert state is not None
        assert state.status in ("failed", "cancelled")
        assert state.seq == 3
    assert not (root / str(control)).exists()


async def test_batches_are_bounded_and_the_backlog_drains(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    jobs = [await completed_job(eventlog, root, ago=timedelta(days=8)) for _ in range(7)]
    sweeper, registry = sweeper_for(pool, export_config, eventlog, retention_batch=3)
    assert sweeper.retention == 7 * 86400  # the default
    result = await sweeper.sweep()
    assert (result.expired, result.removed, result.deferred) == (7, 7, 0)
    assert all([await expiries(pool, job_id) == 1 for job_id in jobs])
    assert not any((root / str(job_id)).exists() for job_id in jobs)
    again = await sweeper.sweep()
    assert (again.expired, again.removed) == (0, 0)
    assert expired_count(registry) == 7


# -- concurrency -----------------------------------------------------------------------------


async def test_two_sweepers_append_one_event_per_job(
    database_url: str, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    pools = [await create_pool(database_url, min_size=1, max_size=4) for _ in range(2)]
    try:
        logs = [EventLog(p) for p in pools]
        jobs = [await completed_job(logs[0], root) for _ in range(40)]
        pairs = [
            sweeper_for(
                p,
                export_config,
                log,
                archive_retention="0.01",
                retention_interval=0.005,
                retention_batch=3,
                worker_id=f"sweeper-{n}",
            )
            for n, (p, log) in enumerate(zip(pools, logs, strict=True))
        ]
        sweepers = [s for s, _ in pairs]
        for sweeper in sweepers:
            sweeper.leftover_scan_every = 0
        async with running(*sweepers):
            # And more rounds at once, beside the two loops.
            results = await asyncio.gather(*(s.sweep() for s in sweepers for _ in range(3)))

            async def all_expired() -> bool:
                return all([await is_expired(logs[1], job_id) for job_id in jobs])

            await wait_for(all_expired)
        async with pools[0].acquire() as conn:
            counts = await conn.fetch(
                "SELECT job_id, count(*) AS n FROM events"
                " WHERE type = 'export:archive-expired' GROUP BY job_id"
            )
        assert {row["job_id"]: row["n"] for row in counts} == dict.fromkeys(jobs, 1)
        assert sum(expired_count(registry) for _, registry in pairs) == len(jobs)
        assert sum(r.expired for r in results) <= len(jobs)
        await wait_for(lambda: not any((root / str(job_id)).exists() for job_id in jobs))
        for job_id in jobs:
            report = await logs[0].verify(job_id)
            assert report.ok, report
    finally:
        for p in pools:
            await p.close()


async def test_a_conflicting_append_is_left_for_the_next_round(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    jobs = [await completed_job(eventlog, root, ago=timedelta(days=30)) for _ in range(3)]
    sweeper, registry = sweeper_for(pool, export_config, eventlog)
    read = sweeper._candidates

    async def stale(conn: asyncpg.Connection) -> list[Any]:
        # As if the first job had moved on (a download's event) after it was read.
        rows = [dict(row) for row in await read(conn)]
        rows[0]["last_seq"] -= 1
        return rows

    sweeper._candidates = stale  # type: ignore[method-assign]
    first = await sweeper.sweep()
    assert (first.expired, first.deferred) == (2, 1)
    assert (root / str(jobs[0]) / ARCHIVE).is_file()
    assert await expiries(pool, jobs[0]) == 0

    sweeper._candidates = read  # type: ignore[method-assign]
    second = await sweeper.sweep()
    assert (second.expired, second.deferred) == (1, 0)
    assert [await expiries(pool, job_id) for job_id in jobs] == [1, 1, 1]
    assert not (root / str(jobs[0])).exists()
    assert expired_count(registry) == 3


# -- crashes and failures --------------------------------------------------------------------


async def test_an_archive_left_after_its_event_is_deleted_by_the_next_sweep(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    # A sweeper that stopped between the commit and the delete left these folders behind.
    orphans = [await completed_job(eventlog, root) for _ in range(2)]
    for job_id in orphans:
        state = await eventlog.job_state(job_id)
        assert state is not None
        await eventlog.append(job_id, state.seq, [NewEvent(data=ArchiveExpired(), actor=ACTOR)])
    live = await completed_job(eventlog, root)
    unknown = write_archive(root, uuid.uuid4())
    (root / "not-a-job").mkdir()

    sweeper, registry = sweeper_for(pool, export_config, eventlog, archive_retention="1h")
    result = await sweeper.sweep()  # a new process: its first round looks for leftovers
    assert (result.expired, result.removed) == (0, 2)
    assert not any((root / str(job_id)).exists() for job_id in orphans)
    assert (root / str(live) / ARCHIVE).is_file()
    assert unknown.is_file()
    assert (root / "not-a-job").is_dir()
    assert [await expiries(pool, job_id) for job_id in orphans] == [1, 1]
    assert expired_count(registry) == 0  # nothing expired now: the events were there already


async def test_the_sweeper_survives_database_errors(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig, database_url: str
) -> None:
    root = Path(export_config.archive_root)
    own = await create_pool(
        database_url,
        min_size=1,
        max_size=2,
        server_settings={"application_name": "retention-under-test"},
    )
    sweeper, registry = sweeper_for(
        own, export_config, archive_retention="0.01", retention_interval=0.01
    )
    admin = await asyncpg.connect(database_url)
    try:
        async with running(sweeper):
            first = await completed_job(eventlog, root)
            await wait_for(lambda: is_expired(eventlog, first))

            # The table it reads is gone for a while.
            await admin.execute("ALTER TABLE jobs RENAME TO jobs_away")
            await wait_for(lambda: error_count(registry) >= 2)
            await admin.execute("ALTER TABLE jobs_away RENAME TO jobs")
            second = await completed_job(eventlog, root)
            await wait_for(lambda: is_expired(eventlog, second))

            # Its connections are cut.
            errors = error_count(registry)
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'retention-under-test'"
            )
            assert killed >= 1
            third = await completed_job(eventlog, root)
            await wait_for(lambda: is_expired(eventlog, third))
            assert error_count(registry) >= errors
        for job_id in (first, second, third):
            assert await expiries(pool, job_id) == 1
        await wait_for(lambda: not any((root / str(j)).exists() for j in (first, second, third)))
        assert expired_count(registry) == 3
    finally:
        await admin.close()
        await own.close()


async def test_a_stopping_sweeper_finishes_its_batch(
    pool: asyncpg.Pool, eventlog: EventLog, export_config: ExportConfig
) -> None:
    root = Path(export_config.archive_root)
    jobs = [await completed_job(eventlog, root, ago=timedelta(days=30)) for _ in range(4)]
    sweeper, _ = sweeper_for(pool, export_config, eventlog, retention_batch=2)
    in_batch = asyncio.Event()
    release = asyncio.Event()
    read = sweeper._candidates

    async def slow(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        rows = await read(conn)
        in_batch.set()
        await release.wait()
        return rows

    sweeper._candidates = slow  # type: ignore[method-assign]
    task = asyncio.create_task(sweeper.run())
    await asyncio.wait_for(in_batch.wait(), 10)
    task.cancel()
    await wait_for(lambda: sweeper._stopping)  # the cancellation reached run(), not the batch
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    expired = [job_id for job_id in jobs if await expiries(pool, job_id) == 1]
    assert len(expired) == 2  # the batch in flight committed; no further batch started
    assert all(not (root / str(job_id)).exists() for job_id in expired)


# -- the query -------------------------------------------------------------------------------


async def test_the_expiry_query_reads_the_partial_index(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in await conn.fetch(
                "EXPLAIN "
                + QUERIES["expirable_archives"].replace("$1", "3600").replace("$2", "100")
            )
        )
    assert "jobs_archive_live" in plan, plan
