"""A private PostgreSQL cluster living in a project data folder.

``make run`` and the test suite use it when no database is configured, so a developer needs
neither root, Docker nor a running server.  The binaries come from the ``pgserver`` wheel (the
``embedded`` extra) or from a local PostgreSQL installation.

Layout of ``data_dir``::

    pgdata/        the cluster (owned by the account that runs the server)
    server.json    state: the port actually used, so restarts keep a stable DSN
    postgres.log   server log (pg_ctl -l)
    .lock          flock(2) target serialising initdb/start/stop across processes
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import structlog

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_pg_bindir"]

log = structlog.get_logger(__name__)

_HOST = "127.0.0.1"
_SUPERUSER = "postgres"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_PREFERRED_ACCOUNT = "postgres"
_FALLBACK_ACCOUNT = "pgembed"
# Settings the class guarantees (the DSN depends on them); callers may not override them.
_RESERVED_SETTINGS = frozenset({"port", "listen_addresses", "unix_socket_directories"})
DEFAULT_SETTINGS: Mapping[str, str] = {"wal_writer_delay": "10ms"}
"""Settings the embedded server starts with unless the caller's `settings` say otherwise.

`wal_writer_delay`: the WAL writer writes and syncs what appends have inserted every 10 ms
instead of every 200, so that less is left for the commit of an append transaction to sync
while it holds the append lock. With 1,000 jobs in a closed loop of appends (2-core AMD EPYC,
five interleaved pairs) 2.5 to 6 % more events/s; see deploy/README.md."""
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_PG_CTL_WAIT_SECONDS = 60
_LOCK_TIMEOUT_SECONDS = 180.0
_TCP_READY_TIMEOUT_SECONDS = 30.0
_START_DEADLINE_SECONDS = 90.0
_LOG_TAIL_LINES = 40
_POLL_INTERVAL_SECONDS = 0.05
# Start failures worth retrying: a port grabbed between our probe and the bind, or backends of a
# killed postmaster that still hold the old shared memory block for a moment.
_PORT_CLASH = ("could not bind", "address already in use", "could not create any tcp/ip sockets")
_STALE_SHMEM = ("pre-existing shared memory block",)

# Bindirs whose permissions were already checked for the service account in this process.
_checked_bindirs: set[tuple[Path, int]] = set()


class EmbeddedPostgresError(RuntimeError):
    """The embedded cluster could not be located, initialised, started or stopped."""


# --------------------------------------------------------------------------- binaries


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _pgserver_bindir() -> Path | None:
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        bindir = Path(location) / "pginstall" / "bin"
        if _has_server_binaries(bindir):
            return bindir.resolve()
    return None


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    bindir = Path(result.stdout.strip())
    return bindir.resolve() if _has_server_binaries(bindir) else None


def _path_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb is None:
        return None
    # Distributions symlink initdb into /usr/bin while pg_ctl/postgres stay in the real bindir.
    for bindir in (Path(initdb).resolve().parent, Path(initdb).parent):
        if _has_server_binaries(bindir):
            return bindir
    return None


def _version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


def _system_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_server_binaries(Path(candidate)):
            return Path(candidate)
    return None


def find_pg_bindir() -> Path:
    """Locate PostgreSQL server binaries without requiring a system-wide install.

    The ``pgserver`` wheel comes first because it is what the ``embedded`` extra installs and it
    pins a known server version; a local installation is only a fallback.  ``pgserver`` is found
    via its import spec rather than imported, because importing it registers atexit hooks that
    would manage (and stop) servers behind our back.
    """
    for source, finder in (
        ("pgserver", _pgserver_bindir),
        ("pg_config", _pg_config_bindir),
        ("PATH", _path_bindir),
        ("system", _system_bindir),
    ):
        bindir = finder()
        if bindir is not None:
            log.debug("embedded_postgres.bindir", bindir=str(bindir), source=source)
            return bindir
    raise EmbeddedPostgresError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) found. Install the embedded "
        "extra, which bundles them: pip install -e '.[embedded]' (or pip install pgserver), "
        "or install the PostgreSQL server package of your distribution."
    )


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Account:
    """Unprivileged account that owns and runs the cluster when we are root."""

    name: str
    uid: int
    gid: int
    home: str


def _service_account() -> _Account | None:
    """PostgreSQL refuses to run as root, so root delegates to a system account."""
    if os.geteuid() != 0:
        return None
    for name in (_PREFERRED_ACCOUNT, _FALLBACK_ACCOUNT):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    useradd = shutil.which("useradd") or "useradd"
    command = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    try:
        result = subprocess.run(
            [*command, _FALLBACK_ACCOUNT], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedPostgresError(
            f"Running as root: PostgreSQL needs an unprivileged account, and creating "
            f"{_FALLBACK_ACCOUNT!r} failed: {exc}"
        ) from exc
    try:
        # A concurrent process may have created it first (useradd then exits non-zero).
        entry = pwd.getpwnam(_FALLBACK_ACCOUNT)
    except KeyError:
        raise EmbeddedPostgresError(
            f"Running as root: PostgreSQL needs an unprivileged account, and `useradd "
            f"{_FALLBACK_ACCOUNT}` failed: {(result.stderr or result.stdout).strip()}"
        ) from None
    log.info("embedded_postgres.account_created", account=_FALLBACK_ACCOUNT, uid=entry.pw_uid)
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _account_can(
    st: os.stat_result, account: _Account, user_bit: int, group_bit: int, other_bit: int
) -> bool:
    if st.st_uid == account.uid:
        return bool(st.st_mode & user_bit)
    if st.st_gid == account.gid:
        return bool(st.st_mode & group_bit)
    return bool(st.st_mode & other_bit)


def _ensure_traversable(path: Path, account: _Account) -> None:
    """Add o+x to ``path`` and its ancestors where the account could not otherwise pass."""
    for directory in (path, *path.parents):
        st = directory.stat()
        if _account_can(st, account, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            continue
        os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        log.warning(
            "embedded_postgres.permissions_widened",
            path=str(directory),
            added="o+x",
            reason=f"let {account.name} reach the cluster",
        )


def _ensure_binaries_usable(bindir: Path, account: _Account, *, whole_prefix: bool) -> None:
    """Make the server installation readable/executable by the account, only where needed."""
    key = (bindir, account.uid)
    if key in _checked_bindirs:
        return
    _ensure_traversable(bindir, account)
    changed: list[str] = []

    def widen(target: Path, st: os.stat_result, bits: int) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if mode | bits != mode:
            os.chmod(target, mode | bits)
            changed.append(str(target))

    if whole_prefix:
        # pgserver's wheel is a self-contained prefix (bin, lib, share) whose binaries load their
        # shared libraries from the sibling pgserver.libs (RPATH $ORIGIN/../../../pgserver.libs).
        roots = [bindir.parent, bindir.parents[2] / "pgserver.libs"]
        for top in (root for root in roots if root.is_dir()):
            widen(top, top.stat(), stat.S_IROTH | stat.S_IXOTH)
            for root, dirs, files in os.walk(top):
                for name in dirs:
                    target = Path(root) / name
                    widen(target, target.lstat(), stat.S_IROTH | stat.S_IXOTH)
                for name in files:
                    target = Path(root) / name
                    st = target.lstat()
                    if stat.S_ISLNK(st.st_mode):
                        continue
                    extra = stat.S_IXOTH if st.st_mode & stat.S_IXUSR else 0
                    widen(target, st, stat.S_IROTH | extra)
    else:
        for name in _REQUIRED_BINARIES:
            target = (bindir / name).resolve()
            st = target.stat()
            if not _account_can(st, account, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                widen(target, st, stat.S_IROTH | stat.S_IXOTH)
    if changed:
        log.warning(
            "embedded_postgres.permissions_widened",
            path=str(bindir.parent if whole_prefix else bindir),
            added="o+rX",
            files=len(changed),
            reason=f"let {account.name} run the PostgreSQL binaries",
        )
    _checked_bindirs.add(key)


def _chown_tree(path: Path, account: _Account) -> None:
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(Path(root) / name, account.uid, account.gid)
    os.lchown(path, account.uid, account.gid)


def _pid_is_live(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    A killed postmaster is re-parented to PID 1; where PID 1 does not reap (minimal container
    inits) it stays a zombie, which ``kill(pid, 0)`` - and hence pg_ctl - reports as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    # Format: "pid (comm) state ...", comm may contain spaces or parentheses.
    state = raw.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # PostgreSQL binds with SO_REUSEADDR, so TIME_WAIT leftovers must not count as "busy".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_for_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((_HOST, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        time.sleep(_POLL_INTERVAL_SECONDS)
    raise EmbeddedPostgresError(
        f"PostgreSQL did not accept TCP connections on {_HOST}:{port} within {timeout:.0f}s: "
        f"{last_error}"
    )


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _read_from(path: Path, offset: int) -> str:
    """What was appended to ``path`` after ``offset``: the current attempt, not older runs."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- cluster


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir/pgdata``, reachable on 127.0.0.1 only."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        durable: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        extra = {**DEFAULT_SETTINGS, **(settings or {})}
        for name in extra:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid PostgreSQL setting name: {name!r}")
            if name in _RESERVED_SETTINGS:
                raise ValueError(f"setting {name!r} is managed by EmbeddedPostgres")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.state_file = self.data_dir / "server.json"
        self.log_file = self.data_dir / "postgres.log"
        self.lock_file = self.data_dir / ".lock"
        self._port = port
        self._durable = durable
        self._settings = extra
        self._bindir: Path | None = None
        self._account: _Account | None = None
        self._account_resolved = False

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r})"

    # ------------------------------------------------------------------ public API

    def start(self) -> str:
        """Bring the cluster up (initialising it on first use) and return its DSN.

        Idempotent and safe across processes: an exclusive flock on ``data_dir/.lock`` makes a
        second caller (another worker, ``make test`` next to ``make run``) wait and then reuse the
        server the first one started instead of running initdb or a postmaster twice.
        """
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            account = self._get_account()
            bindir = self._get_bindir()
            if account is not None:
                _ensure_traversable(self.data_dir, account)
                _ensure_binaries_usable(bindir, account, whole_prefix=bindir == _pgserver_bindir())
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            else:
                self._check_version()
                if account is not None and self.pgdata.stat().st_uid != account.uid:
                    log.warning(
                        "embedded_postgres.chown", path=str(self.pgdata), account=account.name
                    )
                    _chown_tree(self.pgdata, account)

            running = self._running_port()
            if running is not None:
                if self._port is not None and self._port != running:
                    log.warning(
                        "embedded_postgres.port_ignored",
                        requested=self._port,
                        running=running,
                        reason="server already running; restart it to change the port",
                    )
                _wait_for_tcp(running, _TCP_READY_TIMEOUT_SECONDS)
                log.info(
                    "embedded_postgres.reused",
                    data_dir=str(self.data_dir),
                    port=running,
                    seconds=round(time.monotonic() - started, 3),
                )
                return self._dsn(running, _SUPERUSER)

            port = self._launch()
            log.info(
                "embedded_postgres.started",
                data_dir=str(self.data_dir),
                port=port,
                seconds=round(time.monotonic() - started, 3),
            )
            return self._dsn(port, _SUPERUSER)

    def stop(self) -> None:
        """Shut the server down quickly (fast mode: roll back open sessions, then checkpoint).

        Safe to call repeatedly and on a cluster that was never created or started, so it can sit
        in ``finally`` blocks and fixture teardowns unconditionally.
        """
        if not (self.pgdata / "PG_VERSION").exists():
            return
        started = time.monotonic()
        with self._locked():
            account = self._get_account()
            if account is not None:
                _ensure_traversable(self.data_dir, account)
            if self._running_port() is None:
                return
            pg_ctl = str(self._get_bindir() / "pg_ctl")
            code, output = self._run(
                [
                    pg_ctl,
                    "-D",
                    str(self.pgdata),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(_PG_CTL_WAIT_SECONDS),
                    "stop",
                ],
                timeout=_PG_CTL_WAIT_SECONDS + 30,
            )
            if code != 0 and self._running_port() is not None:
                raise EmbeddedPostgresError(
                    f"pg_ctl stop failed for {self.pgdata} (exit {code}):\n{output}\n"
                    f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}"
                )
            log.info(
                "embedded_postgres.stopped",
                data_dir=str(self.data_dir),
                seconds=round(time.monotonic() - started, 3),
            )

    def is_running(self) -> bool:
        """Tell whether a live postmaster serves ``data_dir``, whoever started it.

        Checks the real process (pid file, liveness, ``pg_ctl status``) rather than trusting
        in-memory state, because another process may have started or stopped the cluster.
        """
        return self._running_port() is not None

    @property
    def url(self) -> str:
        """DSN of the running server, so callers fail loudly instead of connecting to nothing."""
        port = self._running_port()
        if port is None:
            raise EmbeddedPostgresError(f"embedded PostgreSQL in {self.data_dir} is not running")
        return self._dsn(port, _SUPERUSER)

    def database_url(self, dbname: str) -> str:
        """DSN for another database on the same server, e.g. a per-test database."""
        port = self._running_port()
        if port is None:
            raise EmbeddedPostgresError(f"embedded PostgreSQL in {self.data_dir} is not running")
        return self._dsn(port, dbname)

    def __enter__(self) -> Self:
        """Scope a throwaway cluster to a ``with`` block so it cannot outlive its user."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop even when the block raised, so no postmaster is left behind."""
        self.stop()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _dsn(port: int, dbname: str) -> str:
        return f"postgresql://{_SUPERUSER}@{_HOST}:{port}/{quote(dbname, safe='')}"

    def _get_account(self) -> _Account | None:
        if not self._account_resolved:
            self._account = _service_account()
            self._account_resolved = True
        return self._account

    def _get_bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedPostgresError(
                            f"timed out after {_LOCK_TIMEOUT_SECONDS:.0f}s waiting for "
                            f"{self.lock_file}; another process is stuck starting the cluster"
                        ) from None
                    time.sleep(_POLL_INTERVAL_SECONDS)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _run(self, command: list[str], *, timeout: float) -> tuple[int, str]:
        """Run a PostgreSQL tool as the service account; return (exit code, combined output).

        Output goes to a temporary file, not a pipe: the postmaster forked by ``pg_ctl start``
        could otherwise inherit the pipe and keep ``communicate()`` waiting forever.
        """
        account = self._get_account()
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        kwargs: dict[str, Any] = {}
        if account is not None:
            env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
            kwargs.update(user=account.uid, group=account.gid, extra_groups=[])
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
            try:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=env,
                    timeout=timeout,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired as exc:
                out.seek(0)
                raise EmbeddedPostgresError(
                    f"{Path(command[0]).name} timed out after {timeout:.0f}s:\n{out.read()}\n"
                    f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}"
                ) from exc
            except OSError as exc:
                raise EmbeddedPostgresError(f"could not run {command[0]}: {exc}") from exc
            out.seek(0)
            return result.returncode, out.read()

    def _binary_major(self) -> str:
        code, output = self._run([str(self._get_bindir() / "pg_ctl"), "--version"], timeout=30)
        match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", output)
        if code != 0 or match is None:
            raise EmbeddedPostgresError(f"cannot determine PostgreSQL version: {output.strip()}")
        major = int(match.group(1))
        return str(major) if major >= 10 else f"{major}.{match.group(2)}"

    def _check_version(self) -> None:
        cluster = (self.pgdata / "PG_VERSION").read_text().strip()
        binaries = self._binary_major()
        if cluster != binaries:
            raise EmbeddedPostgresError(
                f"{self.pgdata} was created by PostgreSQL {cluster} but the binaries in "
                f"{self._get_bindir()} are PostgreSQL {binaries}; install the matching version "
                f"or delete {self.data_dir} to start from an empty cluster"
            )

    def _initdb(self) -> None:
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.pgdata} is not empty but holds no cluster (no PG_VERSION); refusing to "
                f"initialise over it. Delete it to start from an empty cluster."
            )
        account = self._get_account()
        started = time.monotonic()
        # Initialise next to the final location and rename once complete, so a crash during
        # initdb never leaves a half-built cluster that looks valid (PG_VERSION is written early).
        staging = self.data_dir / "pgdata.initdb"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        if account is not None:
            os.chown(staging, account.uid, account.gid)
        command = [
            str(self._get_bindir() / "initdb"),
            "-D",
            str(staging),
            "-U",
            _SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            # Independent of the caller's environment (LANG may name a locale that isn't
            # installed) and gives byte-order collation, which is fastest.
            "--locale=C",
            "--no-instructions",
        ]
        if not self._durable:
            command.append("--no-sync")
        code, output = self._run(command, timeout=300)
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedPostgresError(f"initdb failed (exit {code}):\n{output.strip()}")
        if self.pgdata.exists():
            self.pgdata.rmdir()  # empty, checked above
        staging.rename(self.pgdata)
        log.info(
            "embedded_postgres.initdb",
            pgdata=str(self.pgdata),
            seconds=round(time.monotonic() - started, 3),
        )

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self, state: Mapping[str, Any]) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(dict(state), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.state_file)

    def _read_pidfile(self) -> list[str] | None:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot read {self.pgdata}/postmaster.pid: {exc}") from exc
        return lines if lines and lines[0].strip().isdigit() else None

    def _serving(self, port: int) -> bool:
        """Whether the postmaster named in pgdata is alive and accepts TCP on `port`."""
        lines = self._read_pidfile()
        if lines is None or not _pid_is_live(int(lines[0])):
            return False
        try:
            with socket.create_connection((_HOST, port), timeout=1.0):
                return True
        except OSError:
            return False

    def _running_port(self) -> int | None:
        """Port of the live postmaster serving pgdata, or None if there is none."""
        lines = self._read_pidfile()
        if lines is None or not _pid_is_live(int(lines[0])):
            return None
        code, _ = self._run(
            [str(self._get_bindir() / "pg_ctl"), "-D", str(self.pgdata), "status"], timeout=30
        )
        if code != 0:
            return None
        state = self._read_state()
        recorded = state.get("port")
        actual = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        if actual is not None and actual != recorded:
            # server.json is advisory; the postmaster's own pid file is the truth.
            self._write_state({**state, "port": actual, "pid": int(lines[0])})
            return actual
        return recorded if isinstance(recorded, int) else actual

    def _clear_crash_leftovers(self) -> None:
        """Undo what a crashed (e.g. SIGKILLed) postmaster leaves behind, so start() works."""
        pidfile = self.pgdata / "postmaster.pid"
        lines = self._read_pidfile()
        if lines is None:
            if pidfile.exists():
                pidfile.unlink()  # empty or garbled: a crash while it was being written
            return
        pid = int(lines[0])
        if _pid_is_live(pid):
            return  # pg_ctl status disagreed; let postgres itself decide
        self._stop_orphaned_backends()
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            # PostgreSQL itself recognises and replaces a pid file whose process is gone.
            log.info("embedded_postgres.stale_pidfile", pid=pid, action="left to postgres")
            return
        except PermissionError:
            pass
        # A zombie postmaster (re-parented to a PID 1 that never reaps) still answers
        # kill(pid, 0), so postgres would refuse to start ("lock file already exists"). The
        # shared-memory interlock still guards against surviving backends, so removing is safe.
        pidfile.unlink()
        log.warning("embedded_postgres.stale_pidfile", pid=pid, action="removed (zombie)")

    def _stop_orphaned_backends(self) -> None:
        """SIGQUIT backends that outlived their postmaster, as the postmaster would have.

        They keep the old shared memory block attached, and PostgreSQL refuses to start until
        they are gone; a backend busy in a long query may take minutes to notice on its own.
        Only processes running this cluster's ``postgres`` binary inside pgdata are touched.
        """
        proc = Path("/proc")
        if not proc.is_dir():
            return
        binary = (self._get_bindir() / "postgres").resolve()
        orphans: list[int] = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(os.readlink(entry / "exe")) != binary:
                    continue
                if Path(os.readlink(entry / "cwd")) != self.pgdata:
                    continue
            except OSError:
                continue
            if _pid_is_live(int(entry.name)):
                orphans.append(int(entry.name))
        if not orphans:
            return
        log.warning("embedded_postgres.orphaned_backends", pids=orphans, action="SIGQUIT")
        for pid in orphans:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 5.0
        while any(_pid_is_live(pid) for pid in orphans):
            if time.monotonic() > deadline:
                for pid in orphans:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(_POLL_INTERVAL_SECONDS)

    def _choose_port(self, avoid: set[int]) -> int:
        if self._port is not None:
            return self._port
        recorded = self._read_state().get("port")
        if isinstance(recorded, int) and recorded not in avoid and _port_is_free(recorded):
            return recorded
        while True:
            port = _free_port()
            if port not in avoid:
                return port

    def _server_options(self, port: int) -> str:
        options = [
            "-p",
            str(port),
            "-c",
            f"listen_addresses={_HOST}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=300",
        ]
        if not self._durable:
            for name in ("fsync", "synchronous_commit", "full_page_writes"):
                options += ["-c", f"{name}=off"]
        for name, value in self._settings.items():
            options += ["-c", f"{name}={value}"]
        # pg_ctl hands the string to /bin/sh, so quote every word.
        return " ".join(shlex.quote(option) for option in options)

    def _launch(self) -> int:
        account = self._get_account()
        if account is not None:
            self.log_file.touch(exist_ok=True)
            st = self.log_file.stat()
            if st.st_uid != account.uid:
                os.chown(self.log_file, account.uid, account.gid)
        pg_ctl = str(self._get_bindir() / "pg_ctl")
        deadline = time.monotonic() + _START_DEADLINE_SECONDS
        tried: set[int] = set()
        port = self._choose_port(tried)
        waiting_logged = False
        while True:
            self._clear_crash_leftovers()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            code, output = self._run(
                [
                    pg_ctl,
                    "-D",
                    str(self.pgdata),
                    "-w",
                    "-t",
                    str(_PG_CTL_WAIT_SECONDS),
                    "-l",
                    str(self.log_file),
                    "-o",
                    self._server_options(port),
                    "start",
                ],
                timeout=_PG_CTL_WAIT_SECONDS + 30,
            )
            if code == 0:
                break
            tail = _tail(self.log_file)
            recent = _read_from(self.log_file, log_offset).lower()
            if "ready to accept connections" in recent and self._serving(port):
                # pg_ctl gave up waiting (seen once on a loaded machine) although the server it
                # started is up and answering: trust the server, not pg_ctl's clock.
                log.warning("embedded_postgres.pg_ctl_gave_up_early", port=port)
                break
            in_time = time.monotonic() < deadline
            if in_time and self._port is None and any(s in recent for s in _PORT_CLASH):
                # Someone took the port between our probe and the postmaster's bind.
                tried.add(port)
                log.warning("embedded_postgres.port_taken", port=port, action="trying another")
                port = self._choose_port(tried)
                continue
            if in_time and any(s in recent for s in _STALE_SHMEM):
                if not waiting_logged:
                    log.warning("embedded_postgres.waiting", reason="old backends still exiting")
                    waiting_logged = True
                time.sleep(_POLL_INTERVAL_SECONDS * 5)
                continue
            raise EmbeddedPostgresError(
                f"pg_ctl start failed for {self.pgdata} on port {port} (exit {code}):\n"
                f"{output.strip()}\n--- last {_LOG_TAIL_LINES} lines of {self.log_file} ---\n"
                f"{tail}"
            )
        _wait_for_tcp(port, _TCP_READY_TIMEOUT_SECONDS)
        lines = self._read_pidfile() or []
        pid = int(lines[0]) if lines else None
        self._write_state(
            {
                "port": port,
                "pid": pid,
                "bindir": str(self._get_bindir()),
                "pgdata": str(self.pgdata),
            }
        )
        return port
