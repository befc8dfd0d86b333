"""What every benchmark needs: a server, a fresh database, a timed loop and result files.

* The server is ``BENCH_DATABASE_URL``, else ``DATABASE_URL``, else an embedded *durable* cluster
  in ``.data/pg-bench``: fsync and synchronous commit stay on, because commit cost is most of
  what an append costs and a benchmark without it would flatter every design. The embedded
  cluster is stopped at the end only when this run started it, so a benchmark never pulls a
  server from under someone else.
* Each benchmark works in a database of its own (``exportlog_bench_<random>``), migrated like
  production and dropped at the end, so runs neither see each other's rows nor leave any behind.
* ``drive`` runs callables for a fixed time after a warm-up and counts only completions inside
  the timed window; every figure comes with per-call latency percentiles and the client's CPU
  time, which tells whether Python or the server was the limit on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.common.db import create_pool, migrate

__all__ = [
    "DATABASE_PREFIX",
    "DEFAULT_RESULTS_DIR",
    "EMBEDDED_DATA_DIR",
    "Context",
    "Planned",
    "ProgressDisplay",
    "Sample",
    "Server",
    "Step",
    "Table",
    "Window",
    "busy_cores",
    "connections",
    "drive",
    "format_duration",
    "fresh_database",
    "idle_load",
    "kept_up",
    "machine_cpu",
    "machine_info",
    "parse_step",
    "percentile",
    "pool",
    "provision_server",
    "server_info",
    "step_message",
    "utc_timestamp",
    "with_database",
    "write_results",
]

KEPT_UP_SHARE = 0.98
"""The share of its offered rate an open loop must deliver to have kept up with it: the timed
window's edges cut appends in flight either way, so a log that keeps up delivers a little more
or a little less than it was offered (19,989 of 20,000 in one run). One that falls behind shows
it in its latencies first (see measure_group_open)."""


def kept_up(delivered_per_s: float, offered_per_s: float) -> bool:
    """Whether an open loop delivered what it was offered, as far as a timed window can tell."""
    return delivered_per_s >= KEPT_UP_SHARE * offered_per_s


_REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DATA_DIR = _REPO_ROOT / ".data" / "pg-bench"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATABASE_PREFIX = "exportlog_bench"

# Settings that decide what a commit costs, recorded with every result.
_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "full_page_writes",
    "commit_delay",
    "shared_buffers",
    "wal_buffers",
    "max_connections",
)
# A measurement that overruns its planned time by this much is stuck, not slow.
_GRACE_SECONDS = 60.0
_CLOSE_TIMEOUT_SECONDS = 10.0
_SESSION_EXIT_SECONDS = 2.0


# --------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Server:
    """Where the benchmarks run. `source` names the variable or "embedded"; never the DSN, which
    may carry a password and must not end up in result files."""

    dsn: str
    source: str


@contextlib.contextmanager
def provision_server(environ: Mapping[str, str] | None = None) -> Iterator[Server]:
    """The configured server, or the embedded durable cluster (stopped afterwards if we started
    it: another process, such as a second benchmark, may be using it)."""
    env = os.environ if environ is None else environ
    for variable in ("BENCH_DATABASE_URL", "DATABASE_URL"):
        url = env.get(variable)
        if url:
            yield Server(dsn=url, source=variable)
            return
    from services.common.embedded import EmbeddedPostgres

    cluster = EmbeddedPostgres(EMBEDDED_DATA_DIR, durable=True)
    started_here = not cluster.is_running()
    try:
        yield Server(dsn=cluster.start(), source="embedded (durable)")
    finally:
        if started_here:
            cluster.stop()


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str, prefix: str = DATABASE_PREFIX) -> AsyncIterator[str]:
    """A new database with every migration applied; dropped (WITH FORCE) however the block ends."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        dsn = with_database(server_dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            leaked = await _open_sessions(admin, name)
            if leaked:
                print(
                    f"warning: {leaked} connection(s) to {name} still open at the end; "
                    "dropping the database WITH (FORCE) closes them",
                    file=sys.stderr,
                )
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _open_sessions(admin: asyncpg.Connection, name: str) -> int:
    """Sessions still connected to database `name`, after giving closed ones a moment to go
    (a backend exits shortly after its client hung up). Every benchmark closes what it opens;
    this tells when one did not, instead of letting WITH (FORCE) hide it."""
    deadline = time.perf_counter() + _SESSION_EXIT_SECONDS
    while True:
        count: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name
        )
        if count == 0 or time.perf_counter() >= deadline:
            return count
        await asyncio.sleep(0.05)


