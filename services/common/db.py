"""Connecting to PostgreSQL and bringing its schema up to date.

Migrations are the numbered SQL files in `schemas/migrations/`, applied in order, each in its own
transaction, and recorded in `schema_migrations`. A session-level advisory lock makes concurrent
runs (two processes starting at once) wait for each other instead of racing, and a checksum
makes a changed, already-applied file an error instead of silently ignored drift.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger(__name__)

DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
"""What a query can raise when the database is gone or restarting, to be retried rather than
taken for a bug. `InternalClientError` belongs here: after the server ends a connection (a
restart), asyncpg may hand it out of a pool once more, and its next query raises "cannot switch
to state 12; another operation (2) is in progress" (asyncpg issue 1069)."""

CONNECT_TIMEOUT = 10.0
"""Seconds a connection attempt of a long-lived connection (LISTEN, NOTIFY) may take: a server
that accepts and then says nothing must not hold a reconnect loop."""

_MIGRATION_LOCK = (1162628167, 2)  # 'EVLG', migrations
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database's schema history does not match the migration files."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migration files shipped in `schemas/migrations`, in version order."""
    found: list[Migration] = []
    for entry in resources.files("schemas").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


async def migrate(
    conn: asyncpg.Connection, migrations: Sequence[Migration] | None = None
) -> list[int]:
    """Apply the migrations this database lacks; return the versions applied now.

    Safe to run twice and from several processes at once.
    """
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1, $2)", *_MIGRATION_LOCK)
    try:
        # Created under the lock: two concurrent CREATE TABLE IF NOT EXISTS can still collide.
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        applied = {row["version"]: row["checksum"] for row in rows}
        for migration in migrations:
            recorded = applied.get(migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
            log.info("migration applied", version=migration.version, name=migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", *_MIGRATION_LOCK)
    return applied_now


async def check_server_settings(conn: asyncpg.Connection) -> list[str]:
    """Warn about server settings the event log does not work well without; return the
    warnings. Every append rewrites its job's row in `jobs` (the projection): with autovacuum
    off, nothing ever reclaims the old versions, and appends slow down as the table bloats
    (measured here: a log whose `jobs` table carried four dead versions per row appended about
    30 % slower than a new one)."""
    row = await conn.fetchrow(
        "SELECT current_setting('autovacuum')::boolean AS autovacuum,"
        " current_setting('track_counts')::boolean AS track_counts"
    )
    warnings: list[str] = []
    if row is not None and not (row["autovacuum"] and row["track_counts"]):
        warnings.append(
            "autovacuum is off on the database server (autovacuum and track_counts must both "
            "be on): the jobs projection, rewritten by every append, will bloat and appends "
            "will slow down; turn it on, or VACUUM jobs on a schedule"
        )
    for warning in warnings:
        log.warning("database setting", problem=warning)
    return warnings


async def pending_migrations(conn: asyncpg.Connection) -> list[int]:
    """Versions not yet applied; readiness checks report a database that lags as not ready."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [m.version for m in load_migrations() if m.version not in done]


async def discard(conn: asyncpg.Connection) -> None:
    """Close a connection that is done with, whatever state it is in, without raising: a close
    that fails (the server is gone, the driver's protocol state is confused) must not end the
    reconnect loop that calls this."""
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=2)
    except Exception:
        conn.terminate()


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset runs a query on every release, which halves throughput here
    # (see LIMITS.md). Our code leaves no session state behind except, after an error, an open
    # transaction; only that needs undoing, and checking it costs no round trip.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    """A connection pool tuned for many short queries."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        reset=_reset_connection,
        **kwargs,
    )
    assert pool is not None
    return pool
