"""History queries over the log across jobs: filters, keyset pages by position, audit rows.

An `EventQuery` selects events by project, job, type and actor (each any of several values), by
when they occurred and by position. `fetch_page` reads one page after a position cursor; `pages`
reads the whole result a page at a time, each page a short query on a connection of its own, so
that a result of any size streams in bounded memory and a slow reader holds no connection.

Every page walks one index in position order from its cursor (see
`schemas/migrations/0004_audit.sql`): that of the job, the project, the actor or the type filter,
in this order of preference, or the primary key. The type index leaves progress events out
(`0010_sparse_type_index.sql`), so a type filter that takes them in walks the primary key. A
filter with several values walks the index once per value, each walk limited to the page, and
merges the walks. The other filters, and the time range, are checked on the rows walked.
Positions are handed out in commit order and events never change, so pages are stable: a cursor
once returned never skips an event, and a query capped at a position (`to_position`) reads the
same events however often it is repeated.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from schemas.events import Progress, Timestamp

_COLUMNS = (
    "position, job_id, project_id, owner_id, seq, event_id, type, occurred_at, recorded_at, "
    "actor, data, prev_hash, hash"
)
_encoder = msgspec.json.Encoder()

MAX_POSITION = 2**63 - 1
"""The highest position the log's bigint can hold."""