async def server_info(dsn: str) -> dict[str, Any]:
    """The server's version and the settings that decide what a commit costs."""
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SELECT version()")
        number = await conn.fetchval("SELECT current_setting('server_version')")
        rows = await conn.fetch(
            "SELECT name, current_setting(name) AS value FROM unnest($1::text[]) AS name",
            list(_SETTINGS),
        )
    finally:
        await conn.close()
    return {
        "version": version,
        "server_version": number,
        "settings": {row["name"]: row["value"] for row in rows},
    }


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


_CPU_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name (the first one /proc/cpuinfo lists), else what `platform` says."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in _CPU_MODEL_KEYS and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """The client side of a result: how many CPUs it shared with the server, and what ran."""
    try:
        loop = type(asyncio.get_running_loop())
        loop_name: str | None = f"{loop.__module__}.{loop.__qualname__}"
    except RuntimeError:
        loop_name = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "asyncpg": _version_of("asyncpg"),
        "uvloop": _version_of("uvloop"),
        "msgspec": _version_of("msgspec"),
        "event_loop": loop_name,
    }


# --------------------------------------------------------------------------- connections


@contextlib.asynccontextmanager
async def connections(dsn: str, count: int) -> AsyncIterator[list[asyncpg.Connection]]:
    """`count` dedicated connections, outside any pool: the raw baselines must not pay for one
    (asyncpg's default pool reset alone halves throughput, see LIMITS.md)."""
    opened: list[asyncpg.Connection] = []
    try:
        for _ in range(count):
            opened.append(await asyncpg.connect(dsn))
        yield opened
    finally:
        for conn in opened:
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                    await conn.close()
            except (TimeoutError, OSError, asyncpg.PostgresError):
                conn.terminate()


@contextlib.asynccontextmanager
async def pool(dsn: str, size: int) -> AsyncIterator[asyncpg.Pool]:
    """The service's own pool (`create_pool`), sized so that no writer ever waits for a
    connection: a wait there would be measured as the event log's cost."""
    opened = await create_pool(dsn, min_size=size, max_size=size)
    try:
        yield opened
    finally:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                await opened.close()
        except TimeoutError:
            opened.terminate()


# --------------------------------------------------------------------------- timing


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 is a latency some call really had)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Sample:
    """What one measurement produced inside its timed window."""

    events: int
    transactions: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    client_cpu_seconds: float
    machine_busy_cores: float | None = None
    """Average number of busy CPUs on the whole machine (client, server and anything else)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def transactions_per_s(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    @property
    def client_cores(self) -> float:
        """Client CPU time over wall time: 1.0 is one core busy running this process."""
        return self.client_cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        latencies = self.latencies_ms
        return {
            "events": self.events,
            "transactions": self.transactions,
            "seconds": round(self.seconds, 4),
            "events_per_s": round(self.events_per_s, 1),
            "transactions_per_s": round(self.transactions_per_s, 1),
            "latency_ms": {
                "count": len(latencies),
                "p50": _round(self.p50_ms),
                "p90": _round(percentile(latencies, 0.90)),
                "p99": _round(self.p99_ms),
                "max": _round(max(latencies)) if latencies else None,
                "mean": _round(sum(latencies) / len(latencies)) if latencies else None,
            },
            "client_cpu_seconds": round(self.client_cpu_seconds, 4),
            "client_busy_cores": round(self.client_cores, 3),
            "machine_busy_cores": (
                round(self.machine_busy_cores, 3) if self.machine_busy_cores is not None else None
            ),
            "client_cpu_us_per_event": (
                round(self.client_cpu_seconds / self.events * 1e6, 1) if self.events else None
            ),
            **self.extra,
        }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, summed over CPUs, from
    /proc/stat; None where there is no such file. Two readings tell how many cores were busy
    in between, which says whether a figure was limited by CPU (the client and the server share
    two cores here) or by waiting (fsync, locks)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:9]]  # user .. steal; guest is inside user
    idle = ticks[3] + ticks[4]  # idle + iowait
    hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(ticks) - idle) / hertz, sum(ticks) / hertz


def busy_cores(
    before: tuple[float, float] | None, after: tuple[float, float] | None, seconds: float
) -> float | None:
    """Average busy CPUs between two `machine_cpu` readings taken `seconds` apart."""
    if before is None or after is None or seconds <= 0:
        return None
    return (after[0] - before[0]) / seconds


async def idle_load(seconds: float) -> float | None:
    """Busy cores on the machine while this process sits idle for `seconds`: other work
    sharing the machine (a test suite, another benchmark), which depresses every figure and
    makes it noisy. Recorded with the results so that a reader can tell a slow day."""
    before, started = machine_cpu(), time.perf_counter()
    await asyncio.sleep(seconds)
    return busy_cores(before, machine_cpu(), time.perf_counter() - started)


class Window:
    """The timed part of a measurement, after a warm-up.

    Work completing during the warm-up (connection start-up, plan caching, cold caches) or after
    the window (calls still in flight when it closed) is not counted; in steady state, counting
    completions inside a fixed window measures throughput without bias.
    """

    def __init__(self, *, warmup: float, seconds: float) -> None:
        now = time.perf_counter()
        self.opens = now + warmup
        self.closes = self.opens + seconds
        self.seconds = seconds
        self.events = 0
        self.transactions = 0
        self.latencies_ms: list[float] = []
        self._cpu_at_open: float | None = None
        self._cpu_at_close: float | None = None
        self._machine_at_open: tuple[float, float] | None = None
        self._machine_at_close: tuple[float, float] | None = None

    def accepting(self) -> bool:
        """Whether a caller should start another call (the window has not closed yet)."""
        return time.perf_counter() < self.closes

    def record(
        self, started: float, finished: float, *, events: int, transactions: int = 1
    ) -> None:
        """Count a call that ran from `started` to `finished` (perf_counter seconds)."""
        if self.opens <= finished <= self.closes:
            self.events += events
            self.transactions += transactions
            self.latencies_ms.append((finished - started) * 1000.0)

    def record_transactions(self, finished: float, transactions: int = 1) -> None:
        """Count transactions whose latency is recorded elsewhere (by the callers waiting)."""
        if self.opens <= finished <= self.closes:
            self.transactions += transactions

    async def watch_cpu(self) -> None:
        """Read this process's and the machine's CPU clocks when the window opens and closes."""
        await asyncio.sleep(max(0.0, self.opens - time.perf_counter()))
        self._cpu_at_open = time.process_time()
        self._machine_at_open = machine_cpu()
        await asyncio.sleep(max(0.0, self.closes - time.perf_counter()))
        self._cpu_at_close = time.process_time()
        self._machine_at_close = machine_cpu()

    @property
    def deadline_seconds(self) -> float:
        """How long a measurement on this window may take before it counts as stuck."""
        return max(0.0, self.closes - time.perf_counter()) + _GRACE_SECONDS

    def sample(self, **extra: Any) -> Sample:
        cpu = 0.0
        if self._cpu_at_open is not None and self._cpu_at_close is not None:
            cpu = self._cpu_at_close - self._cpu_at_open
        return Sample(
            events=self.events,
            transactions=self.transactions,
            seconds=self.seconds,
            latencies_ms=self.latencies_ms,
            client_cpu_seconds=cpu,
            machine_busy_cores=busy_cores(
                self._machine_at_open, self._machine_at_close, self.seconds
            ),
            extra=dict(extra),
        )


Step = Callable[[], Awaitable[int]]
"""One call of a closed-loop writer; returns how many events it wrote (in one transaction)."""


async def drive(steps: Sequence[Step], *, warmup: float, seconds: float) -> Sample:
    """Run every step in its own closed loop (call, wait, call again) for the warm-up and then
    `seconds`; one transaction per call. Each loop ends when the window closes."""
    window = Window(warmup=warmup, seconds=seconds)

    async def loop(step: Step) -> None:
        while window.accepting():
            started = time.perf_counter()
            events = await step()
            window.record(started, time.perf_counter(), events=events)

    async with asyncio.timeout(window.deadline_seconds), asyncio.TaskGroup() as group:
        group.create_task(window.watch_cpu())
        for step in steps:
            group.create_task(loop(step))
    return window.sample()


# --------------------------------------------------------------------------- reporting


@dataclass
class Table:
    """A small table rendered as aligned text for the terminal and as Markdown for the file."""

    headers: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    # Columns aligned left (labels); every other column is right-aligned (figures).
    left: frozenset[int] = frozenset({0})

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"expected {len(self.headers)} cells, got {len(cells)}")
        self.rows.append(cells)

    def text(self) -> str:
        widths = [
            max(len(str(row[i])) for row in [self.headers, *self.rows])
            for i in range(len(self.headers))
        ]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                cell.ljust(widths[i]) if i in self.left else cell.rjust(widths[i])
                for i, cell in enumerate(cells)
            ).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(self.headers), rule, *(line(row) for row in self.rows)])

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

        align = [":---" if i in self.left else "---:" for i in range(len(self.headers))]
        return "\n".join([line(self.headers), line(align), *(line(row) for row in self.rows)])


def write_results(
    out_dir: Path, name: str, payload: Mapping[str, Any], markdown: str
) -> tuple[Path, Path]:
    """Write `<name>.json` (every figure, for machines) and `<name>.md` (the tables)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(
        json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
    )
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _print_stdout(text: str) -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class Context:
    """What `python -m bench` hands to each benchmark.

    `progress` takes lines for stderr: a line of the form ``[n/N] label`` (see `step_message`,
    or `step`) says that measurement n of N starts, which the progress display turns into its
    n of N and its estimate of the time left; any other line is shown as it is. `echo` prints
    the result tables on stdout (the display clears its status line first)."""

    server: Server
    seconds: float
    warmup: float
    quick: bool
    out_dir: Path
    progress: Callable[[str], None]
    echo: Callable[[str], None] = _print_stdout

    def step(self, number: int, total: int, label: str) -> None:
        """Measurement `number` of `total` starts."""
        self.progress(step_message(number, total, label))


