"""Side by side: the gateway against python-socketio (AsyncServer on aiohttp), the same events to
the same clients, in one run.

Processes, each on uvloop: the gateway as deployed and its load client (`bench.fanout_load`),
the raw websockets server (`bench.fanout_raw`, for context), python-socketio's server
(`bench.socketio_server`) and its load client (`bench.socketio_load`: Engine.IO 4 over the
gateway load client's own lean WebSocket client, because python-socketio's AsyncClient would be
the bottleneck). The gateway's figures come from `bench.fanout`'s own machinery (`Rig.fanout`), and
python-socketio is driven through the same `Rig` with the same flow control: N clients in one
room (one job), events produced at full speed while fewer than `backlog_events` per client are
in flight.

Figures for each server: delivered events/s; p99 latency from the timestamp of each event
(gateway: the event's ``occurredAt``, stamped before its append commits; python-socketio: the
time of its ``emit``) to its receipt; RSS per idle connection (the server's RSS before and after
the N clients connect and join). Then what a client misses while disconnected for
`gap_seconds` during emission: python-socketio's default mode resends nothing; the gateway's SDK
resubscribes after the last seq it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from uuid import UUID

import websockets

from services import sdk
from services.common.auth import issue_token
from services.common.eventlog import EventLog

from . import fanout, socketio_load
from .common import Context, Rendered, Table, percentile, pool, run_benchmark, step_message
from .control import Child, raise_open_files, rss_kib

NAME = "socketio"
GOAL_RATIO = 4.0
STEPS = 4
"""Measurements of a run: one per server, and the disconnect test."""
_SETTLE_SECONDS = 0.3


@dataclass(frozen=True)
class Settings:
    seconds: float = 5.0
    warmup: float = 1.0
    clients: int = 1000
    backlog_events: int = 32
    payload_bytes: int = 290
    warm_clients: int = 20
    gap_rate: float = 200.0
    gap_seconds: float = 1.0
    drain_timeout: float = 15.0
    reduced: bool = False

    @classmethod
    def for_run(cls, *, seconds: float, warmup: float, quick: bool) -> Settings:
        if quick:
            return cls(seconds=seconds, warmup=warmup, clients=200, reduced=True)
        return cls(seconds=seconds, warmup=warmup)

    def fanout_settings(self) -> fanout.Settings:
        return fanout.Settings(
            seconds=self.seconds,
            warmup=self.warmup,
            memory_clients=(self.clients,),
            fanout_clients=(self.clients,),
            raw_modes=("broadcast",),
            backlog_events=self.backlog_events,
            latency_clients=1,
            latency_clients_per_job=(1,),
            storm_jobs=1,
            storm_behind=1,
            replay_gaps=(),
            warm_clients=self.warm_clients,
            payload_bytes=self.payload_bytes,
            drain_timeout=self.drain_timeout,
            reduced=self.reduced,
        )


@dataclass
class Side:
    server: str
    figure: fanout.FanoutFigure
    rss_before_kib: int | None
    rss_after_kib: int | None
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    missed_after_gap: int | None = None
    sent_during_gap_test: int | None = None

    @property
    def bytes_per_connection(self) -> float | None:
        if self.rss_before_kib is None or self.rss_after_kib is None:
            return None
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / self.figure.clients

    def p99(self) -> float | None:
        return percentile(self.latencies_ms, 0.99) if self.latencies_ms else None

    def to_json(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            **self.figure.to_json(),
            "server": self.server,
            "latency_ms": {
                "count": len(lat),
                "p50": _r(percentile(lat, 0.5)) if lat else None,
                "p99": _r(self.p99()),
                "max": _r(max(lat)) if lat else None,
            },
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "bytes_per_idle_connection": _r(self.bytes_per_connection, 0),
            "missed_after_gap": self.missed_after_gap,
            "sent_during_gap_test": self.sent_during_gap_test,
        }


@dataclass
class Report:
    settings: Settings
    sides: dict[str, Side] = field(default_factory=dict)
    frame_bytes: int = 0

    @property
    def ratio(self) -> float | None:
        gateway, sio = self.sides.get("gateway"), self.sides.get("python-socketio")
        if gateway is None or sio is None or sio.figure.rate <= 0:
            return None
        return gateway.figure.rate / sio.figure.rate


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- measuring


async def _memory(rig: fanout.Rig, server: str, clients: int, room: UUID) -> tuple[Any, Any]:
    pid = rig.gateway.pid if server == "gateway" else rig.raw.pid
    before = rss_kib(pid)
    await rig.open(f"{server}-fanout", server, clients, [room])
    await asyncio.sleep(_SETTLE_SECONDS)
    return before, rss_kib(pid)


async def _recorded(
    rig: fanout.Rig, mode: str, clients: int
) -> tuple[fanout.FanoutFigure, list[Any]]:
    await rig.load.request("record", on=True)
    try:
        figure = await rig.fanout(mode, clients)
    finally:
        records = (await rig.load.request("record", on=False))["records"]
    return figure, records


async def _socketio_gap(base: str, server: Child, s: Settings) -> tuple[int, int]:
    """A client in room "gap" leaves for `gap_seconds` while the server emits at `gap_rate`,
    then comes back: events it never got, of those emitted."""
    seen: set[int] = set()
    room = "gap"

    async def listen(ws: Any, until: float) -> None:
        with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
            async with asyncio.timeout(max(0.0, until - time.perf_counter())):
                while True:
                    message = await ws.recv(decode=False)
                    if message.startswith(socketio_load.EVENT):
                        seen.add(socketio_load.event_seq(message))
                    elif message == socketio_load.PING:
                        await ws.send(socketio_load.PONG, text=True)

    duration = 3 * s.gap_seconds + 1.0
    ws = await socketio_load.handshake(base, room)
    paced = asyncio.create_task(
        server.request("paced", room=room, rate=s.gap_rate, seconds=duration)
    )
    started = time.perf_counter()
    await listen(ws, started + s.gap_seconds)
    await ws.close()
    await asyncio.sleep(s.gap_seconds)
    ws = await socketio_load.handshake(base, room)
    await listen(ws, started + duration + 0.5)
    await ws.close()
    sent = int((await paced)["sent"])
    return sent - len(seen & set(range(1, sent + 1))), sent


async def _gateway_gap(
    rig: fanout.Rig, log: EventLog, job: UUID, token: str, s: Settings
) -> tuple[int, int]:
    """The same with the gateway: the SDK's subscription is dropped for `gap_seconds` while
    events are appended, then resubscribes after the last seq it saw."""
    start = rig.jobs.seqs[job]
    duration = 3 * s.gap_seconds + 1.0
    appended = 0

    async def append() -> None:
        nonlocal appended
        began = time.perf_counter()
        while time.perf_counter() - began < duration:
            result = await log.append(job, rig.jobs.seqs[job], rig._events(1))
            rig.jobs.seqs[job] = result.last_seq
            appended += 1
            await asyncio.sleep(max(0.0, began + appended / s.gap_rate - time.perf_counter()))

    seen: set[int] = set()

    async def follow(after: int, until: float | None) -> int:
        last = after
        stream = sdk.subscribe(rig.gateway.url, token, job_id=job, after=after)
        try:
            async with asyncio.timeout(duration + 10):
                async for event in stream:
                    seen.add(event.seq)
                    last = event.seq
                    if until is not None and time.perf_counter() >= until:
                        break
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return last

    writer = asyncio.create_task(append())
    last = await follow(start, time.perf_counter() + s.gap_seconds)
    await asyncio.sleep(s.gap_seconds)
    rest = asyncio.create_task(follow(last, None))
    await writer
    final = rig.jobs.seqs[job]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(s.drain_timeout):
            while final not in seen and not rest.done():  # noqa: ASYNC110 (a short poll)
                await asyncio.sleep(0.05)
    rest.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await rest
    wanted = set(range(start + 1, rig.jobs.seqs[job] + 1))
    return len(wanted - seen), appended


async def measure_all(
    dsn: str, settings: Settings, *, progress: Callable[[str], None] | None = None
) -> Report:
    say = progress or (lambda _message: None)
    raise_open_files(fanout.OPEN_FILES)
    fs = settings.fanout_settings()
    report = Report(settings=settings)
    secret = secrets.token_urlsafe(32)
    token = issue_token(secret, fanout.USER, projects=[fanout.PROJECT], ttl=24 * 3600)
    n = settings.clients
    backlog = str(fanout.GATEWAY_BACKLOG)
    async with contextlib.AsyncExitStack() as stack:
        shared = await stack.enter_async_context(pool(dsn, fs.writers))
        # The gateway learns of commits by NOTIFY here (no coalescing notifier in this process).
        log = EventLog(shared)
        say("setting up jobs; starting the gateway, python-socketio and the load clients …")
        jobs = await fanout._setup(log, fs)
        report.frame_bytes = len(jobs.template.encode())
        gateway, _env = await fanout.GatewayProcess.start(dsn, secret)
        stack.push_async_callback(gateway.stop)
        raw = await Child.start("raw server", ["-m", "bench.fanout_raw", "--backlog", backlog])
        stack.push_async_callback(raw.stop)
        load = await Child.start("load client", ["-m", "bench.fanout_load"])
        stack.push_async_callback(load.stop)
        sio = await Child.start(
            "socketio server", ["-m", "bench.socketio_server", "--backlog", backlog]
        )
        stack.push_async_callback(sio.stop)
        sio_load = await Child.start("socketio load client", ["-m", "bench.socketio_load"])
        stack.push_async_callback(sio_load.stop)
        rig = fanout.Rig(fs, log, jobs, gateway, raw, load, token, say)
        sio_rig = fanout.Rig(fs, log, jobs, gateway, sio, sio_load, token, say)
        room = jobs.fanout[0]

        for number, (name, r, server) in enumerate(
            (
                ("raw websockets", rig, "raw"),
                ("gateway", rig, "gateway"),
                ("python-socketio", sio_rig, "raw"),
            ),
            start=1,
        ):
            say(step_message(number, STEPS, f"{name}: {n:,} clients"))
            await r.open(f"{server}-warm", server, fs.warm_clients, [jobs.warm])
            await asyncio.sleep(_SETTLE_SECONDS)
            say(f"  {name}: connecting {n:,} clients")
            before, after = await _memory(r, server, n, room)
            mode = {"raw websockets": "raw broadcast", "gateway": "gateway"}.get(
                name, "raw socketio"
            )
            figure, records = await _recorded(r, mode, n)
            side = Side(name, dataclasses.replace(figure, server=name), before, after)
            if name == "gateway":
                first = min((seq for _, seq, _ in records), default=1)
                stamped = {
                    e.seq: e.occurred_at.timestamp() for e in await log.read_stream(room, first - 1)
                }
                side.latencies_ms = [
                    (t - stamped[seq]) * 1000 for _, seq, t in records if seq in stamped
                ]
            elif name == "python-socketio":
                emitted = dict((await sio.request("times"))["times"])
                emitted = {int(k): v for k, v in emitted.items()}
                side.latencies_ms = [
                    (t - emitted[seq]) * 1000 for _, seq, t in records if seq in emitted
                ]
            report.sides[name] = side
            p99 = side.p99()
            say(
                f"  {name}: {figure.rate:,.0f} events/s delivered to {n:,} clients"
                + ("" if p99 is None else f", p99 {p99:.1f} ms")
                + f", {fanout._kib(side.bytes_per_connection)} per idle connection"
            )
            await r.close(f"{server}-fanout")
            await r.close(f"{server}-warm")

        say(
            step_message(
                STEPS, STEPS, f"events missed across a {settings.gap_seconds:g} s disconnect"
            )
        )
        missed, sent = await _socketio_gap(sio_rig._url("raw"), sio, settings)
        report.sides["python-socketio"].missed_after_gap = missed
        report.sides["python-socketio"].sent_during_gap_test = sent
        gap_job = next(iter(jobs.latency.values()))[0]
        missed, sent = await _gateway_gap(rig, log, gap_job, token, settings)
        report.sides["gateway"].missed_after_gap = missed
        report.sides["gateway"].sent_during_gap_test = sent
    return report


# --------------------------------------------------------------------------- reporting


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def render(
    report: Report,
    *,
    server: Mapping[str, Any],
    machine: Mapping[str, Any],
    source: str,
    started_at: str,
    duration_seconds: float,
) -> Rendered:
    s = report.settings
    table = Table(
        [
            "server",
            "clients",
            "delivered events/s",
            "vs python-socketio",
            "p99 latency",
            "RSS / idle connection",
            f"missed in a {s.gap_seconds:g} s disconnect",
        ]
    )
    sio = report.sides.get("python-socketio")
    for name, side in report.sides.items():
        p99 = side.p99()
        ratio = side.figure.rate / sio.figure.rate if sio and sio.figure.rate > 0 else None
        missed = (
            "—"
            if side.missed_after_gap is None
            else f"{side.missed_after_gap} of {side.sent_during_gap_test}"
        )
        table.add(
            name,
            f"{side.figure.clients:,}",
            f"{side.figure.rate:,.0f}",
            "—" if ratio is None else f"{ratio:.2f}×",
            "—" if p99 is None else f"{p99:.1f} ms",
            fanout._kib(side.bytes_per_connection),
            missed,
        )
    ratio = report.ratio
    gateway = report.sides.get("gateway")
    notes = [
        f"All clients in one room (one job), the same {report.frame_bytes}-byte event JSON; "
        f"{s.seconds:g} s window after {s.warmup:g} s warm-up, at most {s.backlog_events} events "
        "per client in flight (bench.fanout's flow control) for every server.",
        "python-socketio: AsyncServer on aiohttp, emit(…, room=…); its load client speaks "
        "Engine.IO 4 over the same lean WebSocket client as the gateway's (python-socketio's "
        "AsyncClient, one task per message, would be the bottleneck); its server used a whole "
        "core. Gateway and raw websockets: bench.fanout's machinery and load client. Raw "
        "websockets is shown for context (no latency stamp).",
        "Latency: gateway from each event's occurredAt (before its append commits) to receipt; "
        "python-socketio from its emit to receipt. Both at full speed, so mostly queueing.",
        "Socket.IO's default mode does not resend what was emitted while a client was "
        "disconnected: a client gone for "
        f"{s.gap_seconds:g} s at {s.gap_rate:g} events/s lost "
        f"{sio.missed_after_gap if sio else '—'} events; the gateway's SDK resubscribing after "
        f"its last seq lost {gateway.missed_after_gap if gateway else '—'}.",
        f"Goal: gateway at least {GOAL_RATIO:g}× python-socketio's delivered rate: "
        + (
            "—"
            if ratio is None
            else f"{ratio:.2f}× ({'met' if ratio >= GOAL_RATIO else 'NOT met'})"
        ),
    ]
    if s.reduced:
        notes.append(f"Quick run: {s.clients:,} clients instead of 1,000.")
    header = (
        f"PostgreSQL {server.get('server_version')} ({source}); {machine.get('cpu_count')} CPUs; "
        f"python-socketio {machine.get('python-socketio')}, websockets "
        f"{machine.get('websockets')}"
    )
    text = "\n".join(
        ["", f"gateway vs python-socketio — {header}", "", table.text(), "", *notes, ""]
    )
    markdown = "\n".join(
        [
            "# Gateway vs python-socketio",
            "",
            header + f"; started {started_at}, took {duration_seconds:.0f} s.",
            "",
            table.markdown(),
            "",
            *(f"- {note}" for note in notes),
            "",
        ]
    )
    payload = {
        "benchmark": NAME,
        "started_at": started_at,
        "duration_seconds": round(duration_seconds, 1),
        "source": source,
        "server": dict(server),
        "machine": dict(machine),
        "settings": dataclasses.asdict(s),
        "frame_bytes": report.frame_bytes,
        "sides": {name: side.to_json() for name, side in report.sides.items()},
        "gateway_vs_socketio": _r(ratio, 2),
        "goal_ratio": GOAL_RATIO,
    }
    return Rendered(text=text, markdown=markdown, payload=payload)


async def main(ctx: Context) -> None:
    settings = Settings.for_run(seconds=ctx.seconds, warmup=ctx.warmup, quick=ctx.quick)
    await run_benchmark(
        ctx,
        NAME,
        lambda dsn: measure_all(dsn, settings, progress=ctx.progress),
        render,
        {
            "websockets": _version("websockets"),
            "python-socketio": _version("python-socketio"),
            "aiohttp": _version("aiohttp"),
        },
    )
