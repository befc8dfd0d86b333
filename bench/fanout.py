"""How the gateway fans events out, next to a raw websockets server measured in the same run.

Three processes besides PostgreSQL share the machine's two cores, so that each one's CPU time and
memory can be read on its own:

* the gateway as deployed: ``python -m services.gateway``, configured by GATEWAY_* variables
  (defaults, except the port, the secret and warnings-only logs);
* the raw baseline (`bench.fanout_raw`): a minimal websockets server on uvloop, without
  compression like the gateway, that broadcasts the same bytes to the same clients;
* the load client (`bench.fanout_load`): a lean RFC 6455 client on uvloop (`bench.wsclient`)
  that counts frames where they arrive, at about 2 µs of CPU each: with websockets' own client
  (25 to 40 µs a frame) the load client was the first to saturate, and its queueing made up the
  latencies of both servers at 20,000 deliveries/s.

This process creates the jobs, appends the events (through `EventLog`, with a coalesced NOTIFY
after commit: the export service's default) and reads the others' CPU time and RSS from /proc.

Measured, in this order, each gateway figure right after its raw baseline (`Settings.steps`
lists them; each is announced as ``[n/N] label`` to the progress display):

1. Memory per idle subscribed connection, against connections: clients connect to both servers
   in steps (`memory_clients`: 100, 1,000, 5,000 in all) before any traffic; each server's RSS
   is read before and after each step. The figure is the RSS growth since the first step over
   every connection open.
2. Fan-out at each of `fanout_clients`, from the largest down (the clients of the memory sweep
   stay connected; those of later steps close in between): every client follows the same job
   (or `fanout_jobs` jobs); deliveries/s counted by the load client in a timed window. Both
   servers get the same flow control: events are produced (appended to the log, or broadcast by
   the raw server) while the load client has received all but `backlog_events` per client. That
   keeps both busy without overflowing the gateway's send queues or the sockets' receive buffers
   (a reader that falls far behind on loopback gets its segments pruned and retransmitted after
   a timeout, which would measure the kernel instead). Then, with the same clients, the
   commit-to-client latency of one job's events at `fanout_latency_rate` (as in 3.): how long
   one broadcast to that many clients takes.
3. Commit-to-client latency at `latency_rate` events/s over `latency_clients` clients, for each
   clients-per-job split: the appender records the wall-clock time right after each commit, the
   load client the time each event arrives (same machine, same clock). The appender commits
   what is due every `latency_tick` seconds in one `append_many` transaction: one commit per
   event would cost more than the two cores have beside the gateway. The raw baseline sends the
   same frames at the same rate to the same rooms, timed just before each is written.
4. Reconnect storm: `storm_jobs` × `storm_clients_per_job` clients, each `storm_behind` events
   behind, connect at once and resubscribe with their afterSeq: time until every one has
   received caught-up, and the replay queries the gateway sent meanwhile (its
   `gateway_replay_queries` metric). The raw baseline: as many connections at once to the raw
   server, until each is in its room, once per listen backlog in `storm_raw_backlogs`.
5. Replay after a gap: one client reconnects N events behind one job's last seq (for each N of
   `replay_gaps`: 10 to 10,000), `replay_repeats` times, timed from its connection to
   caught-up; next to the replay query for the same rows alone (the database's share).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import socket
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import encode_event
from services.common.auth import issue_token
from services.common.eventlog import AppendRequest, EventLog, EventLogError, NewEvent
from services.common.notifier import Notifier
from services.common.queries import QUERIES
from services.gateway.config import GatewayConfig

from . import appends
from .common import (
    Context,
    Rendered,
    Table,
    busy_cores,
    connections,
    machine_cpu,
    percentile,
    pool,
    run_benchmark,
    step_message,
)
from .control import (
    Child,
    counter_deltas,
    cpu_seconds,
    raise_open_files,
    rss_kib,
    tcp_counters,
)

NAME = "fanout"
PROJECT = appends.PROJECT
USER = "bench"
OPEN_FILES = 65536
GATEWAY_BACKLOG = GatewayConfig().backlog
"""The gateway's listen backlog (`GATEWAY_BACKLOG`, default)."""

# Goals of the issue, checked in the report.
GOAL_FANOUT_RATIO = 0.7
GOAL_P99_MS = 50.0
GOAL_STORM_SECONDS = 5.0
GOAL_BYTES_PER_CONNECTION = 20_000

_READY_SECONDS = 30.0
_POLL_SECONDS = 0.01
_MAX_EVENTS_PER_CALL = 20
_SETTLE_SECONDS = 0.3
_SETUP_EVENTS_PER_CALL = 500


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; the defaults are the full benchmark's (see `for_run`)."""

    seconds: float = 5.0
    warmup: float = 1.0
    memory_clients: tuple[int, ...] = (100, 1000, 5000)
    """Connections to each server at each reading of its RSS: the clients connect in these
    steps, before any traffic, and stay connected for the fan-out."""
    fanout_clients: tuple[int, ...] = (1000, 5000)
    """Clients of each fan-out measurement, measured from the largest down (clients close in
    between). Each is also a step of the memory sweep."""
    fanout_jobs: int = 1
    raw_modes: tuple[str, ...] = ("broadcast", "batched")
    """How the raw server sends (see `bench.fanout_raw.RawServer.send`); the first is the
    baseline of the goal."""
    backlog_events: int = 32
    """Events per client in flight during fan-out: enough to keep both servers busy between
    two polls of the load client, few enough (17 KiB of frames) for a socket's default receive
    buffer."""
    latency_clients: int = 1000
    latency_clients_per_job: tuple[int, ...] = (1, 10)
    latency_rate: float = 2000.0
    latency_tick: float = 0.005
    fanout_latency_rate: float = 2.0
    """Events/s of the commit-to-client latency at each fan-out size, every client following
    the one job: slow enough that each event reaches every client before the next one comes
    (the load client is not the limit), so that the figure is the time one broadcast to
    that many clients takes, not a queue at the limit of the rig."""
    fanout_latency_seconds: float = 5.0
    """Shortest window of that latency (longer with a longer `seconds`): at a few events per
    second, enough events for a p99."""
    writers: int = 8
    """Database connections of the appender."""
    storm_jobs: int = 50
    storm_clients_per_job: int = 100
    storm_behind: int = 100
    storm_deadline: float = 60.0
    storm_raw_backlogs: tuple[int, ...] = (GATEWAY_BACKLOG, 100)
    """Listen backlogs the raw server's storm is measured with: the gateway's, and asyncio's
    default (100), to show what a short listen queue does to a storm."""
    replay_gaps: tuple[int, ...] = (10, 100, 1000, 10000)
    """Events a reconnecting client missed, for the replay sweep: it connects, authenticates and
    subscribes after its last seq, and is timed until caught-up."""
    replay_repeats: int = 5
    """Reconnections per gap (the median is reported)."""
    warm_clients: int = 20
    """Clients connected before the memory baseline is read: one-time costs (code paths run for
    the first time, the gateway's database connections) are not charged to the measured ones."""
    connect_concurrency: int = 64
    """Handshakes in flight while opening clients outside the storm (below the listen backlog)."""
    payload_bytes: int = 290
    drain_timeout: float = 15.0
    reduced: bool = False
    """Fewer clients than the issue asks for (`--quick`): said in the report."""

    @property
    def storm_clients(self) -> int:
        return self.storm_jobs * self.storm_clients_per_job

    @property
    def connect_steps(self) -> tuple[int, ...]:
        """Connections to each server after each step of connecting (the memory sweep)."""
        return tuple(sorted({*self.memory_clients, *self.fanout_clients}))

    def steps(self) -> list[str]:
        """Every measurement of a run, in order: the n of N of the progress display."""
        labels = [f"memory with {n:,} idle connections" for n in self.connect_steps]
        for clients in sorted(self.fanout_clients, reverse=True):
            labels += [f"fan-out to {clients:,}: raw {mode}" for mode in self.raw_modes]
            labels.append(f"fan-out to {clients:,}: gateway")
            labels.append(f"latency at {clients:,} clients, {self.fanout_latency_rate:g} events/s")
        labels += [
            f"latency: {self.latency_clients:,} clients, {per_job} per job"
            for per_job in self.latency_clients_per_job
        ]
        labels += [f"storm: raw (backlog {backlog})" for backlog in self.storm_raw_backlogs]
        labels.append(f"storm: gateway, {self.storm_clients:,} clients")
        if self.replay_gaps:
            labels.append(f"replay after gaps of {', '.join(f'{n:,}' for n in self.replay_gaps)}")
        return labels

    @property
    def raw_backlogs(self) -> tuple[int, ...]:
        """Every backlog the raw server listens with; the first is the gateway's."""
        return tuple(dict.fromkeys((GATEWAY_BACKLOG, *self.storm_raw_backlogs)))

    @classmethod
    def for_run(cls, *, seconds: float, warmup: float, quick: bool) -> Settings:
        if not quick:
            return cls(seconds=seconds, warmup=warmup)
        return cls(
            seconds=seconds,
            warmup=warmup,
            memory_clients=(100, 500, 2000),
            fanout_clients=(500, 2000),
            raw_modes=("broadcast",),
            latency_clients_per_job=(10,),
            storm_jobs=20,
            storm_raw_backlogs=(4096,),
            replay_repeats=3,
            drain_timeout=10.0,
            reduced=True,
        )