@dataclass(frozen=True)
class Rendered:
    """A run as terminal text, as Markdown, and as the JSON document with every figure."""

    text: str
    markdown: str
    payload: dict[str, Any]


ReportT = TypeVar("ReportT")
ReportT_contra = TypeVar("ReportT_contra", contravariant=True)


class Renderer(Protocol[ReportT_contra]):
    def __call__(
        self,
        report: ReportT_contra,
        *,
        server: Mapping[str, Any],
        machine: Mapping[str, Any],
        source: str,
        started_at: str,
        duration_seconds: float,
    ) -> Rendered: ...


async def run_benchmark(
    ctx: Context,
    name: str,
    measure: Callable[[str], Awaitable[ReportT]],
    render: Renderer[ReportT],
    machine_extra: Mapping[str, Any] | None = None,
) -> None:
    """Measure in a fresh database (with the machine's idle load read before and after), print
    the rendered tables and write `<name>.json` and `<name>.md`."""
    started_at = utc_timestamp()
    began = time.perf_counter()
    async with fresh_database(ctx.server.dsn) as dsn:
        server = await server_info(dsn)
        load_before = await idle_load(ctx.warmup)
        report = await measure(dsn)
        load_after = await idle_load(ctx.warmup)
    machine = {
        **machine_info(),
        **(machine_extra or {}),
        "idle_load_before": load_before,
        "idle_load_after": load_after,
    }
    rendered = render(
        report,
        server=server,
        machine=machine,
        source=ctx.server.source,
        started_at=started_at,
        duration_seconds=time.perf_counter() - began,
    )
    ctx.echo(rendered.text)
    json_path, md_path = write_results(ctx.out_dir, name, rendered.payload, rendered.markdown)
    ctx.progress(f"wrote {json_path} and {md_path}")


