"""The event log: append, read, tail and verify, over PostgreSQL.

The database enforces the rules (see `schemas/migrations/0001_event_log.sql`); this module turns
them into typed results and errors, keeps the jobs projection equal to `fold(events)` by folding
each append before it is written, and writes every append with one round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.chain import GENESIS_HASH, BrokenLink, chain_hash, epoch_micros, verify_chain
from schemas.events import Event, EventData, encode_data, type_of
from schemas.state import JobState, fold, replay

from .ids import uuid7
from .queries import QUERIES
from .verify import RangeVerifyReport, chain_link, verify_range

log = structlog.get_logger(__name__)

_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(JobState)


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventLogError(Exception):
    """Base of every error the event log raises."""


class ConflictError(EventLogError):
    """The job's stream is not at the expected seq: someone else appended first."""

    def __init__(self, job_id: UUID, expected_seq: int, actual_seq: int) -> None:
        super().__init__(
            f"job {job_id}: expected to append after seq {expected_seq}, "
            f"but the stream is at seq {actual_seq}"
        )
        self.job_id = job_id
        self.expected_seq = expected_seq
        self.actual_seq = actual_seq


class JobClosedError(EventLogError):
    """The append would break the job's lifecycle: it has ended, or is not ready for it."""

    def __init__(self, job_id: UUID, detail: str, *, current_seq: int | None = None) -> None:
        super().__init__(f"job {job_id}: {detail}")
        self.job_id = job_id
        self.current_seq = current_seq


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event to append: its payload, who caused it, and an id that makes retries safe."""

    data: EventData
    actor: str
    event_id: UUID = msgspec.field(default_factory=uuid7)
    occurred_at: datetime = msgspec.field(default_factory=utcnow)


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True):
    job_id: UUID
    expected_seq: int
    events: Sequence[NewEvent]
    project_id: str | None = None
    owner_id: str | None = None


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    """Where an append's events are stored. `duplicate` means they were stored by an earlier try."""

    job_id: UUID
    first_seq: int
    last_seq: int
    first_position: int
    last_position: int
    duplicate: bool = False
    state: JobState | None = None
    """The job's state after the append (None for a duplicate: it may have moved on since)."""


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    job_id: UUID
    events_checked: int
    last_seq: int
    ok: bool
    broken: BrokenLink | None = None


def event_from_row(row: asyncpg.Record) -> Event:
    """An event as read from the log; its payload stays raw JSON until someone needs it typed."""
    return Event(
        job_id=row["job_id"],
        project_id=row["project_id"],
        seq=row["seq"],
        position=row["position"],
        event_id=row["event_id"],
        type=row["type"],
        occurred_at=row["occurred_at"],
        actor=row["actor"],
        data=msgspec.Raw(row["data"]),
    )


class _Head(msgspec.Struct, frozen=True):
    """Where a job's stream ends, as a writer needs it to append: the folded state there, the
    job's owner and the hash of its last event (what the next event links to)."""

    state: JobState
    owner_id: str
    hash: bytes


class _Prepared(msgspec.Struct):
    request: AppendRequest
    project_id: str
    owner_id: str
    head: _Head | None
    """The job after the append (None when the writer does not know the job at the expected
    seq: the database then answers conflict or duplicate)."""
    data: list[str]
    """Each event's payload as JSON text, as stored and hashed."""
    prevs: list[bytes | None]
    hashes: list[bytes | None]


