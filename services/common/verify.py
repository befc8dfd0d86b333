"""Verification of a range of the log: the hash chains of every job with events in it.

`verify_range(pool, first, last)` reads the events at positions `first` to `last` (inclusive) in
position order, a page at a time, and checks each job's events among them as a chain of its own:

* The anchor of a job is the stored `prev_hash` of its first event in the range. An event with
  seq 1 must follow the genesis hash; a later one is taken to follow its anchor, and the anchor
  is compared with the stored hash of the job's event just before the range (looked up, not
  recomputed: that event is outside the range).
* Every further event of the job in the range must be the next seq, carry the previous event's
  hash as its `prev_hash`, and hash to its stored `hash` (`schemas.chain.check_link`).
* A job whose last event is inside the range, by the jobs projection, must not lack events at
  its end.

So a range that verifies proves that its events are unaltered, none is missing between two of a
job's events in it, and each job's first event in it links to what is stored before it. It does
not prove the events before the range: verify those ranges (or the whole job) as well. Ranges
that overlap or touch, verified one after the other, prove the log they cover. The range is cut
at the highest position committed when the check starts, so appends running meanwhile are not
mistaken for a broken end.

Memory grows with the number of jobs in the range, not with the number of events.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg
import msgspec

from schemas.chain import GENESIS_HASH, BrokenLink, ChainLink, check_link

_RANGE_PAGE = """
SELECT position, job_id, seq, event_id, type, actor, project_id, owner_id, occurred_at, data,
       prev_hash, hash
  FROM events
 WHERE position > $1 AND position <= $2
 ORDER BY position
 LIMIT $3
"""

# The stored hash of the event before each job's first event in the range.
_BEFORE = """
SELECT r.job_id, e.hash
  FROM unnest($1::uuid[], $2::integer[]) AS r(job_id, seq)
  JOIN events e ON e.job_id = r.job_id AND e.seq = r.seq
"""

# Where each job's stream ends by the projection (last_seq) and where its last stored event is.
# A job whose stored events end inside the range short of last_seq has lost events at its end;
# the position comes from the log, so removing the last event cannot hide the loss.
_ENDS = """
SELECT j.job_id, j.last_seq,
       (SELECT max(e.position) FROM events e WHERE e.job_id = j.job_id) AS last_position
  FROM jobs j
 WHERE j.job_id = ANY ($1::uuid[])
"""

_HEAD = "SELECT coalesce(max(position), 0) FROM events"

_LOOKUP_BATCH = 1000


class JobRangeResult(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One job's events in the range, checked as a chain from its anchor."""

    job_id: UUID
    project_id: str
    first_seq: int
    last_seq: int
    first_position: int
    last_position: int
    events_checked: int
    anchor: str
    """The stored `prevHash` of the job's first event in the range (hex): what it follows."""
    ok: bool
    broken: BrokenLink | None = None


