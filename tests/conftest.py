"""Test databases: one server per session, one fresh database per test, cloned from a template.

The server is TEST_DATABASE_URL when set, else a testcontainers PostgreSQL when a Docker engine
answers, else an embedded cluster in `.data/pg-test` (no root, no Docker, no running server).
The template is migrated once per session; each test gets `CREATE DATABASE ... TEMPLATE`, which
is far faster than migrating, and never sees another test's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog

from services.common.db import create_pool, load_migrations, migrate
from services.common.eventlog import EventLog

ROOT = Path(__file__).resolve().parent.parent

structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(30),  # warnings and up during tests
)


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Admin DSN of the PostgreSQL server the session's databases live on."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    if os.environ.get("EXPORTLOG_TEST_DOCKER", "1") != "0" and _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    from services.common.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(ROOT / ".data" / "pg-test", durable=False)
    # Other sessions (a second `make test`, a benchmark) may use this cluster at the same time:
    # each one registers its pid, and the last one to leave stops the server.
    sessions = ROOT / ".data" / "pg-test-sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    mine = sessions / str(os.getpid())
    mine.touch()
    try:
        yield server.start()
    finally:
        mine.unlink(missing_ok=True)
        if not _live_sessions(sessions):
            server.stop()


def _live_sessions(folder: Path) -> list[int]:
    """Pids registered in `folder` whose process still runs (stale entries are removed)."""
    live = []
    for entry in folder.iterdir():
        try:
            pid = int(entry.name)
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            entry.unlink(missing_ok=True)
        except PermissionError:
            live.append(int(entry.name))
        else:
            live.append(pid)
    return live


@pytest.fixture(scope="session")
async def template_db(pg_server: str) -> str:
    """A database with every migration applied, to clone per test."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, "".join(m.checksum for m in load_migrations()))
    name = f"exportlog_tpl_{digest.hex[:12]}"
    admin = await asyncpg.connect(pg_server)
    try:
        # Built under a lock, so parallel sessions on one server neither race nor clone a
        # half-migrated template.
        await admin.execute("SELECT pg_advisory_lock(1162628167, 9)")
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
            conn = await asyncpg.connect(with_database(pg_server, name))
            try:
                await migrate(conn)
            finally:
                await conn.close()
        await admin.execute("SELECT pg_advisory_unlock(1162628167, 9)")
    finally:
        await admin.close()
    return name


@contextlib.asynccontextmanager
async def cloned_database(
    pg_server: str, template_db: str, prefix: str = "exportlog_test"
) -> AsyncIterator[str]:
    """DSN of a fresh database cloned from the migrated template, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    try:
        yield with_database(pg_server, name)
    finally:
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url(pg_server: str, template_db: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database for this test alone."""
    async with cloned_database(pg_server, template_db) as url:
        yield url


@pytest.fixture
async def empty_database_url(pg_server: str) -> AsyncIterator[str]:
    """DSN of a fresh database with no migrations applied."""
    name = f"exportlog_empty_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(pg_server, name)
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
def eventlog(pool: asyncpg.Pool) -> EventLog:
    return EventLog(pool)