# --------------------------------------------------------------------------- results


def _round(value: float | None, digits: int = 3) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def _per(part: float | None, whole: float) -> float | None:
    return None if part is None or whole <= 0 else part / whole


def _diff(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


@dataclass
class Snapshot:
    """The clocks and counters at one end of a timed window."""

    time: float
    events: int
    load_cpu: float | None
    server_cpu: float | None
    parent_cpu: float
    machine: tuple[float, float] | None
    tcp: dict[str, int] | None
    produced: int = 0


@dataclass
class Usage:
    """Where the CPU went during a window: busy cores of each process and of the machine."""

    seconds: float
    server_cpu: float | None
    load_cpu: float | None
    parent_cpu: float
    machine_busy_cores: float | None
    tcp: dict[str, int] | None

    @classmethod
    def between(cls, opened: Snapshot, closed: Snapshot) -> Usage:
        seconds = closed.time - opened.time
        return cls(
            seconds=seconds,
            server_cpu=_diff(closed.server_cpu, opened.server_cpu),
            load_cpu=_diff(closed.load_cpu, opened.load_cpu),
            parent_cpu=closed.parent_cpu - opened.parent_cpu,
            machine_busy_cores=busy_cores(opened.machine, closed.machine, seconds),
            tcp=counter_deltas(opened.tcp, closed.tcp),
        )

    def cores(self) -> dict[str, float | None]:
        """Busy cores: the server, the load client, this process (the appender), and the rest
        of the machine (PostgreSQL, and whatever else runs on it)."""
        server = _per(self.server_cpu, self.seconds)
        load = _per(self.load_cpu, self.seconds)
        parent = _per(self.parent_cpu, self.seconds)
        rest = None
        if self.machine_busy_cores is not None and None not in (server, load, parent):
            rest = self.machine_busy_cores - (server or 0) - (load or 0) - (parent or 0)
        return {
            "server": _round(server),
            "load_client": _round(load),
            "appender": _round(parent),
            "rest": _round(rest),
            "machine": _round(self.machine_busy_cores),
        }

    def text(self) -> str:
        cores = self.cores()
        return " / ".join(
            "—" if cores[key] is None else f"{cores[key]:.2f}"
            for key in ("server", "load_client", "appender", "rest")
        )


@dataclass
class FanoutFigure:
    server: str
    """"gateway", or "raw broadcast" / "raw batched"."""
    clients: int
    jobs: int
    deliveries: int
    produced: int
    """Frames broadcast (raw) or events appended (gateway) inside the window."""
    usage: Usage
    expected: int
    received: int
    dropped: dict[str, int]

    @property
    def rate(self) -> float:
        return self.deliveries / self.usage.seconds if self.usage.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.received >= self.expected

    def server_us(self) -> float | None:
        per = _per(self.usage.server_cpu, self.deliveries)
        return None if per is None else per * 1e6

    def load_us(self) -> float | None:
        per = _per(self.usage.load_cpu, self.deliveries)
        return None if per is None else per * 1e6

    def to_json(self) -> dict[str, Any]:
        seconds = self.usage.seconds
        return {
            "server": self.server,
            "clients": self.clients,
            "jobs": self.jobs,
            "seconds": _round(seconds),
            "deliveries": self.deliveries,
            "deliveries_per_s": round(self.rate, 1),
            "produced_per_s": round(self.produced / seconds, 1) if seconds > 0 else None,
            "server_cpu_us_per_delivery": _round(self.server_us(), 2),
            "load_cpu_us_per_delivery": _round(self.load_us(), 2),
            "busy_cores": self.usage.cores(),
            "tcp": self.usage.tcp,
            "expected_deliveries": self.expected,
            "received_deliveries": self.received,
            "all_delivered": self.complete,
            "closed_by_server": self.dropped,
        }


@dataclass
class LatencyFigure:
    server: str
    clients: int
    jobs: int
    target_rate: float
    events: int
    latencies_ms: list[float] = field(repr=False)
    missing: int
    usage: Usage
    transactions: int = 0
    commit_ms: list[float] = field(default_factory=list, repr=False)
    """How long each append transaction took (gateway only), before the commit time recorded."""

    @property
    def events_per_s(self) -> float:
        return self.events / self.usage.seconds if self.usage.seconds > 0 else 0.0

    @property
    def deliveries_per_s(self) -> float:
        seconds = self.usage.seconds
        return len(self.latencies_ms) / seconds if seconds > 0 else 0.0

    def p(self, fraction: float) -> float:
        return percentile(self.latencies_ms, fraction)

    def to_json(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "server": self.server,
            "clients": self.clients,
            "jobs": self.jobs,
            "clients_per_job": self.clients // self.jobs if self.jobs else None,
            "target_events_per_s": self.target_rate,
            "events_per_s": round(self.events_per_s, 1),
            "deliveries_per_s": round(self.deliveries_per_s, 1),
            "seconds": _round(self.usage.seconds),
            "latency_ms": {
                "count": len(lat),
                "p50": _round(self.p(0.5)),
                "p90": _round(self.p(0.9)),
                "p99": _round(self.p(0.99)),
                "max": _round(max(lat)) if lat else None,
                "mean": _round(sum(lat) / len(lat)) if lat else None,
            },
            "missing_deliveries": self.missing,
            "append_transactions": self.transactions or None,
            "append_ms": (
                {
                    "p50": _round(percentile(self.commit_ms, 0.5)),
                    "p99": _round(percentile(self.commit_ms, 0.99)),
                }
                if self.commit_ms
                else None
            ),
            "busy_cores": self.usage.cores(),
            "tcp": self.usage.tcp,
        }


@dataclass
class StormFigure:
    server: str
    backlog: int
    clients: int
    jobs: int
    behind: int
    opened: int
    seconds: float
    """From the start until the last client was ready (caught up, or in its room)."""
    ready: list[float] = field(repr=False)
    last_handshake: float | None
    attempts: int
    errors: dict[str, int]
    replayed: int
    short: int
    """Clients replayed fewer events than their caught-up seq says they have (a gap)."""
    caught_up_seq: list[int] | None
    server_cpu: float | None
    tcp: dict[str, int] | None
    queries: dict[str, int] = field(default_factory=dict)
    requests: int | None = None

    @property
    def label(self) -> str:
        return f"{self.server} (backlog {self.backlog})"

    @property
    def complete(self) -> bool:
        return self.opened == self.clients

    @property
    def handshakes_per_s(self) -> float | None:
        if not self.last_handshake:
            return None
        return self.opened / self.last_handshake

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "listen_backlog": self.backlog,
            "clients": self.clients,
            "jobs": self.jobs,
            "events_behind": self.behind,
            "ready": self.opened,
            "seconds_until_all_ready": _round(self.seconds),
            "ready_seconds": {
                "p50": _round(percentile(self.ready, 0.5)),
                "p99": _round(percentile(self.ready, 0.99)),
                "max": _round(max(self.ready)) if self.ready else None,
            },
            "last_handshake_seconds": _round(self.last_handshake),
            "handshakes_per_s": _round(self.handshakes_per_s, 1),
            "attempts": self.attempts,
            "errors": self.errors,
            "events_replayed": self.replayed,
            "events_expected": self.opened * self.behind,
            "clients_with_a_gap": self.short,
            "caught_up_seq": self.caught_up_seq,
            "replay_queries": self.queries,
            "replay_queries_total": sum(self.queries.values())
            if self.server == "gateway"
            else None,
            "replay_requests_metric": self.requests,
            "server_cpu_seconds": _round(self.server_cpu),
            "tcp": self.tcp,
        }


