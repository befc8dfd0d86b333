"""Migrations: applied in order, recorded, safe to run twice and from several processes at once."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from services.common.db import (
    MigrationError,
    check_server_settings,
    load_migrations,
    migrate,
    pending_migrations,
)


async def test_migrations_apply_to_an_empty_database(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        versions = [m.version for m in load_migrations()]
        assert versions == sorted(versions)
        assert versions[0] == 1
        assert await pending_migrations(conn) == versions
        assert await migrate(conn) == versions
        assert await pending_migrations(conn) == []
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {"events", "jobs", "schema_migrations"} <= tables
        assert await migrate(conn) == []  # the second run changes nothing
    finally:
        await conn.close()


async def test_concurrent_runs_apply_each_migration_once(empty_database_url: str) -> None:
    conns = [await asyncpg.connect(empty_database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [v for r in results for v in r]
        assert sorted(applied) == [m.version for m in load_migrations()]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(applied)
    finally:
        for conn in conns:
            await conn.close()


async def test_a_changed_applied_migration_is_an_error(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrations = load_migrations()
        await migrate(conn, migrations)
        edited = [dataclasses.replace(migrations[0], sql=migrations[0].sql + "\n-- edited")]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, edited)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_half_done(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        good = load_migrations()
        broken = dataclasses.replace(
            good[-1], version=good[-1].version + 1, name="broken",
            sql="CREATE TABLE half_done (x int); SELECT no_such_function();",
        )  # fmt: skip
        with pytest.raises(asyncpg.PostgresError):
            await migrate(conn, [*good, broken])
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        recorded = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        assert recorded == good[-1].version
    finally:
        await conn.close()


async def test_a_server_without_autovacuum_is_reported(database_url: str) -> None:
    """The projection is rewritten by every append: a server that never vacuums it is named at
    start-up. track_counts can be switched off for one session; autovacuum needs it."""
    conn = await asyncpg.connect(database_url)
    try:
        vacuums = await conn.fetchval("SELECT current_setting('autovacuum')::boolean")
        warnings = await check_server_settings(conn)
        assert len(warnings) == (0 if vacuums else 1)
        await conn.execute("SET track_counts = off")
        (warning,) = await check_server_settings(conn)
        assert warning.startswith("autovacuum is off")
    finally:
        await conn.close()


async def test_the_append_function_keeps_its_settings(database_url: str) -> None:
    """append_events runs with settings of its own (0007, 0011). A later migration that
    replaces the function with CREATE OR REPLACE keeps only the settings it restates: this names
    any it dropped."""
    conn = await asyncpg.connect(database_url)
    try:
        config = await conn.fetchval(
            "SELECT proconfig FROM pg_proc WHERE oid = 'append_events'::regproc"
        )
        assert set(config) >= {
            "plan_cache_mode=force_generic_plan",  # planned once per session, by index (0007)
            "enable_seqscan=off",
            "backend_flush_after=256kB",  # evicted pages written as they go (0011)
        }
    finally:
        await conn.close()
