"""Tests for the embedded PostgreSQL cluster (services.common.embedded)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from services.common.embedded import EmbeddedPostgres, EmbeddedPostgresError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def place() -> Iterator[Path]:
    """A folder for the clusters, outside pytest's tmp_path: a pytest session starting on the
    machine resets pytest's base folder to 0700, and a cluster that runs as the `postgres` user
    under it would lose its files mid-test."""
    path = Path(tempfile.mkdtemp(prefix="exportlog-embedded-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clusters() -> Iterator[list[EmbeddedPostgres]]:
    """Every cluster a test registers here is stopped afterwards, even if the test failed."""
    created: list[EmbeddedPostgres] = []
    yield created
    for pg in created:
        pg.stop()


def _new(
    clusters: list[EmbeddedPostgres], data_dir: Path, *, durable: bool = False
) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(data_dir, durable=durable)
    clusters.append(pg)
    return pg


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (a killed, orphaned postmaster may never be reaped here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _postmasters(pgdata: Path) -> list[int]:
    """Live processes started as `postgres -D <pgdata>` (backends rename themselves)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(pgdata).encode() in argv and b"-D" in argv and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


async def _query(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql)
        return rows
    finally:
        await conn.close()


async def test_data_survives_restart_and_port_is_reused(
    place: Path, clusters: list[EmbeddedPostgres]
) -> None:
    data_dir = place / "db"
    first = _new(clusters, data_dir)
    url = await asyncio.to_thread(first.start)
    assert url == f"postgresql://postgres@127.0.0.1:{_port(url)}/postgres"
    assert first.url == url
    assert first.database_url("other") == url.rsplit("/", 1)[0] + "/other"
    # Started as the event log wants it (embedded.DEFAULT_SETTINGS).
    assert [tuple(r) for r in await _query(url, "SHOW wal_writer_delay")] == [("10ms",)]
    await _query(url, "CREATE TABLE kept (id int PRIMARY KEY, note text)")
    await _query(url, "INSERT INTO kept VALUES (1, 'between runs')")
    await asyncio.to_thread(first.stop)
    assert not first.is_running()
    with pytest.raises(EmbeddedPostgresError):
        _ = first.url

    second = _new(clusters, data_dir)
    url2 = await asyncio.to_thread(second.start)
    assert _port(url2) == _port(url), "recorded port was free, so it should be reused"
    rows = await _query(url2, "SELECT id, note FROM kept")
    assert [tuple(r) for r in rows] == [(1, "between runs")]
    assert (data_dir / "server.json").exists()


def test_start_and_stop_are_idempotent(place: Path, clusters: list[EmbeddedPostgres]) -> None:
    pg = _new(clusters, place / "db")
    pg.stop()  # never started, not even initialised
    url = pg.start()
    pid = _postmaster_pid(pg.pgdata)
    assert pg.start() == url
    assert _postmaster_pid(pg.pgdata) == pid
    assert _postmasters(pg.pgdata) == [pid]
    with EmbeddedPostgres(place / "db") as other:  # a second handle reuses the server
        assert other.url == url
    assert not pg.is_running()  # __exit__ stopped it
    pg.stop()
    pg.stop()


_CHILD = """
import sys
from pathlib import Path
from services.common.embedded import EmbeddedPostgres
pg = EmbeddedPostgres(Path(sys.argv[1]), durable=False)
print("READY", flush=True)
sys.stdin.readline()
print("URL=" + pg.start(), flush=True)
"""


def test_concurrent_processes_share_one_server(
    place: Path, clusters: list[EmbeddedPostgres]
) -> None:
    data_dir = place / "db"
    pg = _new(clusters, data_dir)  # only for teardown
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for child in children:  # barrier: both imported and waiting
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "READY"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0], outputs
    urls = [
        line.removeprefix("URL=")
        for out in outputs
        for line in out.splitlines()
        if line.startswith("URL=")
    ]
    assert len(urls) == 2, outputs
    assert urls[0] == urls[1]
    # Every postmaster start logs this line once; a second initdb would have failed a child.
    assert pg.log_file.read_text().count("starting PostgreSQL") == 1
    assert _postmasters(pg.pgdata) == [_postmaster_pid(pg.pgdata)]
    assert pg.url == urls[0]


async def test_restart_after_sigkill(place: Path, clusters: list[EmbeddedPostgres]) -> None:
    # durable: with synchronous_commit=off a commit may still sit in WAL buffers when killed
    pg = _new(clusters, place / "db", durable=True)
    url = await asyncio.to_thread(pg.start)
    await _query(url, "CREATE TABLE t AS SELECT 42 AS answer")
    # A backend busy in a long query outlives its postmaster and pins the old shared memory.
    busy_conn = await asyncpg.connect(url, timeout=10)
    busy = asyncio.create_task(
        busy_conn.fetchval("SELECT count(*) FROM generate_series(1, 3000000000)")
    )
    try:
        deadline = time.monotonic() + 10
        while not await _query(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%3000000000%' AND pid <> pg_backend_pid()",
        ):
            assert time.monotonic() < deadline, "busy query never started"
            await asyncio.sleep(0.02)

        pid = _postmaster_pid(pg.pgdata)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, "postmaster did not die"
            await asyncio.sleep(0.02)
        assert (pg.pgdata / "postmaster.pid").exists(), "the crash leaves a stale pid file"
        assert not pg.is_running()

        started = time.monotonic()
        url2 = await asyncio.to_thread(pg.start)
        assert time.monotonic() - started < 20
        assert _postmaster_pid(pg.pgdata) != pid
        rows = await _query(url2, "SELECT answer FROM t")  # crash recovery replayed the WAL
        assert rows[0]["answer"] == 42
    finally:
        busy_conn.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(busy, 10)


async def test_stale_pidfile_of_vanished_process(
    place: Path, clusters: list[EmbeddedPostgres]
) -> None:
    """A pid file naming a process that no longer exists is replaced by postgres itself."""
    pg = _new(clusters, place / "db")
    await asyncio.to_thread(pg.start)
    pidfile = pg.pgdata / "postmaster.pid"
    saved = pidfile.read_text().splitlines()
    await asyncio.to_thread(pg.stop)
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()  # reaped: the pid no longer exists
    pidfile.write_text("\n".join([str(gone.pid), *saved[1:]]) + "\n")
    st = pg.pgdata.stat()
    os.chown(pidfile, st.st_uid, st.st_gid)
    assert not pg.is_running()

    url = await asyncio.to_thread(pg.start)
    rows = await _query(url, "SELECT 1 AS one")
    assert rows[0]["one"] == 1
    assert _postmaster_pid(pg.pgdata) != gone.pid


def test_invalid_settings_rejected(place: Path) -> None:
    with pytest.raises(ValueError, match="managed"):
        EmbeddedPostgres(place, settings={"port": "5432"})
    with pytest.raises(ValueError, match="invalid"):
        EmbeddedPostgres(place, settings={"work_mem; rm": "1"})
