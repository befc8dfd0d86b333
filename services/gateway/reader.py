"""Replay reads, coalesced across every client of the process.

A reconnect storm brings thousands of clients at once, many of them following the same job and
asking for the same events. Each asks this reader; whatever is asked while a round of queries is
running waits for the next round, and a round sends at most one query of each kind, whatever
the number of clients and jobs in it:

    job states      one `= ANY` lookup in the projection
    job pages       one query for every job: requests of one job whose seq ranges touch are
                    merged into one range, so fifty clients at the same seq cost one range
    project/log     one snapshot query and one page query for every stream in the round

Each event read is encoded once, and a page many clients asked for identically is framed once.

Events of jobs already read are kept (`EventCache`, a bounded number of the latest read): a
committed event never changes, so a page is the cached run of events right after the client's
seq plus a read of what comes after that run. The read still goes to the database (only it knows
whether more has been committed), but it is of the events past the cached run, which in a storm
of clients of the same jobs is nothing: the rows are neither fetched nor decoded again per round.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import structlog

from schemas.events import Event, encode_event
from schemas.state import JobState
from schemas.wire import Replay, replay_frame
from services.common.db import DATABASE_ERRORS
from services.common.eventlog import event_from_row
from services.common.queries import QUERIES

_state_decoder = msgspec.json.Decoder(JobState)
log = structlog.get_logger(__name__)

QUERY_TIMEOUT = 30.0
"""Seconds a replay query (or the wait for a connection) may take before its askers fail."""
RANGES_PER_QUERY = 500
"""Seq ranges read by one query; with pages of a few hundred events, a bounded result."""


class ReaderError(Exception):
    """The log could not be read; the client should reconnect and resume."""


@dataclass(slots=True)
class Page:
    """Events read for one request, with their encoded bytes, in stream order."""

    head: Replay
    events: list[Event]
    encoded: list[bytes]
    _frame: bytes | None = None

    def frame(self, start: int = 0, stop: int | None = None) -> bytes:
        """The `export:replay` frame of events[start:stop]; the whole page's is built once."""
        if start == 0 and (stop is None or stop >= len(self.events)):
            if self._frame is None:
                self._frame = replay_frame(self.head, self.encoded)
            return self._frame
        return replay_frame(self.head, self.encoded[start:stop])


@dataclass(frozen=True, slots=True)
class StreamSnapshot:
    """A project's (or the log's) state: the head position and, for a project, the JSON array of
    its newest jobs' states as of that position."""

    head: int
    jobs_json: bytes | None


@dataclass(slots=True)
class _Round:
    states: dict[UUID, asyncio.Future[JobState | None]] = field(default_factory=dict)
    job_pages: dict[tuple[UUID, int, int], asyncio.Future[Page]] = field(default_factory=dict)
    snapshots: dict[str | None, asyncio.Future[StreamSnapshot]] = field(default_factory=dict)
    stream_pages: dict[tuple[str | None, int, int], asyncio.Future[Page]] = field(
        default_factory=dict
    )

    def __bool__(self) -> bool:
        return bool(self.states or self.job_pages or self.snapshots or self.stream_pages)

    def futures(self) -> list[asyncio.Future[Any]]:
        return [
            *self.states.values(),
            *self.job_pages.values(),
            *self.snapshots.values(),
            *self.stream_pages.values(),
        ]