@dataclass
class MemoryFigure:
    server: str
    connections: int
    """Connections opened between the two readings."""
    total: int
    rss_before_kib: int | None
    rss_after_kib: int | None
    traffic_before: bool
    """Whether fan-out traffic had already run in the process before the first reading."""
    rss_start_kib: int | None = None
    """RSS before the first measured connection (the warm-up clients connected)."""

    @property
    def bytes_per_connection(self) -> float | None:
        """RSS added per connection opened in this step."""
        if self.rss_before_kib is None or self.rss_after_kib is None or not self.connections:
            return None
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / self.connections

    @property
    def bytes_per_connection_total(self) -> float | None:
        """RSS added since the first measured connection, over every connection open."""
        if self.rss_start_kib is None or self.rss_after_kib is None or not self.total:
            return None
        return (self.rss_after_kib - self.rss_start_kib) * 1024 / self.total

    def to_json(self) -> dict[str, Any]:
        per = self.bytes_per_connection
        return {
            "server": self.server,
            "connections_added": self.connections,
            "connections_total": self.total,
            "rss_start_kib": self.rss_start_kib,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "bytes_per_connection": _round(per, 0),
            "bytes_per_connection_total": _round(self.bytes_per_connection_total, 0),
            "after_fanout_traffic": self.traffic_before,
        }


@dataclass
class ReplayFigure:
    """A reconnecting client `events` behind, timed until caught-up, `repeats` times; beside
    it the database's share: the same rows read by the replay query on a connection of its
    own, without decoding or sending. The first reconnection at a gap reads from the log what
    no earlier one read; the gateway keeps the events it read (its replay cache), so the
    reconnections after it are served from memory, as clients of one job are in a storm."""

    events: int
    seconds: list[float] = field(default_factory=list)
    """From the start of the connection to caught-up (connect, authenticate, subscribe,
    replay)."""
    handshake: list[float] = field(default_factory=list)
    """The WebSocket handshake's share of each."""
    replayed: list[int] = field(default_factory=list)
    """Events each reconnection received before caught-up."""
    raw_seconds: list[float] = field(default_factory=list)
    """The replay query for the same rows (asyncpg, records only)."""

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def first(self) -> float | None:
        """The first reconnection at this gap: its events come from the log."""
        return self.seconds[0] if self.seconds else None

    @property
    def again_median(self) -> float | None:
        """The reconnections after the first: their events come from the gateway's cache."""
        return statistics.median(self.seconds[1:]) if len(self.seconds) > 1 else None

    @property
    def raw_median(self) -> float | None:
        return statistics.median(self.raw_seconds) if self.raw_seconds else None

    @property
    def complete(self) -> bool:
        return bool(self.replayed) and all(n == self.events for n in self.replayed)

    def to_json(self) -> dict[str, Any]:
        median = self.median
        return {
            "events": self.events,
            "repeats": len(self.seconds),
            "seconds": [round(v, 5) for v in self.seconds],
            "median_s": _round(median, 5),
            "first_s": _round(self.first, 5),
            "again_median_s": _round(self.again_median, 5),
            "min_s": _round(min(self.seconds), 5) if self.seconds else None,
            "max_s": _round(max(self.seconds), 5) if self.seconds else None,
            "handshake_median_s": _round(
                statistics.median(self.handshake) if self.handshake else None, 5
            ),
            "events_per_s": _round(self.events / median, 1) if median else None,
            "replayed": self.replayed,
            "all_replayed": self.complete,
            "raw_sql_seconds": [round(v, 5) for v in self.raw_seconds],
            "raw_sql_median_s": _round(self.raw_median, 5),
        }


@dataclass
class Report:
    settings: Settings
    fanout: list[dict[str, FanoutFigure]] = field(default_factory=list)
    """Each step's figures by server, the raw baselines first."""
    latency: list[tuple[LatencyFigure, LatencyFigure]] = field(default_factory=list)
    storm: list[StormFigure] = field(default_factory=list)
    memory: list[tuple[MemoryFigure, MemoryFigure]] = field(default_factory=list)
    fanout_latency: list[tuple[LatencyFigure, LatencyFigure]] = field(default_factory=list)
    """(raw, gateway) commit-to-client latency at each fan-out size, one job."""
    replay: list[ReplayFigure] = field(default_factory=list)
    frame_bytes: int = 0
    gateway_env: dict[str, str] = field(default_factory=dict)

    def storm_figure(self, server: str, backlog: int) -> StormFigure | None:
        for figure in self.storm:
            if figure.server == server and figure.backlog == backlog:
                return figure
        return None


# --------------------------------------------------------------------------- the gateway process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Not shown with the results: secrets, and where this run's gateway happened to listen.
_UNSHOWN_VARIABLES = frozenset(
    {"GATEWAY_DATABASE_URL", "GATEWAY_JWT_SECRET", "GATEWAY_HOST", "GATEWAY_PORT"}
)