class RangeBreak(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The first broken link of the range: the event (or missing seq) and its job."""

    job_id: UUID
    project_id: str
    seq: int
    position: int | None
    """Null for an event that is missing."""
    event_id: UUID | None
    reason: str


class RangeVerifyReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    from_position: int
    to_position: int
    """The last position checked: the requested one, or the log's head if that was lower."""
    events_checked: int
    jobs_checked: int
    ok: bool
    jobs: list[JobRangeResult]
    """Every job with events in the range, by the position of its first one."""
    broken: RangeBreak | None = None
    """The broken link with the lowest position in the range (the first one a reader meets)."""


@dataclass(slots=True)
class _Job:
    project_id: str
    first_seq: int
    first_position: int
    first_event_id: UUID
    anchor: bytes
    last_seq: int
    last_position: int
    last_hash: bytes
    count: int = 1
    broken: BrokenLink | None = None
    broken_at: float = 0.0
    """Where the break was noticed, in position order, to find the first one overall."""

    def fail(self, broken: BrokenLink, at: float) -> None:
        if self.broken is None or at < self.broken_at:
            self.broken, self.broken_at = broken, at


def chain_link(row: asyncpg.Record) -> ChainLink:
    """A stored event as the hash chain sees it (a row of `chain_links` or a range page)."""
    return ChainLink(
        job_id=row["job_id"],
        seq=row["seq"],
        event_id=row["event_id"],
        type=row["type"],
        actor=row["actor"],
        project_id=row["project_id"],
        owner_id=row["owner_id"],
        occurred_at=row["occurred_at"],
        data=row["data"],
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
        position=row["position"],
    )


async def verify_range(
    pool: asyncpg.Pool, from_position: int, to_position: int, *, page_size: int = 5000
) -> RangeVerifyReport:
    """Check the hash chains of the events at positions `from_position`..`to_position`.

    Raises ValueError for an empty or negative range. Reads `page_size` events per query, each
    on a connection of its own from the pool.
    """
    if from_position < 1 or to_position < from_position:
        raise ValueError("the range must satisfy 1 <= from <= to")
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    async with pool.acquire() as conn:
        head: int = await conn.fetchval(_HEAD)
    last = min(to_position, head)
    jobs: dict[UUID, _Job] = {}
    checked = 0
    after = from_position - 1
    while after < last:
        async with pool.acquire() as conn:
            rows = await conn.fetch(_RANGE_PAGE, after, last, page_size)
        if not rows:
            break
        for row in rows:
            link = chain_link(row)
            assert link.position is not None
            job = jobs.get(link.job_id)
            if job is None:
                job = _Job(
                    project_id=link.project_id,
                    first_seq=link.seq,
                    first_position=link.position,
                    first_event_id=link.event_id,
                    anchor=link.prev_hash,
                    last_seq=link.seq,
                    last_position=link.position,
                    last_hash=link.hash,
                )
                jobs[link.job_id] = job
                if link.seq == 1:
                    broken = check_link(link, 0, GENESIS_HASH)
                else:
                    broken = check_link(link, link.seq - 1, link.prev_hash)
            else:
                broken = None
                if job.broken is None:
                    broken = check_link(link, job.last_seq, job.last_hash)
                job.count += 1
                job.last_seq, job.last_position, job.last_hash = (
                    link.seq,
                    link.position,
                    link.hash,
                )
            if broken is not None:
                job.fail(broken, link.position)
        checked += len(rows)
        after = rows[-1]["position"]

    ids = list(jobs)
    for start in range(0, len(ids), _LOOKUP_BATCH):
        batch = ids[start : start + _LOOKUP_BATCH]
        await _check_edges(pool, {job_id: jobs[job_id] for job_id in batch}, last)

    results = [
        JobRangeResult(
            job_id=job_id,
            project_id=job.project_id,
            first_seq=job.first_seq,
            last_seq=job.last_seq,
            first_position=job.first_position,
            last_position=job.last_position,
            events_checked=job.count,
            anchor=job.anchor.hex(),
            ok=job.broken is None,
            broken=job.broken,
        )
        for job_id, job in jobs.items()
    ]
    first: RangeBreak | None = None
    broken_jobs = [(job.broken_at, job_id, job) for job_id, job in jobs.items() if job.broken]
    if broken_jobs:
        _, job_id, job = min(broken_jobs, key=lambda item: item[0])
        assert job.broken is not None
        first = RangeBreak(
            job_id=job_id,
            project_id=job.project_id,
            seq=job.broken.seq,
            position=job.broken.position,
            event_id=job.broken.event_id,
            reason=job.broken.reason,
        )
    return RangeVerifyReport(
        from_position=from_position,
        to_position=last,
        events_checked=checked,
        jobs_checked=len(results),
        ok=first is None,
        jobs=results,
        broken=first,
    )


async def _check_edges(pool: asyncpg.Pool, jobs: dict[UUID, _Job], last: int) -> None:
    """The link into the range from the event before it, and events missing from a job's end."""
    later = {job_id: job for job_id, job in jobs.items() if job.first_seq > 1}
    async with pool.acquire() as conn:
        before = {
            row["job_id"]: bytes(row["hash"])
            for row in await conn.fetch(
                _BEFORE, list(later), [job.first_seq - 1 for job in later.values()]
            )
        }
        ends = await conn.fetch(_ENDS, list(jobs))
    for job_id, job in later.items():
        stored = before.get(job_id)
        previous = job.first_seq - 1
        if stored is None:
            reason = f"event {previous}, just before the range, is missing"
            job.fail(BrokenLink(seq=previous, event_id=None, reason=reason), job.first_position)
        elif stored != job.anchor:
            reason = (
                f"prev_hash does not match the stored hash of event {previous}, before the range"
            )
            job.fail(
                BrokenLink(
                    seq=job.first_seq,
                    event_id=job.first_event_id,
                    reason=reason,
                    position=job.first_position,
                ),
                job.first_position,
            )
    for row in ends:
        job = jobs[row["job_id"]]
        end_position, end_seq = row["last_position"], row["last_seq"]
        if end_position is not None and end_position <= last and end_seq > job.last_seq:
            job.fail(
                BrokenLink(
                    seq=job.last_seq + 1,
                    event_id=None,
                    reason=f"events {job.last_seq + 1} to {end_seq} are missing",
                ),
                job.last_position + 0.5,
            )