class AppendMetrics:
    """Prometheus figures of the appends an EventLog makes, in a registry of the caller's."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "eventlog") -> None:
        self.events = Counter(
            f"{prefix}_events_appended", "Events appended, by type", ["type"], registry=registry
        )
        self.refused = Counter(
            f"{prefix}_appends_refused",
            "Appends refused: another append came first (conflict) or the job's lifecycle "
            "refused them (closed)",
            ["reason"],
            registry=registry,
        )
        self.latency = Histogram(
            f"{prefix}_append_seconds",
            "Time from an append's call to its commit, group commit included",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=registry,
        )
        self.batch = Histogram(
            f"{prefix}_group_commit_appends",
            "Appends carried by one group-commit transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=registry,
        )
        self.waiting = Gauge(
            f"{prefix}_group_commit_waiting",
            "Appends waiting for a group-commit transaction to leave",
            registry=registry,
        )
        self._by_type: dict[str, Any] = {}

    def count(
        self, requests: Sequence[AppendRequest], results: Sequence[AppendResult | EventLogError]
    ) -> None:
        """Count what one `append_many` wrote and refused (every append goes through one)."""
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, EventLogError):
                reason = "conflict" if isinstance(result, ConflictError) else "closed"
                self.refused.labels(reason).inc()
            elif not result.duplicate:
                for new in request.events:
                    kind = type_of(new.data)
                    child = self._by_type.get(kind)
                    if child is None:
                        child = self._by_type[kind] = self.events.labels(kind)
                    child.inc()


class GroupCommit(msgspec.Struct, frozen=True, kw_only=True):
    """How an EventLog gathers appends into shared transactions (see `EventLog.append`)."""

    max_batch: int = 500
    """Appends per transaction at most: bounds a transaction's time under the append lock."""
    in_flight: int = 4
    """Transactions under way at once: while one holds the commit-order lock, the others are
    prepared (folded and chained here, checked and locked by the database). On 2 cores, in a
    closed loop of 1,000 jobs, 4 wrote 19,500 and 21,300 appends/s where 2 wrote 13,300 and
    17,300 (bench/appends.py, interleaved runs); at 10,000 offered they were the same."""
    min_alongside: int = 32
    """Appends that must be waiting for a transaction to start while another is under way; with
    none under way the next one starts at once, whatever it carries. Under light load the
    appends that arrive during a transaction then leave together when it ends, instead of each
    starting a small transaction that only queues at the commit-order lock and pays a commit of
    its own. Measured on 2 cores in interleaved runs (bench/appends.py's loads): while the
    machine ran fast, 2,500 appends/s from 1,000 jobs went from p99 14.5 ms to 4.1 ms and ten
    jobs in a closed loop appended 40 % more; while it ran slow, larger batches formed either
    way and the difference was within the noise. Under heavy load this many wait at once and up
    to `in_flight` transactions run as before."""
    max_wait: float = 0.01
    """Seconds the oldest waiting append waits for a transaction under way before it starts one
    of its own all the same: a transaction held up (by a job row another process has locked,
    say) delays the appends behind it by this much at most, not until `min_alongside` arrive."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.in_flight < 1 or self.min_alongside < 1:
            raise ValueError(
                "group commit needs max_batch >= 1, in_flight >= 1 and min_alongside >= 1"
            )
        if not self.max_wait > 0:
            raise ValueError("group commit needs max_wait > 0")


_Waiting = tuple[AppendRequest, "asyncio.Future[AppendResult | EventLogError]"]


def _check(request: AppendRequest) -> None:
    if not request.events:
        raise ValueError("an append needs at least one event")
    if request.expected_seq < 0:
        raise ValueError("expected_seq cannot be negative")
    if request.expected_seq == 0 and (not request.project_id or not request.owner_id):
        raise ValueError("a new job's first append needs project_id and owner_id")


def _rounds(prepared: Sequence[_Prepared]) -> list[list[int]]:
    """Slots of `prepared` grouped so that no job appears twice in a group, in order: the n-th
    append to a job goes into the n-th group."""
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for slot, item in enumerate(prepared):
        job = item.request.job_id.int
        index = seen.get(job, 0)
        seen[job] = index + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(slot)
    return rounds


# Packed arguments (migration 0013): some of append_events' arrays each sent as one text, its
# elements joined by the unit separator.
_SEP = "\x1f"


def _bytea(value: bytes | None) -> str:
    return "" if value is None else "\\x" + value.hex()


# What append_events_packed takes packed, by position in append_events' arguments: the texts
# (projects, owners, statuses, states, types, data, actors), the event times and the hashes.
# The ids and the numbers stay binary arrays: the server parses them from text for as much CPU
# as the driver spends encoding them.
_PACKED_TEXTS = (3, 4, 5, 6, 9, 10, 11)
_PACKED_TIMES = 12
_PACKED_HASHES = (14, 15)


def _packed(arguments: Sequence[Any]) -> list[Any] | None:
    """`EventLog._arguments` as the append_events_packed query takes them; None when a text
    holds the separator (a project, an owner or an actor may): that call goes as arrays."""
    packed = list(arguments)
    for index in _PACKED_TEXTS:
        items: list[str] = arguments[index]
        text = _SEP.join(items)
        if text.count(_SEP) != len(items) - 1:
            return None
        packed[index] = text
    packed[_PACKED_TIMES] = _SEP.join(map(str, map(epoch_micros, arguments[_PACKED_TIMES])))
    for index in _PACKED_HASHES:
        packed[index] = _SEP.join(map(_bytea, arguments[index]))
    return packed


class EventLog:
    """Appends to and reads from the log through a connection pool.

    Keeps a bounded cache of the latest folded state of the jobs it wrote, so that the common
    case, a worker appending to its own job, costs one round trip: the state at a seq never
    changes, and the database checks the seq under the job's row lock.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        notify: bool = True,
        on_commit: Callable[[], None] | None = None,
        state_cache_size: int = 10_000,
        group_commit: GroupCommit | None = None,
        metrics: AppendMetrics | None = None,
    ) -> None:
        """`notify`: NOTIFY inside each append transaction. `on_commit`: called after an append
        of ours commits (a `Notifier.poke`, the cheaper way to wake readers under load); with
        `conn=` the caller owns the commit and calls it. `group_commit`: how appends made
        without `conn=` are gathered into shared transactions (None: one transaction each)."""
        self._pool = pool
        self._notify = notify
        self._on_commit = on_commit
        self._cache_size = state_cache_size
        self._states: OrderedDict[int, _Head] = OrderedDict()
        """By `UUID.int`: the standard library's UUID hashes in Python, an int in C, and these
        dictionaries are read several times per append."""
        self._group = group_commit
        self._waiting: list[_Waiting] = []
        self._waiting_since = 0.0
        """Event loop time the oldest waiting append arrived (when any wait)."""
        self._overdue: asyncio.TimerHandle | None = None
        self._in_flight = 0
        self._flushes: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Group-commit transactions made so far (with `appends_batched`, the mean batch size)."""
        self.appends_batched = 0
        self._metrics = metrics
        if metrics is not None:
            metrics.waiting.set_function(lambda: len(self._waiting))

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    def committed(self) -> None:
        """Tell readers that an append made with `conn=` has committed."""
        if self._on_commit is not None:
            self._on_commit()

    # -- writing ---------------------------------------------------------------------------

    async def append(
        self,
        job_id: UUID,
        expected_seq: int,
        events: Sequence[NewEvent],
        *,
        project_id: str | None = None,
        owner_id: str | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> AppendResult:
        """Append events to a job whose stream is at `expected_seq` (0 for a new job).

        Raises ConflictError if the stream has moved on, JobClosedError if the job's lifecycle
        refuses the events. Appending events whose ids are all stored already is a no-op that
        returns where they are. With `conn`, the append joins that connection's transaction
        (to commit it together with other writes, such as a job claim).
        """
        request = AppendRequest(
            job_id=job_id,
            expected_seq=expected_seq,
            events=events,
            project_id=project_id,
            owner_id=owner_id,
        )
        started = time.perf_counter()
        if conn is None and self._group is not None:
            _check(request)
            result = await self._join_group(request)
        else:
            (result,) = await self.append_many([request], conn=conn)
        if isinstance(result, EventLogError):
            raise result
        if self._metrics is not None and not result.duplicate:
            self._metrics.latency.observe(time.perf_counter() - started)
        return result

    # -- group commit ----------------------------------------------------------------------
    #
    # Appends made without `conn=` queue up. With no transaction under way, everything queued
    # (up to `max_batch`) leaves at once in one `append_many`; with some under way, a further one
    # starts (up to `in_flight`) only once `min_alongside` appends wait, or once the oldest has
    # waited `max_wait`; otherwise they leave together when one ends. A lone append therefore
    # leaves at once, with no timer to wait for, and under load each transaction carries
    # whatever arrived while the previous ones were committing: one round trip, one commit, one
    # turn at the append lock and one wake-up of readers for all of them.

    async def _join_group(self, request: AppendRequest) -> AppendResult | EventLogError:
        future: asyncio.Future[AppendResult | EventLogError]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._waiting:
            self._waiting_since = loop.time()
        self._waiting.append((request, future))
        self._start_flushes(loop)
        # Cancelling the caller does not take the append back: it may commit all the same,
        # exactly as a cancelled single append may (retrying with the same event ids is safe).
        return await future

    def _start_flushes(self, loop: asyncio.AbstractEventLoop, *, overdue: bool = False) -> None:
        """`loop` is the running loop, passed in: asking for it costs a system call (getpid) on
        CPython 3.11, and this runs for every append."""
        group = self._group
        assert group is not None
        while self._waiting and self._in_flight < group.in_flight:
            if self._in_flight and not overdue and len(self._waiting) < group.min_alongside:
                # They leave together when a transaction under way ends, or at `max_wait`.
                if self._overdue is None:
                    self._overdue = loop.call_at(
                        self._waiting_since + group.max_wait, self._on_overdue
                    )
                return
            overdue = False
            batch = self._waiting[: group.max_batch]
            del self._waiting[: group.max_batch]
            # What is left (more than `max_batch` waited) arrived by now; its wait counts from here.
            self._waiting_since = loop.time()
            self._in_flight += 1
            task = loop.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _on_overdue(self) -> None:
        assert self._group is not None
        self._overdue = None
        if self._waiting:
            loop = asyncio.get_running_loop()
            due = self._waiting_since + self._group.max_wait
            self._start_flushes(loop, overdue=loop.time() >= due)

    async def _flush(self, batch: list[_Waiting]) -> None:
        requests = [request for request, _ in batch]
        results: Sequence[AppendResult | EventLogError | asyncpg.PostgresError]
        try:
            try:
                results = await self.append_many(requests)
            except asyncpg.PostgresError:
                if len(requests) == 1:
                    raise
                # One append broke a rule that only the statement could see (an event id used
                # before by another job, say) and the whole transaction rolled back: write the
                # appends one at a time, so that it fails alone and the others commit.
                results = [await self._alone(request) for request in requests]
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
        else:
            self.batches += 1
            self.appends_batched += len(batch)
            if self._metrics is not None:
                self._metrics.batch.observe(len(batch))
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, asyncpg.PostgresError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._start_flushes(asyncio.get_running_loop())

    async def _alone(
        self, request: AppendRequest
    ) -> AppendResult | EventLogError | asyncpg.PostgresError:
        try:
            (result,) = await self.append_many([request])
        except asyncpg.PostgresError as exc:
            failed: asyncpg.PostgresError = exc
            return failed
        return result

    async def aclose(self) -> None:
        """Wait for the group-commit transactions under way (new appends still start them)."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def append_many(
        self, requests: Sequence[AppendRequest], *, conn: asyncpg.Connection | None = None
    ) -> list[AppendResult | EventLogError]:
        """Append to many jobs in one transaction; each append succeeds or fails on its own.

        Results come back in the order of `requests`. Several appends to one job are allowed
        when each expects the seq the previous one leaves.
        """
        for request in requests:
            _check(request)
        # Sorted by job id (stable, so one job's appends keep their order): concurrent batches
        # then lock job rows in the same order and cannot deadlock.
        order = sorted(range(len(requests)), key=lambda i: requests[i].job_id.int)
        ordered = [requests[i] for i in order]
        if conn is None:
            async with self._pool.acquire() as own:
                rows, prepared = await self._append(own, ordered)
            remember = True
        else:
            rows, prepared = await self._append(conn, ordered)
            # The caller's transaction may still roll back: a state it has not committed must
            # not be taken for the state at that seq.
            remember = False
        results: list[AppendResult | EventLogError] = [None] * len(requests)  # type: ignore[list-item]
        committed = False
        for slot, item, row in zip(order, prepared, rows, strict=True):
            results[slot] = self._result(item, row, remember=remember)
            committed = committed or row["result"] == "ok"
        if committed and remember and self._on_commit is not None:
            self._on_commit()
        if self._metrics is not None:
            self._metrics.count(requests, results)
        return results

    async def _append(
        self, conn: asyncpg.Connection, requests: Sequence[AppendRequest]
    ) -> tuple[list[asyncpg.Record], list[_Prepared]]:
        prepared = await self._prepare(conn, requests)
        rounds = _rounds(prepared)
        if len(rounds) <= 1:
            # The common case, whatever the batch size: one statement, one round trip.
            return await self._call(conn, prepared), prepared
        # A job appended to more than once: one call per round, in one transaction; a round's
        # append expects the seq the previous round leaves, so it fails if that one failed.
        by_slot: dict[int, asyncpg.Record] = {}
        async with conn.transaction():
            for slots in rounds:
                part = [prepared[slot] for slot in slots]
                rows = await self._call(conn, part)
                for slot, row in zip(slots, rows, strict=True):
                    by_slot[slot] = row
        return [by_slot[slot] for slot in range(len(prepared))], prepared

    async def _prepare(
        self, conn: asyncpg.Connection, requests: Sequence[AppendRequest]
    ) -> list[_Prepared]:
        """Fold and chain each append from the job's head at its expected seq (the cache, an
        earlier append of the same batch, or the database); the database checks both."""
        prepared: list[_Prepared] = []
        in_batch: dict[int, _Head] = {}
        for request in requests:
            data = [encode_data(new.data).decode() for new in request.events]
            head: _Head | None
            state: JobState | None
            if request.expected_seq == 0:
                assert request.project_id is not None
                assert request.owner_id is not None
                project_id, owner_id = request.project_id, request.owner_id
                state, link = None, GENESIS_HASH
                known = True
            else:
                head = in_batch.get(request.job_id.int) or self._cached(request.job_id)
                if head is None or head.state.seq != request.expected_seq:
                    row = await conn.fetchrow(QUERIES["append_head"], request.job_id)
                    if row is not None and row["last_seq"] == request.expected_seq:
                        head = _Head(
                            _state_decoder.decode(row["state"]), row["owner_id"], row["hash"]
                        )
                    else:
                        # The job is not at that seq (or does not exist): the database answers
                        # conflict, or duplicate for a retry whose events are stored.
                        head = None
                known = head is not None
                state = head.state if head is not None else None
                project_id = state.project_id if state is not None else ""
                owner_id = head.owner_id if head is not None else ""
                link = head.hash if head is not None else GENESIS_HASH
            prevs: list[bytes | None] = []
            hashes: list[bytes | None] = []
            after: _Head | None = None
            if known:
                for offset, (new, text) in enumerate(zip(request.events, data, strict=True), 1):
                    seq = request.expected_seq + offset
                    kind = type_of(new.data)
                    state = fold(
                        state,
                        Event(
                            job_id=request.job_id,
                            project_id=project_id,
                            seq=seq,
                            position=0,
                            event_id=new.event_id,
                            type=kind,
                            occurred_at=new.occurred_at,
                            actor=new.actor,
                            data=new.data,
                        ),
                    )
                    prevs.append(link)
                    link = chain_hash(
                        link,
                        request.job_id,
                        seq,
                        new.event_id,
                        kind,
                        new.actor,
                        project_id,
                        owner_id,
                        new.occurred_at,
                        text,
                    )
                    hashes.append(link)
                assert state is not None
                after = in_batch[request.job_id.int] = _Head(state, owner_id, link)
            else:
                prevs = hashes = [None] * len(request.events)
            prepared.append(
                _Prepared(
                    request=request,
                    project_id=project_id,
                    owner_id=owner_id,
                    head=after,
                    data=data,
                    prevs=prevs,
                    hashes=hashes,
                )
            )
        return prepared

    async def _call(
        self, conn: asyncpg.Connection, prepared: Sequence[_Prepared]
    ) -> list[asyncpg.Record]:
        """One append_events call, packed when it can be (migration 0013), else as arrays."""
        arguments = self._arguments(prepared)
        packed = _packed(arguments)
        rows: list[asyncpg.Record]
        if packed is not None:
            rows = await conn.fetch(QUERIES["append_events_packed"], *packed)
        else:
            rows = await conn.fetch(QUERIES["append_events"], *arguments)
        return rows

    def _arguments(self, prepared: Sequence[_Prepared]) -> list[Any]:
        job_ids: list[UUID] = []
        expected: list[int] = []
        counts: list[int] = []
        projects: list[str] = []
        owners: list[str] = []
        statuses: list[str] = []
        states: list[str] = []
        appends: list[int] = []
        ids: list[UUID] = []
        types: list[str] = []
        data: list[str] = []
        actors: list[str] = []
        occurred: list[datetime] = []
        seqs: list[int] = []
        prevs: list[bytes | None] = []
        hashes: list[bytes | None] = []
        for number, item in enumerate(prepared, start=1):
            request = item.request
            job_ids.append(request.job_id)
            expected.append(request.expected_seq)
            counts.append(len(request.events))
            projects.append(item.project_id)
            owners.append(item.owner_id)
            if item.head is None:
                statuses.append("")  # unknown: the database cannot accept it
                states.append("{}")
            else:
                statuses.append(item.head.state.status)
                states.append(_state_encoder.encode(item.head.state).decode())
            seq = request.expected_seq
            for new in request.events:
                seq += 1
                appends.append(number)
                ids.append(new.event_id)
                types.append(type_of(new.data))
                actors.append(new.actor)
                occurred.append(new.occurred_at)
                seqs.append(seq)
            data += item.data
            prevs += item.prevs
            hashes += item.hashes
        return [
            job_ids, expected, counts, projects, owners, statuses, states,
            appends, ids, types, data, actors, occurred, seqs, prevs, hashes, self._notify,
        ]  # fmt: skip

    def _result(
        self, item: _Prepared, row: asyncpg.Record, *, remember: bool
    ) -> AppendResult | EventLogError:
        request = item.request
        outcome: str = row["result"]
        current_seq: int = row["current_seq"] or 0
        count = len(request.events)
        if outcome == "ok":
            assert item.head is not None
            if remember:
                self._remember(item.head)
            else:
                self._states.pop(request.job_id.int, None)
            return AppendResult(
                job_id=request.job_id,
                first_seq=current_seq - count + 1,
                last_seq=current_seq,
                first_position=row["first_position"],
                last_position=row["last_position"],
                state=item.head.state,
            )
        if outcome == "duplicate":
            return AppendResult(
                job_id=request.job_id,
                first_seq=current_seq - count + 1,
                last_seq=current_seq,
                first_position=row["first_position"],
                last_position=row["last_position"],
                duplicate=True,
            )
        self._states.pop(request.job_id.int, None)
        if outcome == "conflict":
            return ConflictError(request.job_id, request.expected_seq, current_seq)
        return JobClosedError(
            request.job_id,
            "the job's lifecycle refuses "
            + ", ".join(type_of(e.data) for e in request.events)
            + f" after seq {current_seq}",
            current_seq=current_seq,
        )

    def _cached(self, job_id: UUID) -> _Head | None:
        key = job_id.int
        head = self._states.get(key)
        if head is not None:
            self._states.move_to_end(key)
        return head

    def _remember(self, head: _Head) -> None:
        state = head.state
        key = state.job_id.int
        if state.is_terminal and state.status != "completed":
            self._states.pop(key, None)
            return
        self._states[key] = head
        self._states.move_to_end(key)
        while len(self._states) > self._cache_size:
            self._states.popitem(last=False)

    # -- reading ---------------------------------------------------------------------------

    async def read_stream(
        self, job_id: UUID, after_seq: int = 0, limit: int | None = None
    ) -> list[Event]:
        """A job's events after `after_seq`, in seq order (all of them without a limit)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["read_stream"], job_id, after_seq, limit)
        return [event_from_row(row) for row in rows]

    async def tail(self, cursor: int, limit: int = 1000) -> list[Event]:
        """Up to `limit` events after global position `cursor`, in position order.

        Never skips: once this has returned position p, no event below p can appear later.
        """
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["tail"], cursor, limit)
        return [event_from_row(row) for row in rows]

    async def head_position(self) -> int:
        """The highest committed position."""
        async with self._pool.acquire() as conn:
            value: int = await conn.fetchval(QUERIES["head_position"])
        return value

    async def job_state(self, job_id: UUID) -> JobState | None:
        """The job's state from the projection (equal to the fold of its events)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["job_head"], job_id)
        if row is None:
            return None
        return _state_decoder.decode(row["state"])

    async def verify(self, job_id: UUID) -> VerifyReport:
        """Recompute a job's hash chain from its stored events; name the first broken link."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["chain_links"], job_id)
            head = await conn.fetchrow(QUERIES["job_head"], job_id)
        links = [chain_link(row) for row in rows]
        expected_last = head["last_seq"] if head is not None else None
        broken = verify_chain(links, expected_last_seq=expected_last)
        return VerifyReport(
            job_id=job_id,
            events_checked=len(links),
            last_seq=links[-1].seq if links else 0,
            ok=broken is None,
            broken=broken,
        )

    async def verify_range(
        self, from_position: int, to_position: int, *, page_size: int = 5000
    ) -> RangeVerifyReport:
        """Recompute the hash chain of every job with events in positions `from_position` to
        `to_position`, within the range; see `services.common.verify` for what that proves."""
        return await verify_range(self._pool, from_position, to_position, page_size=page_size)

    # -- the projection --------------------------------------------------------------------

    async def rebuild_projection(self, job_ids: Iterable[UUID] | None = None) -> int:
        """Recompute jobs rows from the log (all jobs, or the given ones); return how many."""
        async with self._pool.acquire() as conn:
            if job_ids is not None:
                return await self._rebuild(conn, list(job_ids))
            count = 0
            after = UUID(int=0)
            while True:
                page = [
                    row["job_id"] for row in await conn.fetch(QUERIES["job_ids_page"], after, 500)
                ]
                if not page:
                    return count
                count += await self._rebuild(conn, page)
                after = page[-1]

    async def _rebuild(self, conn: asyncpg.Connection, job_ids: list[UUID]) -> int:
        count = 0
        for job_id in job_ids:
            async with conn.transaction():
                # Appends hold this row lock too: the stream cannot move while it is folded.
                await conn.execute(QUERIES["lock_job"], job_id)
                rows = await conn.fetch(QUERIES["read_stream"], job_id, 0, None)
                if not rows:
                    continue
                state = replay(event_from_row(row) for row in rows)
                assert state is not None
                owner = await conn.fetchrow(QUERIES["job_owner"], job_id)
                await conn.execute(
                    QUERIES["upsert_projection"],
                    job_id,
                    state.project_id,
                    owner["owner_id"],
                    state.status,
                    state.seq,
                    _state_encoder.encode(state).decode(),
                    owner["recorded_at"],
                )
            self._states.pop(job_id.int, None)
            count += 1
        return count