class GatewayProcess:
    """`python -m services.gateway` on a free port, and its metrics."""

    def __init__(self, child: Child, port: int, http: aiohttp.ClientSession) -> None:
        self.child = child
        self.port = port
        self.http = http
        self.url = f"ws://127.0.0.1:{port}/ws"

    @property
    def pid(self) -> int:
        return self.child.pid

    @classmethod
    async def start(cls, dsn: str, secret: str) -> tuple[GatewayProcess, dict[str, str]]:
        """The gateway with its default settings, except where it listens, the token secret and
        warnings-only logs; returns it and the GATEWAY_* settings it runs with (secrets and
        address left out)."""
        port = _free_port()
        env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": dsn,
            "GATEWAY_JWT_SECRET": secret,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_LOG_JSON": "true",
        }
        shown = {
            k: v for k, v in env.items() if k.startswith("GATEWAY_") and k not in _UNSHOWN_VARIABLES
        }
        child = await Child.start("gateway", ["-m", "services.gateway"], env=env, hello=False)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        gateway = cls(child, port, http)
        try:
            await gateway._wait_ready()
        except BaseException:
            await gateway.stop()
            raise
        return gateway, shown

    async def _wait_ready(self) -> None:
        deadline = time.perf_counter() + _READY_SECONDS
        while True:
            if self.child.process.returncode is not None:
                raise RuntimeError(f"the gateway exited with {self.child.process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.http.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                    if response.status == 200:
                        return
            if time.perf_counter() > deadline:
                raise RuntimeError("the gateway did not become ready")
            await asyncio.sleep(0.1)

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by name and labels."""
        async with self.http.get(f"http://127.0.0.1:{self.port}/metrics") as response:
            text = await response.text()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    async def stop(self) -> None:
        await self.child.stop(quit_command=False)
        await self.http.close()


def _replay_queries(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
    prefix = "gateway_replay_queries_total{query="
    names = {k for k in (*before, *after) if k.startswith(prefix)}
    deltas = {k[len(prefix) : -1]: int(after.get(k, 0) - before.get(k, 0)) for k in sorted(names)}
    return {k: v for k, v in deltas.items() if v}


# --------------------------------------------------------------------------- set-up


@dataclass
class Jobs:
    fanout: list[UUID]
    warm: UUID
    latency: dict[int, list[UUID]]
    """Jobs of each latency split, by clients per job."""
    storm: list[UUID]
    storm_seq: int
    """The storm jobs' seq before the events their clients missed."""
    replay: UUID
    """The job of the replay sweep, with as many events as its largest gap."""
    seqs: dict[UUID, int]
    template: str
    """One progress event as the gateway sends it: the raw server sends the same bytes."""


async def _setup(log: EventLog, settings: Settings) -> Jobs:
    """Every job of the run (queued, started), the storm jobs' missed events, and a template."""
    latency_jobs = {
        per_job: max(1, settings.latency_clients // per_job)
        for per_job in settings.latency_clients_per_job
    }
    total = settings.fanout_jobs + 3 + sum(latency_jobs.values()) + settings.storm_jobs
    seqs = await appends.create_jobs(log, total)
    ids = iter(list(seqs))
    fanout = [next(ids) for _ in range(settings.fanout_jobs)]
    warm, scratch, replay = next(ids), next(ids), next(ids)
    latency = {
        per_job: [next(ids) for _ in range(count)] for per_job, count in latency_jobs.items()
    }
    storm = [next(ids) for _ in range(settings.storm_jobs)]
    storm_seq = seqs[storm[0]]
    payload = appends.progress_payload(settings.payload_bytes)

    def events(count: int) -> list[NewEvent]:
        return [NewEvent(data=payload, actor=appends.ACTOR) for _ in range(count)]

    requests = [
        AppendRequest(job_id=job, expected_seq=seqs[job], events=events(settings.storm_behind))
        for job in storm
    ]
    for start in range(0, len(requests), 10):
        chunk = requests[start : start + 10]
        for request, result in zip(chunk, await log.append_many(chunk), strict=True):
            if isinstance(result, EventLogError):
                raise result
            seqs[request.job_id] = result.last_seq
    for start in range(0, max(settings.replay_gaps, default=0), _SETUP_EVENTS_PER_CALL):
        count = min(_SETUP_EVENTS_PER_CALL, max(settings.replay_gaps) - start)
        seqs[replay] = (await log.append(replay, seqs[replay], events(count))).last_seq
    result = await log.append(scratch, seqs[scratch], events(1))
    (event,) = await log.read_stream(scratch, result.last_seq - 1)
    return Jobs(
        fanout=fanout,
        warm=warm,
        latency=latency,
        storm=storm,
        storm_seq=storm_seq,
        replay=replay,
        seqs=seqs,
        template=encode_event(event).decode(),
    )


# --------------------------------------------------------------------------- the rig


class Rig:
    """The processes of a run and the steps that measure them."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        jobs: Jobs,
        gateway: GatewayProcess,
        raw: Child,
        load: Child,
        token: str,
        progress: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.log = log
        self.jobs = jobs
        self.gateway = gateway
        self.raw = raw
        self.load = load
        self.token = token
        self.say = progress
        self._payload = appends.progress_payload(settings.payload_bytes)
        self._steps = settings.steps()
        self.step_count = 0

    def next_step(self) -> None:
        """Announce the next measurement of `Settings.steps` (the progress display's n of N)."""
        self.step_count += 1
        labels = self._steps
        label = labels[self.step_count - 1] if self.step_count <= len(labels) else "…"
        self.say(step_message(self.step_count, max(len(labels), self.step_count), label))

    def _events(self, count: int) -> list[NewEvent]:
        """New events (each its own id: an id already stored would make the append a no-op)."""
        return [NewEvent(data=self._payload, actor=appends.ACTOR) for _ in range(count)]

    def _pid(self, server: str) -> int:
        return self.gateway.pid if server == "gateway" else self.raw.pid

    def _url(self, server: str, backlog: int = GATEWAY_BACKLOG) -> str:
        if server == "gateway":
            return self.gateway.url
        return f"ws://127.0.0.1:{self.raw.hello['ports'][str(backlog)]}/"

    async def open(
        self,
        group: str,
        server: str,
        count: int,
        jobs: Sequence[UUID],
        *,
        backlog: int = GATEWAY_BACKLOG,
        **options: Any,
    ) -> dict[str, Any]:
        answer = await self.load.request(
            "open",
            group=group,
            url=self._url(server, backlog),
            count=count,
            kind="gateway" if server == "gateway" else "raw",
            jobs=[str(job) for job in jobs],
            token=self.token,
            **{"concurrency": self.settings.connect_concurrency, **options},
        )
        if answer["failed"] and not options.get("retry"):
            raise RuntimeError(
                f"{answer['failed']} of {count} clients could not connect to the {server} "
                f"server: {answer['errors']}"
            )
        return answer

    async def close(self, group: str) -> None:
        await self.load.request("close", group=group)

    async def counts(self) -> dict[str, Any]:
        return await self.load.request("count")

    async def snapshot(self, server: str, produced: int = 0) -> Snapshot:
        counts = await self.counts()
        return Snapshot(
            time=counts["time"],
            events=counts["events"],
            load_cpu=cpu_seconds(self.load.pid),
            server_cpu=cpu_seconds(self._pid(server)),
            parent_cpu=time.process_time(),
            machine=machine_cpu(),
            tcp=tcp_counters(),
            produced=produced,
        )

    async def wait_events(self, target: int) -> int:
        answer = await self.load.request("wait", events=target, timeout=self.settings.drain_timeout)
        return int(answer["events"])

    # -- memory and fan-out ----------------------------------------------------------------------

    async def memory_and_fanout(self, report: Report) -> None:
        """The memory sweep, then fan-out and its latency at each size, largest first.

        Clients connect to both servers in the steps of `connect_steps`, with no traffic yet,
        and each server's RSS is read before and after each step. Then, with every client still
        connected, fan-out at the largest size; clients of the latest steps close to bring each
        server down to the next size, and so on."""
        s = self.settings
        servers = ("raw", "gateway")
        for server in servers:
            await self.open(f"{server}-warm", server, s.warm_clients, [self.jobs.warm])
        await asyncio.sleep(_SETTLE_SECONDS)
        start = {server: rss_kib(self._pid(server)) for server in servers}
        connected: list[tuple[str, int]] = []
        """Groups of clients open on each server, and the total once each was open."""
        previous = 0
        for index, total in enumerate(s.connect_steps):
            self.next_step()
            added = total - previous
            memory: dict[str, MemoryFigure] = {}
            for server in servers:
                self.say(f"  {server}: connecting {added:,} clients ({total:,} in all)")
                before = rss_kib(self._pid(server))
                await self.open(f"{server}-conn-{index}", server, added, self.jobs.fanout)
                await asyncio.sleep(_SETTLE_SECONDS)
                memory[server] = MemoryFigure(
                    server=server,
                    connections=added,
                    total=total,
                    rss_before_kib=before,
                    rss_after_kib=rss_kib(self._pid(server)),
                    traffic_before=False,
                    rss_start_kib=start[server],
                )
            connected.append((f"conn-{index}", total))
            report.memory.append((memory["raw"], memory["gateway"]))
            self.say(
                f"        RSS per idle subscribed connection ({total:,} in all): "
                f"raw {_kib(memory['raw'].bytes_per_connection_total)}, "
                f"gateway {_kib(memory['gateway'].bytes_per_connection_total)}"
            )
            previous = total
        for clients in sorted(s.fanout_clients, reverse=True):
            closed = False
            while connected and connected[-1][1] > clients:
                group, _ = connected.pop()
                for server in servers:
                    await self.close(f"{server}-{group}")
                closed = True
            if not connected or connected[-1][1] != clients:
                raise ValueError(f"{clients} clients is not a step of {s.connect_steps}")
            if closed:
                await asyncio.sleep(_SETTLE_SECONDS)
            figures: dict[str, FanoutFigure] = {}
            for mode in (*(f"raw {mode}" for mode in s.raw_modes), "gateway"):
                self.next_step()
                figures[mode] = figure = await self.fanout(mode, clients)
                baseline = figures[f"raw {s.raw_modes[0]}"]
                self.say(
                    f"  {mode} fan-out to {clients:,}: {figure.rate:,.0f} deliveries/s, "
                    f"server {_us(figure.server_us())} CPU per delivery"
                    + (
                        f" ({_ratio(figure.rate, baseline.rate)} of {baseline.server})"
                        if mode == "gateway"
                        else ""
                    )
                )
            report.fanout.append(figures)
            self.next_step()
            pair: dict[str, LatencyFigure] = {}
            for server in servers:
                pair[server] = latency = await self._latency(
                    server, self.jobs.fanout, clients, rate=s.fanout_latency_rate
                )
                self.say(
                    f"  {server}: {clients:,} clients, {s.fanout_latency_rate:g} events/s: "
                    f"p50 {_ms(latency.p(0.5))} ms, p99 {_ms(latency.p(0.99))} ms, "
                    f"missing {latency.missing}"
                )
            report.fanout_latency.append((pair["raw"], pair["gateway"]))
        for group, _ in reversed(connected):
            for server in servers:
                await self.close(f"{server}-{group}")
        for server in servers:
            await self.close(f"{server}-warm")
        report.fanout.sort(key=lambda figures: figures["gateway"].clients)
        report.fanout_latency.sort(key=lambda pair: pair[1].clients)

    async def fanout(self, server: str, clients: int) -> FanoutFigure:
        """`server` is "gateway" or "raw <mode>". Events go to the fan-out jobs in turn, up to
        20 per call (one append transaction, or one `send` of the raw server), while fewer than
        `backlog_events` per client are in flight, for the warm-up and the window. Then waits
        until every client has every event."""
        s = self.settings
        jobs = self.jobs.fanout
        process = "gateway" if server == "gateway" else "raw"
        subscribers = Counter(i % len(jobs) for i in range(clients))
        start = await self.counts()
        base = int(start["events"])
        limit = s.backlog_events * clients
        state = {"expected": 0, "delivered": 0, "produced": 0}
        stop = asyncio.Event()
        room = asyncio.Event()

        async def produce(index: int, count: int) -> None:
            job = jobs[index]
            if server == "gateway":
                result = await self.log.append(job, self.jobs.seqs[job], self._events(count))
                self.jobs.seqs[job] = result.last_seq
            else:
                await self.raw.request(
                    "send",
                    rooms=[str(job)],
                    frame=self.jobs.template,
                    count=count,
                    mode=server.removeprefix("raw "),
                )

        async def poll() -> None:
            while not stop.is_set():
                state["delivered"] = int((await self.counts())["events"]) - base
                if state["expected"] - state["delivered"] < limit:
                    room.set()
                await asyncio.sleep(_POLL_SECONDS)

        async def producer() -> None:
            turn = 0
            while not stop.is_set():
                in_flight = state["expected"] - state["delivered"]
                if in_flight >= limit:
                    room.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await room.wait()
                    continue
                index = turn % len(jobs)
                turn += 1
                wanted = (limit - in_flight) // max(1, subscribers[index])
                count = max(1, min(_MAX_EVENTS_PER_CALL, wanted))
                await produce(index, count)
                state["produced"] += count
                state["expected"] += count * subscribers[index]

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(poll())
            tasks.create_task(producer())
            try:
                await asyncio.sleep(s.warmup)
                opened = await self.snapshot(process, state["produced"])
                await asyncio.sleep(s.seconds)
                closed = await self.snapshot(process, state["produced"])
            finally:
                stop.set()
                room.set()
        expected = state["expected"]
        received = await self.wait_events(base + expected) - base
        return FanoutFigure(
            server=server,
            clients=clients,
            jobs=len(jobs),
            deliveries=closed.events - opened.events,
            produced=closed.produced - opened.produced,
            usage=Usage.between(opened, closed),
            expected=expected,
            received=received,
            dropped=_since(start["dropped"], (await self.counts())["dropped"]),
        )

    # -- latency ---------------------------------------------------------------------------------

    async def latency(self, report: Report) -> None:
        s = self.settings
        for per_job, jobs in self.jobs.latency.items():
            clients = len(jobs) * per_job
            self.next_step()
            pair: dict[str, LatencyFigure] = {}
            for server in ("raw", "gateway"):
                self.say(
                    f"  {server}: {clients:,} clients on {len(jobs):,} jobs, "
                    f"{s.latency_rate:,.0f} events/s"
                )
                await self.open(f"{server}-latency", server, clients, jobs)
                await asyncio.sleep(_SETTLE_SECONDS)
                try:
                    figure = await self._latency(server, jobs, clients)
                finally:
                    await self.close(f"{server}-latency")
                pair[server] = figure
                self.say(
                    f"        {figure.events_per_s:,.0f} events/s, p50 {_ms(figure.p(0.5))} ms, "
                    f"p99 {_ms(figure.p(0.99))} ms, missing {figure.missing}"
                )
            report.latency.append((pair["raw"], pair["gateway"]))

    async def _latency(
        self, server: str, jobs: list[UUID], clients: int, *, rate: float | None = None
    ) -> LatencyFigure:
        """Events at `rate` (default `latency_rate`) for the warm-up and the window; the
        latencies of those produced inside the window."""
        s = self.settings
        seconds = s.seconds if rate is None else max(s.seconds, s.fanout_latency_seconds)
        rate = s.latency_rate if rate is None else rate
        subscribers = Counter(i % len(jobs) for i in range(clients))
        base = int((await self.counts())["events"])
        await self.load.request("record", on=True)
        duration = s.warmup + seconds + 0.1
        commit_ms: list[float] = []
        produce: Awaitable[dict[tuple[int, int], float]]
        if server == "gateway":
            produce = self._paced_appends(jobs, duration, commit_ms, rate)
        else:
            produce = self._paced_raw(jobs, duration, rate)
        producing = asyncio.ensure_future(produce)
        try:
            await asyncio.sleep(s.warmup)
            opened = await self.snapshot(server)
            await asyncio.sleep(seconds)
            closed = await self.snapshot(server)
        finally:
            sent = await producing
        await self.wait_events(base + sum(subscribers[job] for job, _ in sent))
        records = (await self.load.request("record", on=False))["records"]
        in_window = {key: at for key, at in sent.items() if opened.time <= at <= closed.time}
        latencies = []
        for job, seq, received in records:
            at = in_window.get((int(job), int(seq)))
            if at is not None:
                latencies.append((received - at) * 1000.0)
        expected = sum(subscribers[job] for job, _ in in_window)
        return LatencyFigure(
            server=server,
            clients=clients,
            jobs=len(jobs),
            target_rate=rate,
            events=len(in_window),
            latencies_ms=latencies,
            missing=expected - len(latencies),
            usage=Usage.between(opened, closed),
            transactions=len(commit_ms),
            commit_ms=commit_ms,
        )

    async def _paced_raw(
        self, jobs: list[UUID], duration: float, rate: float
    ) -> dict[tuple[int, int], float]:
        answer = await self.raw.request(
            "paced",
            rooms=[str(job) for job in jobs],
            template=self.jobs.template,
            rate=rate,
            seconds=duration,
        )
        return {(int(job), int(seq)): at for job, seq, at in answer["times"]}

    async def _paced_appends(
        self, jobs: list[UUID], duration: float, commit_ms: list[float], rate: float
    ) -> dict[tuple[int, int], float]:
        """Event n is due at n / rate and goes to job n mod len(jobs). Every `latency_tick`
        (or as soon as the previous transaction commits, when it took longer) the events due
        are appended in one `append_many` transaction; the wall-clock time after the commit is
        each one's commit time."""
        s = self.settings
        commits: dict[tuple[int, int], float] = {}
        started = time.perf_counter()
        ends = started + duration
        number = 0
        while True:
            now = time.perf_counter()
            if now >= ends:
                return commits
            due = min(
                math.floor((now - started) * rate) + 1,
                math.ceil(duration * rate),
            )
            if due <= number:
                await asyncio.sleep(started + number / rate - now)
                continue
            per_job = Counter((n % len(jobs)) for n in range(number, due))
            requests = [
                AppendRequest(
                    job_id=jobs[index],
                    expected_seq=self.jobs.seqs[jobs[index]],
                    events=self._events(n),
                )
                for index, n in per_job.items()
            ]
            began = time.perf_counter()
            results = await self.log.append_many(requests)
            committed = time.time()
            commit_ms.append((time.perf_counter() - began) * 1000.0)
            for index, result in zip(per_job, results, strict=True):
                if isinstance(result, EventLogError):
                    raise result
                self.jobs.seqs[jobs[index]] = result.last_seq
                for seq in range(result.first_seq, result.last_seq + 1):
                    commits[(index, seq)] = committed
            number = due
            await asyncio.sleep(max(0.0, began + s.latency_tick - time.perf_counter()))

    # -- the reconnect storm ---------------------------------------------------------------------

    async def storm(self, report: Report) -> None:
        s = self.settings
        plan = [("raw", backlog) for backlog in s.storm_raw_backlogs]
        plan.append(("gateway", GATEWAY_BACKLOG))
        for server, backlog in plan:
            self.next_step()
            self.say(
                f"  {server} (listen backlog {backlog}): {s.storm_clients:,} clients connect "
                "at once"
                + (
                    f" and resubscribe, {s.storm_behind} events behind"
                    if server == "gateway"
                    else ""
                )
            )
            figure = await self._storm(server, backlog)
            report.storm.append(figure)
            self.say(
                f"        all {figure.opened:,} ready in {figure.seconds:.2f} s "
                f"(p50 {percentile(figure.ready, 0.5):.2f} s), {figure.attempts:,} attempts"
                + (f" {figure.errors}" if figure.errors else "")
                + (
                    f", {sum(figure.queries.values())} replay queries"
                    if server == "gateway"
                    else ""
                )
                + f", kernel: {figure.tcp}"
            )

    async def _storm(self, server: str, backlog: int) -> StormFigure:
        s = self.settings
        gateway = server == "gateway"
        metrics_before = await self.gateway.metrics() if gateway else {}
        tcp_before = tcp_counters()
        cpu_before = cpu_seconds(self._pid(server))
        answer = await self.open(
            f"{server}-storm",
            server,
            s.storm_clients,
            self.jobs.storm,
            backlog=backlog,
            after_seq=self.jobs.storm_seq,
            concurrency=0,
            retry=True,
            deadline=s.storm_deadline,
        )
        cpu_after = cpu_seconds(self._pid(server))
        tcp_after = tcp_counters()
        metrics_after = await self.gateway.metrics() if gateway else {}
        await self.close(f"{server}-storm")
        requests = "gateway_replay_requests_total"
        return StormFigure(
            server=server,
            backlog=backlog,
            clients=s.storm_clients,
            jobs=s.storm_jobs,
            behind=s.storm_behind if gateway else 0,
            opened=answer["opened"],
            seconds=max(answer["ready"], default=answer["seconds"]),
            ready=answer["ready"],
            last_handshake=answer["last_handshake"],
            attempts=answer["attempts"],
            errors=answer["errors"],
            replayed=answer["replayed"],
            short=answer["short"],
            caught_up_seq=answer["caught_up_seq"],
            server_cpu=_diff(cpu_after, cpu_before),
            tcp=counter_deltas(tcp_before, tcp_after),
            queries=_replay_queries(metrics_before, metrics_after),
            requests=(
                int(metrics_after.get(requests, 0) - metrics_before.get(requests, 0))
                if gateway
                else None
            ),
        )

    # -- replay after a gap --------------------------------------------------------------------

    async def replay(self, report: Report, conn: asyncpg.Connection) -> None:
        """For each gap N: a client reconnects N events behind the replay job's last seq, timed
        until caught-up (`replay_repeats` times), alternating with the replay query for the same
        rows on `conn` (the database's share, without decoding or sending)."""
        s = self.settings
        if not s.replay_gaps:
            return
        self.next_step()
        job = self.jobs.replay
        last = self.jobs.seqs[job]
        # A first reconnection: the gateway's first replay of a job pays for cold caches.
        await self.open("replay", "gateway", 1, [job], after_seq=max(0, last - 1), concurrency=0)
        await self.close("replay")
        for gap in sorted(s.replay_gaps):
            figure = ReplayFigure(events=min(gap, last))
            after = last - figure.events
            for _ in range(s.replay_repeats):
                answer = await self.open("replay", "gateway", 1, [job], after_seq=after)
                await self.close("replay")
                figure.seconds.append(float(answer["ready"][0]))
                figure.handshake.append(float(answer["last_handshake"]))
                figure.replayed.append(int(answer["replayed"]))
                began = time.perf_counter()
                rows = await conn.fetch(QUERIES["read_stream"], job, after, None)
                figure.raw_seconds.append(time.perf_counter() - began)
                if len(rows) != figure.events:
                    raise RuntimeError(f"the replay query read {len(rows)} of {gap} events")
            report.replay.append(figure)
            self.say(
                f"  {figure.events:,} events behind: caught up in "
                f"{_ms((figure.first or math.nan) * 1000)} ms the first time (from the log), "
                f"{_ms((figure.again_median or math.nan) * 1000)} ms again (cached, median of "
                f"{len(figure.seconds) - 1}), the query alone "
                f"{_ms((figure.raw_median or math.nan) * 1000)} ms"
                + ("" if figure.complete else f"; replayed {figure.replayed}")
            )


def _since(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def measure_all(
    dsn: str, settings: Settings, *, progress: Callable[[str], None] | None = None
) -> Report:
    """Run the whole plan against a migrated database (which it fills with jobs and events)."""
    say = progress or (lambda _message: None)
    raise_open_files(OPEN_FILES)
    report = Report(settings=settings)
    secret = secrets.token_urlsafe(32)
    token = issue_token(secret, USER, projects=[PROJECT], ttl=24 * 3600)
    async with contextlib.AsyncExitStack() as stack:
        notifier = Notifier(dsn)
        stack.push_async_callback(_stop_task, asyncio.create_task(notifier.run()))
        shared = await stack.enter_async_context(pool(dsn, settings.writers))
        log = EventLog(shared, notify=False, on_commit=notifier.poke)
        say("setting up jobs; starting the gateway, the raw server and the load client …")
        jobs = await _setup(log, settings)
        report.frame_bytes = len(jobs.template.encode())
        gateway, report.gateway_env = await GatewayProcess.start(dsn, secret)
        stack.push_async_callback(gateway.stop)
        backlogs = [arg for backlog in settings.raw_backlogs for arg in ("--backlog", str(backlog))]
        raw = await Child.start("raw server", ["-m", "bench.fanout_raw", *backlogs])
        stack.push_async_callback(raw.stop)
        load = await Child.start("load client", ["-m", "bench.fanout_load"])
        stack.push_async_callback(load.stop)
        (conn,) = await stack.enter_async_context(connections(dsn, 1))
        rig = Rig(settings, log, jobs, gateway, raw, load, token, say)
        say("memory per idle connection, fan-out and its latency by clients")
        await rig.memory_and_fanout(report)
        say("commit-to-client latency")
        await rig.latency(report)
        say("reconnect storm")
        await rig.storm(report)
        say("replay after a gap")
        await rig.replay(report, conn)
    return report


# --------------------------------------------------------------------------- reporting


def _kib(value: float | None) -> str:
    return "—" if value is None else f"{value / 1024:.1f} KiB"


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} µs"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}×"


def _goal(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "NO")


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


CORES_HEADER = "busy cores: server / load / appender / rest"


def fanout_table(report: Report) -> Table:
    baseline_mode = f"raw {report.settings.raw_modes[0]}"
    table = Table(
        headers=[
            "clients × jobs",
            "server",
            "deliveries/s",
            f"÷ {baseline_mode}",
            f"goal ≥ {GOAL_FANOUT_RATIO}",
            "server CPU µs/delivery",
            "deliveries per CPU-s ÷ raw",
            "load CPU µs/delivery",
            CORES_HEADER,
            "machine cores",
            "all delivered",
            "closed by server",
        ],
        left=frozenset({0, 1}),
    )
    for figures in report.fanout:
        baseline = figures[baseline_mode]
        gateway = figures["gateway"]
        ratio = gateway.rate / baseline.rate if baseline.rate else None
        for figure in figures.values():
            is_gateway = figure is gateway
            base_us, us = baseline.server_us(), figure.server_us()
            table.add(
                f"{figure.clients:,} × {figure.jobs}",
                figure.server,
                f"{figure.rate:,.0f}",
                _ratio(figure.rate, baseline.rate) if figure is not baseline else "",
                _goal(None if ratio is None else ratio >= GOAL_FANOUT_RATIO) if is_gateway else "",
                _num(us),
                _ratio(base_us, us) if figure is not baseline and us else "",
                _num(figure.load_us()),
                figure.usage.text(),
                _num(figure.usage.machine_busy_cores, 2),
                "yes" if figure.complete else f"NO ({figure.received:,}/{figure.expected:,})",
                ", ".join(f"{n} × {code}" for code, n in figure.dropped.items()) or "0",
            )
    return table


def latency_table(
    report: Report, pairs: Sequence[tuple[LatencyFigure, LatencyFigure]] | None = None
) -> Table:
    table = Table(
        headers=[
            "clients × jobs",
            "server",
            "events/s",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            f"goal p99 < {GOAL_P99_MS:g}",
            "missing",
            "appends: tx/s, p50 / p99 ms",
            CORES_HEADER,
            "machine cores",
        ],
        left=frozenset({0, 1}),
    )
    for raw, gateway in report.latency if pairs is None else pairs:
        for figure in (raw, gateway):
            lat = figure.latencies_ms
            appends_cell = "—"
            if figure.commit_ms:
                appends_cell = (
                    f"{figure.transactions / figure.usage.seconds:,.0f}, "
                    f"{percentile(figure.commit_ms, 0.5):.1f} / "
                    f"{percentile(figure.commit_ms, 0.99):.1f}"
                )
            table.add(
                f"{figure.clients:,} × {figure.jobs:,}",
                figure.server,
                f"{figure.events_per_s:,.0f}",
                f"{figure.deliveries_per_s:,.0f}",
                _ms(figure.p(0.5)),
                _ms(figure.p(0.9)),
                _ms(figure.p(0.99)),
                _ms(max(lat)) if lat else "—",
                _goal(figure.p(0.99) < GOAL_P99_MS) if figure is gateway else "",
                f"{figure.missing:,}",
                appends_cell,
                figure.usage.text(),
                _num(figure.usage.machine_busy_cores, 2),
            )
    return table


def storm_table(report: Report) -> Table:
    table = Table(
        headers=[
            "server",
            "ready",
            "jobs × behind",
            "all ready s",
            f"goal < {GOAL_STORM_SECONDS:g} s",
            "p50 s",
            "p99 s",
            "handshakes/s",
            "attempts",
            "events replayed (expected)",
            "clients with a gap",
            "replay queries",
            "queries per job / per client",
            "server CPU s",
            "listen overflows",
            "TCP timeouts",
        ],
        left=frozenset({0, 2, 11}),
    )
    for figure in report.storm:
        row = figure.to_json()
        gateway = figure.server == "gateway"
        total = sum(figure.queries.values())
        table.add(
            figure.label,
            f"{figure.opened:,}/{figure.clients:,}",
            f"{figure.jobs} × {figure.behind}",
            f"{figure.seconds:.2f}",
            _goal(figure.complete and figure.seconds < GOAL_STORM_SECONDS) if gateway else "",
            _num(row["ready_seconds"]["p50"], 2),
            _num(row["ready_seconds"]["p99"], 2),
            _num(figure.handshakes_per_s, 0),
            f"{figure.attempts:,}",
            f"{figure.replayed:,} ({figure.opened * figure.behind:,})" if gateway else "—",
            f"{figure.short:,}" if gateway else "—",
            (
                f"{total:,} (" + ", ".join(f"{k} {v:,}" for k, v in figure.queries.items()) + ")"
                if gateway
                else "—"
            ),
            f"{total / figure.jobs:.1f} / {total / figure.clients:.3f}" if gateway else "—",
            _num(figure.server_cpu, 2),
            _num((figure.tcp or {}).get("ListenOverflows"), 0),
            _num((figure.tcp or {}).get("TCPTimeouts"), 0),
        )
    return table


def memory_table(report: Report) -> Table:
    table = Table(
        headers=[
            "connections (added)",
            "server",
            "RSS before MiB",
            "RSS after MiB",
            "per connection added",
            "per connection, all open",
            "÷ raw",
            f"goal < {GOAL_BYTES_PER_CONNECTION // 1000} kB",
            "after fan-out traffic",
        ],
        left=frozenset({0, 1}),
    )
    for raw, gateway in report.memory:
        for figure in (raw, gateway):
            per = figure.bytes_per_connection_total
            is_gateway = figure is gateway
            table.add(
                f"{figure.total:,} ({figure.connections:,})",
                figure.server,
                _num((figure.rss_before_kib or 0) / 1024),
                _num((figure.rss_after_kib or 0) / 1024),
                _kib(figure.bytes_per_connection),
                _kib(per),
                _ratio(per, raw.bytes_per_connection_total) if is_gateway else "",
                _goal(None if per is None else per < GOAL_BYTES_PER_CONNECTION)
                if is_gateway
                else "",
                "yes" if figure.traffic_before else "no",
            )
    return table


def replay_table(report: Report) -> Table:
    table = Table(
        headers=[
            "events missed",
            "reconnections",
            "first ms (from the log)",
            "again: median ms (cached)",
            "caught up: median ms",
            "min / max ms",
            "handshake ms",
            "events/s",
            "replay query alone ms",
            "first ÷ query",
            "every event replayed",
        ]
    )
    for figure in report.replay:
        row = figure.to_json()
        median, raw = figure.median, figure.raw_median
        table.add(
            f"{figure.events:,}",
            str(len(figure.seconds)),
            _num(None if figure.first is None else figure.first * 1000, 1),
            _num(None if figure.again_median is None else figure.again_median * 1000, 1),
            _num(None if median is None else median * 1000, 1),
            f"{_num((row['min_s'] or 0) * 1000, 1)} / {_num((row['max_s'] or 0) * 1000, 1)}",
            _num((row["handshake_median_s"] or 0) * 1000, 1),
            _num(row["events_per_s"], 0),
            _num(None if raw is None else raw * 1000, 2),
            _ratio(figure.first, raw),
            "yes" if figure.complete else f"NO {figure.replayed}",
        )
    return table


def _notes(report: Report) -> list[str]:
    s = report.settings
    notes = []
    if s.reduced:
        notes.append(
            "Quick run: fewer clients than the issue asks for (fan-out "
            f"{', '.join(f'{n:,}' for n in s.fanout_clients)}; memory up to "
            f"{max(s.connect_steps):,} connections; storm {s.storm_clients:,}; "
            f"latency with {', '.join(str(n) for n in s.latency_clients_per_job)} clients per "
            "job only). Run without --quick for the figures the goals are about."
        )
    notes.append(
        "Memory: clients connect to both servers in steps "
        f"({', '.join(f'{n:,}' for n in s.connect_steps)} in all) before any fan-out traffic; "
        "'per connection, all open' is each server's RSS growth since before the first of them "
        "over every connection open (the goal's figure), 'per connection added' the growth "
        "during the step over the connections it added."
    )
    notes.append(
        "Latency by clients: every client follows one job, which gets "
        f"{s.fanout_latency_rate:g} events/s (one commit each); the raw server broadcasts the "
        "same frames at the same rate, timed just before each is written. Fan-out sizes are "
        "measured from the largest down, closing clients in between."
    )
    if report.replay:
        notes.append(
            "Replay: one client reconnects N events behind (connect, authenticate, subscribe "
            "with afterSeq) and is timed until caught-up, median of "
            f"{s.replay_repeats}; 'replay query alone' reads the same rows with the gateway's "
            "kind of query on a connection of its own (no decoding, no sending): the database's "
            "share."
        )
    notes.append(
        "Latency: the appender commits the events due every "
        f"{s.latency_tick * 1000:g} ms in one append_many transaction (the 'appends' column); "
        "a commit per event at this rate would take more CPU than the machine has beside the "
        "servers and the load client."
    )
    gateway = report.storm_figure("gateway", GATEWAY_BACKLOG)
    if gateway is not None:
        total = sum(gateway.queries.values())
        notes.append(
            f"Storm: {gateway.opened:,} of {gateway.clients:,} clients on {gateway.jobs} jobs "
            f"caught up; the gateway sent {total:,} replay queries "
            f"({total / gateway.jobs:.1f} per job, {total / gateway.clients:.3f} per client); "
            f"{gateway.replayed:,} events replayed (expected "
            f"{gateway.opened * gateway.behind:,}); caught-up seq {gateway.caught_up_seq}."
        )
        if gateway.short:
            notes.append(
                f"LOSS: {gateway.short:,} gateway clients reached caught-up without every event "
                f"since their afterSeq ({gateway.replayed:,} events replayed, "
                f"{gateway.opened * gateway.behind:,} owed)."
            )
        if gateway.requests == 0 and total:
            notes.append(
                "The gateway's gateway_replay_requests metric stayed at 0 while it sent replay "
                "queries: nothing increments it."
            )
    overflowed = [f for f in report.storm if f.tcp and f.tcp.get("ListenOverflows")]
    if overflowed:
        notes.append(
            "The kernel dropped connections at a full accept queue during the storm of "
            + ", ".join(f"{f.label} ({f.tcp['ListenOverflows']:,})" for f in overflowed if f.tcp)
            + ": a client whose SYN is dropped retries after 1 s, then 3 s, 7 s…, which is "
            "what the slowest clients' times are made of."
        )
    pruned = [
        f"{figure.server} {figure.clients:,}"
        for figures in report.fanout
        for figure in figures.values()
        if figure.usage.tcp and figure.usage.tcp.get("TCPTimeouts")
    ]
    if pruned:
        notes.append(
            "TCP retransmission timeouts during fan-out windows (" + ", ".join(pruned) + "): "
            "those figures include time both ends sat idle."
        )
    return notes


def render(
    report: Report,
    *,
    server: Mapping[str, Any],
    machine: Mapping[str, Any],
    source: str,
    started_at: str,
    duration_seconds: float,
) -> Rendered:
    """The run as terminal text, as Markdown and as the JSON document with every figure."""
    s = report.settings
    config = server.get("settings", {})
    header = (
        f"PostgreSQL {server.get('server_version')} ({source}): fsync={config.get('fsync')}, "
        f"synchronous_commit={config.get('synchronous_commit')}; {machine.get('cpu_count')} "
        "CPUs shared by the gateway, the raw server, the load client, the appender (this "
        f"process) and PostgreSQL; Python {machine.get('python')}, websockets "
        f"{machine.get('websockets')}, loop {machine.get('event_loop')}"
    )
    code = machine.get("code") or {}
    if code.get("commit"):
        header += f"; gateway at commit {code['commit']}" + (
            " with uncommitted changes" if code.get("gateway_changed_since_commit") else ""
        )
    method = (
        f"{s.seconds:g} s per figure after {s.warmup:g} s warm-up; frames of "
        f"{report.frame_bytes} bytes (a progress event's envelope; the raw server sends the "
        "same bytes); deliveries are live event frames counted by the load client; CPU time "
        "from /proc, as busy cores of each process ('rest' is the machine's other busy cores: "
        f"PostgreSQL and anything else running). Fan-out keeps {s.backlog_events} events per "
        "client in flight on both servers. Gateway settings: defaults, with "
        + ", ".join(f"{k}={v}" for k, v in sorted(report.gateway_env.items()))
        + "."
    )
    loads = [machine.get("idle_load_before"), machine.get("idle_load_after")]
    if any(load is not None for load in loads):
        shown = " / ".join("—" if load is None else f"{load:.2f}" for load in loads)
        busy = any(load is not None and load > appends.BUSY_MACHINE_CORES for load in loads)
        method += f" Busy cores while the benchmark sat idle, before / after: {shown}" + (
            " — the machine was shared with other work: figures are depressed and noisy."
            if busy
            else "."
        )
    tables = [
        ("Fan-out (every client follows the same job)", fanout_table(report)),
        (
            f"Commit-to-client latency by clients (one job, {s.fanout_latency_rate:g} events/s)",
            latency_table(report, report.fanout_latency),
        ),
        ("Commit-to-client latency", latency_table(report)),
        ("Reconnect storm", storm_table(report)),
        ("Memory per idle subscribed connection (RSS)", memory_table(report)),
        ("Replay after a gap (one client reconnecting)", replay_table(report)),
    ]
    notes = _notes(report)
    text_parts = [f"Fan-out — {started_at}", header, method]
    md_parts = [f"# Fan-out — {started_at}", "", header, "", method]
    for title, table in tables:
        text_parts += ["", title, table.text()]
        md_parts += ["", f"## {title}", "", table.markdown()]
    text_parts += ["", *notes]
    md_parts += ["", *(f"- {line}" for line in notes)]
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "started_at": started_at,
        "duration_seconds": round(duration_seconds, 1),
        "settings": asdict(s),
        "machine": dict(machine),
        "server": {"source": source, **server},
        "frame_bytes": report.frame_bytes,
        "gateway_env": report.gateway_env,
        "goals": {
            "fanout_ratio_at_least": GOAL_FANOUT_RATIO,
            "latency_p99_ms_below": GOAL_P99_MS,
            "storm_seconds_below": GOAL_STORM_SECONDS,
            "bytes_per_connection_below": GOAL_BYTES_PER_CONNECTION,
        },
        "fanout": [
            {
                **{server: figure.to_json() for server, figure in figures.items()},
                "ratio": {
                    f"gateway / {server}": _round(
                        figures["gateway"].rate / figure.rate if figure.rate else None
                    )
                    for server, figure in figures.items()
                    if server != "gateway"
                },
            }
            for figures in report.fanout
        ],
        "latency": [
            {"raw": raw.to_json(), "gateway": gateway.to_json()} for raw, gateway in report.latency
        ],
        "fanout_latency": [
            {"raw": raw.to_json(), "gateway": gateway.to_json()}
            for raw, gateway in report.fanout_latency
        ],
        "replay": [figure.to_json() for figure in report.replay],
        "storm": [figure.to_json() for figure in report.storm],
        "memory": [
            {
                "connections": gateway.total,
                "raw": raw.to_json(),
                "gateway": gateway.to_json(),
                "ratio": _round(
                    (gateway.bytes_per_connection_total or 0) / raw.bytes_per_connection_total
                    if raw.bytes_per_connection_total
                    else None
                ),
            }
            for raw, gateway in report.memory
        ],
        "notes": notes,
    }
    return Rendered(text="\n".join(text_parts), markdown="\n".join(md_parts), payload=payload)


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the gateway's code differed from it: the gateway
    changes often, and a figure means little without the code it was measured on."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "services/gateway", "schemas")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "gateway_changed_since_commit": None if changed is None else bool(changed),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


async def main(ctx: Context) -> None:
    """Run the benchmark in a fresh database, print the tables, write fanout.json/.md."""
    settings = Settings.for_run(seconds=ctx.seconds, warmup=ctx.warmup, quick=ctx.quick)
    if settings.reduced:
        ctx.progress(
            "quick run: fewer clients than the full benchmark (fan-out "
            f"{', '.join(f'{n:,}' for n in settings.fanout_clients)}, "
            f"storm {settings.storm_clients:,})"
        )
    await run_benchmark(
        ctx,
        NAME,
        lambda dsn: measure_all(dsn, settings, progress=ctx.progress),
        render,
        {"websockets": _version("websockets"), "code": code_version()},
    )