DENSE_TYPE = Progress.TYPE
"""The event type left out of the type index (migration 0010): most of the log."""


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Which events a history query selects. Empty tuples and None select everything."""

    projects: tuple[str, ...] = ()
    jobs: tuple[UUID, ...] = ()
    types: tuple[str, ...] = ()
    actors: tuple[str, ...] = ()
    occurred_from: datetime | None = None
    """Inclusive."""
    occurred_to: datetime | None = None
    """Exclusive."""
    from_position: int | None = None
    """Inclusive."""
    to_position: int | None = None
    """Inclusive."""
    within: frozenset[str] | None = None
    """Only events of these projects, whatever else is asked (a user's token); None: every
    project (an auditor)."""


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An event as stored: the envelope, its owner, when it was recorded, its hash chain link."""

    # With ownerId, prevHash and hash (hex) and `data` exactly as stored, a chain can be checked
    # offline with schemas.chain.event_hash.

    job_id: UUID
    project_id: str
    seq: int
    position: int
    event_id: UUID
    type: str
    occurred_at: Timestamp
    actor: str
    data: msgspec.Raw
    """The payload's JSON text exactly as stored (and hashed)."""
    owner_id: str
    recorded_at: Timestamp
    prev_hash: str
    hash: str


CSV_COLUMNS: tuple[str, ...] = (
    "position",
    "jobId",
    "projectId",
    "seq",
    "eventId",
    "type",
    "occurredAt",
    "actor",
    "ownerId",
    "recordedAt",
    "prevHash",
    "hash",
    "data",
)
"""The CSV columns, in order: the `AuditEvent` fields; `data` is the payload's JSON text."""


def audit_event(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        job_id=row["job_id"],
        project_id=row["project_id"],
        seq=row["seq"],
        position=row["position"],
        event_id=row["event_id"],
        type=row["type"],
        occurred_at=row["occurred_at"],
        actor=row["actor"],
        data=msgspec.Raw(row["data"]),
        owner_id=row["owner_id"],
        recorded_at=row["recorded_at"],
        prev_hash=bytes(row["prev_hash"]).hex(),
        hash=bytes(row["hash"]).hex(),
    )


def rfc3339(moment: datetime) -> str:
    """A moment as the JSON answers write it."""
    return _encoder.encode(moment)[1:-1].decode()


def ndjson_lines(rows: Iterable[asyncpg.Record]) -> bytes:
    """One `AuditEvent` JSON object per line."""
    return b"".join(_encoder.encode(audit_event(row)) + b"\n" for row in rows)


def csv_header() -> str:
    return _csv_text([CSV_COLUMNS])


def csv_lines(rows: Iterable[asyncpg.Record]) -> str:
    """CSV records (RFC 4180 quoting, CRLF line ends) in the order of `CSV_COLUMNS`."""
    return _csv_text(
        [
            row["position"],
            str(row["job_id"]),
            row["project_id"],
            row["seq"],
            str(row["event_id"]),
            row["type"],
            rfc3339(row["occurred_at"]),
            row["actor"],
            row["owner_id"],
            rfc3339(row["recorded_at"]),
            bytes(row["prev_hash"]).hex(),
            bytes(row["hash"]).hex(),
            row["data"],
        ]
        for row in rows
    )


def _csv_text(records: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(records)
    return buffer.getvalue()


# -- reading -----------------------------------------------------------------------------------


def _unique(values: Iterable[Any]) -> list[Any]:
    return sorted(set(values), key=str)


def page_sql(query: EventQuery, after: int, limit: int) -> tuple[str, list[Any]] | None:
    """The SQL and arguments of one page, or None when the query can select nothing."""
    projects: list[str] = _unique(query.projects)
    if query.within is not None:
        projects = [p for p in projects if p in query.within] if projects else _unique(query.within)
        if not projects:
            return None
    args: list[Any] = []

    def arg(value: Any, cast: str) -> str:
        args.append(value)
        return f"${len(args)}::{cast}"

    lower = after if query.from_position is None else max(after, query.from_position - 1)
    cursor = arg(lower, "bigint")
    upper = arg(MAX_POSITION if query.to_position is None else query.to_position, "bigint")
    conditions: list[str] = []
    if query.occurred_from is not None:
        conditions.append(f"e.occurred_at >= {arg(query.occurred_from, 'timestamptz')}")
    if query.occurred_to is not None:
        conditions.append(f"e.occurred_at < {arg(query.occurred_to, 'timestamptz')}")

    types = _unique(query.types)
    if types and DENSE_TYPE not in types:
        # The type index leaves progress out (migration 0010): said in the query's text, the
        # planner may use it without looking at the values.
        conditions.append(f"e.type <> '{DENSE_TYPE}'")
    # The index that drives the walk is that of the first dimension filtered on, in this order.
    # A type filter that takes in progress events walks the primary key instead: they are most
    # of the log and not in the type index, and the primary key finds them close together.
    dimensions = [
        ("job_id", _unique(query.jobs), "uuid"),
        ("project_id", projects, "text"),
        ("actor", _unique(query.actors), "text"),
        ("type", types, "text"),
    ]
    filtered = [dimension for dimension in dimensions if dimension[1]]
    driving = filtered[0] if filtered else None
    if driving is not None and driving[0] == "type" and DENSE_TYPE in types:
        driving = None
    for column, values, cast in filtered:
        if driving is not None and column == driving[0]:
            continue
        if len(values) == 1:
            conditions.append(f"e.{column} = {arg(values[0], cast)}")
        else:
            conditions.append(f"e.{column} = ANY ({arg(values, cast + '[]')})")
    if driving is None:
        where = " AND ".join([f"e.position > {cursor}", f"e.position <= {upper}", *conditions])
        n = arg(limit, "integer")
        sql = f"SELECT {_COLUMNS} FROM events e WHERE {where} ORDER BY e.position LIMIT {n}"
        return sql, args
    # The driving index must be walked whatever the plan knows of the values: a plan made
    # without them (the generic plan of a prepared statement, the inner query of a walk) walked
    # the primary key from the cursor instead and skipped what did not match, through the rest
    # of the log for a job that ended long ago or a small project (tests/export/test_audit.py).
    column, values, cast = driving
    if len(values) == 1 and column != "job_id":
        value = arg(values[0], cast)
        where = " AND ".join([_walk(column, value, cursor, upper), *conditions])
        n = arg(limit, "integer")
        sql = (
            f"SELECT {_COLUMNS} FROM events e WHERE {where} "
            f"ORDER BY e.{column}, e.position LIMIT {n}"
        )
        return sql, args
    # The index is walked once per value, each walk limited to the page, and the walks are
    # merged. A single job is walked so as well: see _walk.
    walk = arg(values, cast + "[]")
    where = " AND ".join([_walk(column, "d.v", cursor, upper), *conditions])
    n = arg(limit, "integer")
    sql = (
        f"SELECT {_COLUMNS} FROM unnest({walk}) AS d(v) CROSS JOIN LATERAL ("
        f"SELECT {_COLUMNS} FROM events e WHERE {where} ORDER BY e.{column}, e.position "
        f"LIMIT {n}) AS e ORDER BY e.position LIMIT {n}"
    )
    return sql, args


def _walk(column: str, value: str, lower: str, upper: str) -> str:
    """The events whose `column` is `value`, with a position in (`lower`, `upper`], written so
    that the planner reads them in order through the (column, position) index.

    A project, an actor or a type has many events among few values. With "column = value AND
    position > lower", a plan that does not know the value may walk the primary key from the
    cursor and skip the rest. As a range of (column, position) pairs, which the primary key
    cannot answer, only the column's own index gives their order.

    A job has few events among many jobs, and is read with an equality: as a range of pairs,
    the planner read the whole job through (job_id, seq), which leads with the job as well, and
    sorted it. Only the generic plan of a page of one job walked the primary key; a job is
    therefore always read in the walk of a lateral join, whose inner query is planned for any
    job and reads it through (job_id, position)."""
    if column == "job_id":
        return f"e.job_id = {value} AND e.position > {lower} AND e.position <= {upper}"
    pair = f"(e.{column}, e.position)"
    return f"{pair} > ({value}, {lower}) AND {pair} <= ({value}, {upper})"


async def fetch_page(
    conn: asyncpg.Connection, query: EventQuery, after: int, limit: int
) -> list[asyncpg.Record]:
    """Up to `limit` events of the query after position `after`, in position order."""
    built = page_sql(query, after, limit)
    if built is None:
        return []
    sql, args = built
    rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
    return rows


async def head_position(conn: asyncpg.Connection) -> int:
    """The highest committed position (everything at or below it is visible)."""
    value: int = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
    return value


async def pages(
    pool: asyncpg.Pool, query: EventQuery, *, after: int = 0, upto: int, page_size: int = 1000
) -> AsyncIterator[list[asyncpg.Record]]:
    """The query's whole result after `after` and up to position `upto`, a page at a time.

    Each page is one query on a connection taken from the pool for that query alone. Pass the
    log's head as `upto` for a result that does not grow while it is read.
    """
    capped = upto if query.to_position is None else min(query.to_position, upto)
    query = replace(query, to_position=capped)
    while after < capped:
        async with pool.acquire() as conn:
            rows = await fetch_page(conn, query, after, page_size)
        if not rows:
            return
        yield rows
        if len(rows) < page_size:
            return
        after = rows[-1]["position"]