# --------------------------------------------------------------------------- progress

_STEP = re.compile(r"^\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]\s*(.*?)\s*(?:…|\.\.\.)?\s*$")
# ANSI: back to the start of the line and clear it.
_CLEAR_LINE = "\r\x1b[K"
_TICK_SECONDS = 1.0
# A benchmark running behind (or ahead of) its expected pace scales what is left of it by at
# most this much either way: early steps are no sure guide to the later ones.
_PACE_LIMIT = 3.0


def step_message(number: int, total: int, label: str) -> str:
    """The progress line that says measurement `number` of `total` starts."""
    return f"[{number}/{total}] {label}"


def parse_step(message: str) -> tuple[int, int, str] | None:
    """(n, N, label) of a ``[n/N] label`` line (a trailing ellipsis dropped), else None."""
    match = _STEP.match(message)
    if match is None:
        return None
    number, total = int(match[1]), int(match[2])
    if not 1 <= number <= total:
        return None
    return number, total, match[3]


def format_duration(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour; "?" when unknown."""
    if seconds is None or math.isnan(seconds):
        return "?"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


@dataclass
class Planned:
    """One benchmark of a run, as the progress display follows it."""

    name: str
    budget: float
    """Seconds it should take at most (the suite's time budget is the sum)."""
    estimate: float | None = None
    """Seconds it is expected to take (the last run's, with the same settings), if known."""
    started: float | None = None
    finished: float | None = None
    failed: bool = False
    step: tuple[int, int, str, float] | None = None
    """The measurement running: n, N, label, and when it started."""
    first_step: float | None = None
    """When its first measurement started."""

    @property
    def expected(self) -> float:
        return self.estimate if self.estimate is not None else self.budget

    @property
    def elapsed(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def left(self, now: float) -> float:
        """Seconds it still needs: its expected time, less what is done. Once measurements
        have completed, the rest of the expected time is scaled by the pace so far."""
        if self.finished is not None:
            return 0.0
        if self.started is None:
            return self.expected
        if self.step is not None and self.first_step is not None:
            number, total, _, began = self.step
            done = (number - 1) / total
            if done > 0:
                # What came before the first measurement (set-up) is not part of the pace.
                measuring = max(1.0, self.expected - (self.first_step - self.started))
                pace = (began - self.first_step) / (done * measuring)
                pace = min(_PACE_LIMIT, max(1 / _PACE_LIMIT, pace))
                return max(0.0, (1 - done) * measuring * pace - (now - began))
        return max(0.0, self.expected - (now - self.started))


class ProgressDisplay:
    """Where a run is, on stderr: which benchmark (b of B), which measurement (n of N), the time
    elapsed and an estimate of the time left.

    It is the run's `Context.progress`: a ``[n/N] label`` line (`step_message`) marks the start
    of a measurement, every other line is passed through. On a terminal one status line at the
    bottom is redrawn in place (every second, and after every line printed above it); otherwise
    each measurement's line starts with the same status in brackets, so that a log file tells
    the same story. `echo` prints on stdout without tearing the status line.
    """

    def __init__(
        self,
        plan: Sequence[Planned],
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        stdout: TextIO | None = None,
        width: int | None = None,
    ) -> None:
        self.plan = list(plan)
        self._stream = stream if stream is not None else sys.stderr
        self._stdout = stdout
        self.tty = self._stream.isatty() if tty is None else tty
        self._clock = clock
        self._width = width
        self._began = clock()
        self._current: Planned | None = None
        self._lock = threading.RLock()
        self._shown = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- the plan ----------------------------------------------------------------------------

    def _find(self, name: str) -> Planned:
        for item in self.plan:
            if item.name == name:
                return item
        raise KeyError(name)

    def begin(self, name: str) -> None:
        """Benchmark `name` starts."""
        item = self._find(name)
        with self._lock:
            item.started = self._clock()
            item.step = item.first_step = None
            self._current = item
        index = self.plan.index(item) + 1
        expected = (
            f", expected ~{format_duration(item.estimate)} (last run)"
            if item.estimate is not None
            else ""
        )
        self._line(
            f"== {name} ({index}/{len(self.plan)}): budget {format_duration(item.budget)}"
            f"{expected} =="
        )

    def end(self, name: str, *, failed: bool = False) -> float:
        """Benchmark `name` is over; returns how long it took."""
        item = self._find(name)
        with self._lock:
            item.finished = self._clock()
            item.failed = failed
            if self._current is item:
                self._current = None
        elapsed = item.elapsed or 0.0
        verdict = "FAILED after" if failed else "done in"
        over = "  OVER BUDGET" if elapsed > item.budget else ""
        self._line(
            f"== {name} {verdict} {format_duration(elapsed)} (budget "
            f"{format_duration(item.budget)}){over}; run so far {format_duration(self.elapsed())}"
            " =="
        )
        return elapsed

    def elapsed(self) -> float:
        return self._clock() - self._began

    def left(self) -> float:
        """Seconds the run still needs, by the estimates."""
        now = self._clock()
        return sum(item.left(now) for item in self.plan)

    # -- what is shown -----------------------------------------------------------------------

    def status(self, *, label: bool = True, width: int | None = None) -> str:
        """Where the run is, in one line: with the measurement's label unless `label` is False,
        the label shortened to fit in `width` characters if given (the times never are)."""
        head, text = [], ""
        item = self._current
        if item is not None:
            head.append(f"{item.name} {self.plan.index(item) + 1}/{len(self.plan)}")
            if item.step is not None:
                number, total, text, _ = item.step
                head.append(f"{number}/{total}")
        tail = [
            f"{format_duration(self.elapsed())} elapsed",
            f"~{format_duration(self.left())} left",
        ]
        if label and text:
            if width is not None:
                room = width - len(" · ".join([*head, *tail])) - 1
                text = text if len(text) <= room else text[: max(0, room - 1)] + "…"
            if text.strip("…"):
                head[-1] += " " + text
        line = " · ".join([*head, *tail])
        if width is not None and len(line) > width:
            line = line[: max(0, width - 1)] + "…"
        return line

    def __call__(self, message: str) -> None:
        step = parse_step(message)
        with self._lock:  # the ticker thread reads the plan
            current = self._current
            if step is not None and current is not None:
                number, total, label = step
                now = self._clock()
                current.step = (number, total, label, now)
                if current.first_step is None:
                    current.first_step = now
                if not self.tty:
                    message = f"[{self.status(label=False)}] {label}"
            self._line(message)

    def echo(self, text: str) -> None:
        """Print on stdout (the result tables), the status line cleared first."""
        with self._lock:
            self._clear()
            out = self._stdout if self._stdout is not None else sys.stdout
            out.write(text + "\n")
            out.flush()
            self._draw()

    def _line(self, message: str) -> None:
        with self._lock:
            self._clear()
            self._stream.write(message + "\n")
            self._draw()
            self._stream.flush()

    def _clear(self) -> None:
        if self.tty and self._shown:
            self._stream.write(_CLEAR_LINE)
            self._shown = False

    def _draw(self) -> None:
        if not self.tty or self._stop.is_set():
            return
        width = self._width or shutil.get_terminal_size((100, 24)).columns
        # One column short of the width: a line that fills it wraps on some terminals.
        self._stream.write(_CLEAR_LINE + self.status(width=width - 1))
        self._stream.flush()
        self._shown = True

    # -- the ticker --------------------------------------------------------------------------

    def start(self) -> None:
        """On a terminal, redraw the status line every second (in a thread of its own, so that
        a busy event loop does not freeze it)."""
        if not self.tty or self._ticker is not None:
            return

        def tick() -> None:
            while not self._stop.wait(_TICK_SECONDS):
                with self._lock:
                    self._draw()

        self._ticker = threading.Thread(target=tick, name="bench-progress", daemon=True)
        self._ticker.start()
        with self._lock:
            self._draw()

    def close(self) -> None:
        """Stop redrawing and clear the status line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            self._clear()
            self._stream.flush()