class EventCache:
    """Events as read from the log, with their encoded bytes, by (job, seq); at most `capacity`
    of them, the oldest read dropped first. Only what was read from the log goes in: every
    event here was committed, and a committed event never changes."""

    __slots__ = ("_events", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._events: OrderedDict[tuple[UUID, int], tuple[Event, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: Event, encoded: bytes) -> None:
        if self.capacity <= 0:
            return
        events = self._events
        events[event.job_id, event.seq] = (event, encoded)
        if len(events) > self.capacity:
            events.popitem(last=False)

    def run(self, job_id: UUID, after: int, upto: int) -> list[tuple[Event, bytes]]:
        """The cached events of `job_id` from seq `after + 1` on, up to `upto`, as long as they
        follow each other: seqs have no gaps, so these are exactly the log's events there."""
        events = self._events
        found: list[tuple[Event, bytes]] = []
        seq = after + 1
        while seq <= upto:
            hit = events.get((job_id, seq))
            if hit is None:
                break
            found.append(hit)
            seq += 1
        return found


def merge_ranges(requests: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Seq ranges (after, upto] covering `requests` of (after_seq, limit): touching or
    overlapping ranges become one, so one read serves every client at or near the same seq."""
    ranges: list[tuple[int, int]] = []
    for after, limit in sorted(requests):
        upto = after + limit
        if ranges and after <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], upto))
        else:
            ranges.append((after, upto))
    return ranges


class Reader:
    """Answers the replay reads of all clients, a round of coalesced queries at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        snapshot_jobs: int = 200,
        cache_events: int = 20_000,
        on_query: Callable[[str], None] | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._snapshot_jobs = snapshot_jobs
        self.cache = EventCache(cache_events)
        self._on_query = on_query
        self._on_request = on_request
        self._round = _Round()
        self._wake = asyncio.Event()
        self.queries = 0
        self.requests = 0

    # -- asking ------------------------------------------------------------------------------

    def job_state(self, job_id: UUID) -> Awaitable[JobState | None]:
        """The job's state from the projection, or None when it has no events."""
        return self._ask(self._round.states, job_id)

    def job_page(self, job_id: UUID, after_seq: int, limit: int) -> Awaitable[Page]:
        """At most `limit` events of the job with a seq above `after_seq`, in seq order."""
        return self._ask(self._round.job_pages, (job_id, after_seq, limit))

    def stream_snapshot(self, project_id: str | None) -> Awaitable[StreamSnapshot]:
        """A project's snapshot (None: the whole log's, which is its head position only)."""
        return self._ask(self._round.snapshots, project_id)

    def stream_page(
        self, project_id: str | None, after_position: int, limit: int
    ) -> Awaitable[Page]:
        """At most `limit` events of a project (None: of the log) above a position."""
        return self._ask(self._round.stream_pages, (project_id, after_position, limit))

    def _ask(self, requests: dict[Any, asyncio.Future[Any]], key: Any) -> Awaitable[Any]:
        self.requests += 1
        if self._on_request is not None:
            self._on_request()
        future = requests.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
            requests[key] = future
            self._wake.set()
        # Shielded: one client giving up must not cancel the read others wait on.
        return asyncio.shield(future)

    # -- answering ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Answer rounds until cancelled; what is asked during a round waits for the next."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                current, self._round = self._round, _Round()
                if current:
                    await self._answer(current)
        finally:
            for future in self._round.futures():
                if not future.done():
                    future.set_exception(ReaderError("the gateway is shutting down"))

    async def _answer(self, current: _Round) -> None:
        parts: list[Awaitable[None]] = []
        if current.states:
            parts.append(self._read_states(current.states))
        if current.job_pages:
            parts.append(self._read_job_pages(current.job_pages))
        if current.snapshots:
            parts.append(self._read_snapshots(current.snapshots))
        project_pages = {k: f for k, f in current.stream_pages.items() if k[0] is not None}
        log_pages = {k: f for k, f in current.stream_pages.items() if k[0] is None}
        if project_pages:
            parts.append(self._read_project_pages(project_pages))
        if log_pages:
            parts.append(self._read_log_pages(log_pages))
        try:
            await asyncio.gather(*parts)
        except asyncio.CancelledError:
            for future in current.futures():
                if not future.done():
                    future.set_exception(ReaderError("the gateway is shutting down"))
            raise
        except Exception as exc:
            # Whatever went wrong (the database, a row this version cannot read), it fails
            # this round's askers, who reconnect and resume; the reader goes on.
            if not isinstance(exc, DATABASE_ERRORS):  # a restart's driver errors included
                log.exception("a replay read failed")
            failure = ReaderError(f"reading the log failed: {type(exc).__name__}")
            for future in current.futures():
                if not future.done():
                    future.set_exception(failure)

    async def _fetch(self, name: str, *args: object) -> list[asyncpg.Record]:
        self.queries += 1
        if self._on_query is not None:
            self._on_query(name)
        async with self._pool.acquire(timeout=QUERY_TIMEOUT) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                QUERIES[name], *args, timeout=QUERY_TIMEOUT
            )
        return rows

    async def _read_states(self, wanted: dict[UUID, asyncio.Future[JobState | None]]) -> None:
        rows = await self._fetch("job_states", list(wanted))
        found = {row["job_id"]: _state_decoder.decode(row["state"]) for row in rows}
        for job_id, future in wanted.items():
            _resolve(future, found.get(job_id))

    async def _read_job_pages(
        self, wanted: dict[tuple[UUID, int, int], asyncio.Future[Page]]
    ) -> None:
        by_job: dict[UUID, list[tuple[int, int]]] = defaultdict(list)
        for job_id, after, limit in wanted:
            by_job[job_id].append((after, limit))
        cache = self.cache
        found: dict[UUID, list[tuple[Event, bytes]]] = defaultdict(list)
        job_ids: list[UUID] = []
        afters: list[int] = []
        uptos: list[int] = []
        for job_id, requests in by_job.items():
            for after, upto in merge_ranges(requests):
                cached = cache.run(job_id, after, upto)
                if cached:
                    found[job_id] += cached
                    after += len(cached)
                if after < upto:
                    job_ids.append(job_id)
                    afters.append(after)
                    uptos.append(upto)
        rows: list[asyncpg.Record] = []
        # Bounded queries: a storm at thousands of cursors is read a slice of ranges at a time.
        for start in range(0, len(job_ids), RANGES_PER_QUERY):
            stop = start + RANGES_PER_QUERY
            rows += await self._fetch(
                "job_ranges", job_ids[start:stop], afters[start:stop], uptos[start:stop]
            )
        for row in rows:
            event = event_from_row(row)
            hit = (event, encode_event(event))
            found[event.job_id].append(hit)
            cache.add(*hit)
        read: dict[UUID, list[Event]] = {}
        encoded: dict[UUID, list[bytes]] = {}
        for job_id, hits in found.items():
            # Cached runs and rows read come in range order, not in seq order: sort them.
            hits.sort(key=_hit_seq)
            read[job_id] = [hit[0] for hit in hits]
            encoded[job_id] = [hit[1] for hit in hits]
        for (job_id, after, limit), future in wanted.items():
            events = read.get(job_id, [])
            # The job's ranges are disjoint and in seq order: find this request's slice.
            start = bisect.bisect_right(events, after, key=_seq)
            stop = bisect.bisect_right(events, after + limit, key=_seq)
            page = Page(
                Replay(job_id=job_id, events=[]),
                events[start:stop],
                encoded[job_id][start:stop] if job_id in encoded else [],
            )
            _resolve(future, page)

    async def _read_snapshots(
        self, wanted: dict[str | None, asyncio.Future[StreamSnapshot]]
    ) -> None:
        projects = [p for p in wanted if p is not None]
        if projects:
            rows = await self._fetch("project_snapshots", projects, self._snapshot_jobs)
            for row in rows:
                _resolve(
                    wanted[row["project_id"]],
                    StreamSnapshot(int(row["head"]), row["jobs"].encode()),
                )
            head = int(rows[0]["head"]) if rows else 0
        else:
            rows = await self._fetch("head_position")
            head = int(rows[0][0])
        if None in wanted:
            _resolve(wanted[None], StreamSnapshot(head, None))

    async def _read_project_pages(
        self, wanted: dict[tuple[str | None, int, int], asyncio.Future[Page]]
    ) -> None:
        keys = list(wanted)
        rows = await self._fetch(
            "project_pages", [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
        )
        self._resolve_pages(keys, rows, wanted)

    async def _read_log_pages(
        self, wanted: dict[tuple[str | None, int, int], asyncio.Future[Page]]
    ) -> None:
        keys = list(wanted)
        rows = await self._fetch("log_pages", [k[1] for k in keys], [k[2] for k in keys])
        self._resolve_pages(keys, rows, wanted)

    @staticmethod
    def _resolve_pages(
        keys: list[tuple[str | None, int, int]],
        rows: list[asyncpg.Record],
        wanted: dict[tuple[str | None, int, int], asyncio.Future[Page]],
    ) -> None:
        pages: dict[int, Page] = {}
        cache: dict[int, tuple[Event, bytes]] = {}  # by position: pages of streams overlap
        for n, key in enumerate(keys, start=1):
            head = (
                Replay(project_id=key[0], events=[])
                if key[0] is not None
                else Replay(log=True, events=[])
            )
            pages[n] = Page(head, [], [])
        for row in rows:
            position = row["position"]
            hit = cache.get(position)
            if hit is None:
                event = event_from_row(row)
                hit = cache[position] = (event, encode_event(event))
            page = pages[row["n"]]
            page.events.append(hit[0])
            page.encoded.append(hit[1])
        for n, key in enumerate(keys, start=1):
            _resolve(wanted[key], pages[n])


def _seq(event: Event) -> int:
    return event.seq


def _hit_seq(hit: tuple[Event, bytes]) -> int:
    return hit[0].seq


def _resolve(future: asyncio.Future[Any], value: object) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(value)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Every asker may have gone (shielded waits): do not log a failure nobody awaited.
    if not future.cancelled():
        future.exception()
