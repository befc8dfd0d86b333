"""The hash chain over each job's events, as the database computes it.

Each event's hash covers the previous event's hash and the event's own stored fields, so changing
or removing any stored event breaks every link after it. The database extends the chain on insert
(see `migrations/`); this module recomputes it independently, for the verifier and for auditors
checking an exported history offline.

Fields are length-prefixed (`<bytes>:<value>,`) so that no shift of text between two fields can
produce the same input.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from uuid import UUID

import msgspec

GENESIS_HASH = bytes(32)
"""The `prev_hash` of every job's first event."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# The hash input: the previous hash, then each field as `<bytes>:<value>,`, in this order: job_id,
# seq, event_id, type, actor, project_id, owner_id, occurred_at (epoch microseconds), data. A UUID's
# text is always 36 bytes. Written as one formatting pass, not one bytes object per field: every
# appended event is hashed by its writer and again by the database's check.
_HASH_INPUT = b"%b36:%b,%d:%b,36:%b,%d:%b,%d:%b,%d:%b,%d:%b,%d:%b,%d:%b,"


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch, exactly. A naive datetime is local time, as the
    database driver takes it."""
    if moment.tzinfo is None:
        moment = moment.astimezone(UTC)
    return (moment - _EPOCH) // _MICROSECOND


class ChainLink(msgspec.Struct, frozen=True, kw_only=True):
    """The stored fields of one event that its hash covers."""

    job_id: UUID
    seq: int
    event_id: UUID
    type: str
    actor: str
    project_id: str
    owner_id: str
    occurred_at: datetime
    data: str
    """The payload's JSON text exactly as stored."""
    prev_hash: bytes
    hash: bytes
    position: int | None = None
    """Where the event sits in the log; not hashed (the database assigns it), only reported."""


def event_hash(prev_hash: bytes, link: ChainLink) -> bytes:
    """SHA-256 of the previous hash followed by the event's length-prefixed fields."""
    return chain_hash(
        prev_hash,
        link.job_id,
        link.seq,
        link.event_id,
        link.type,
        link.actor,
        link.project_id,
        link.owner_id,
        link.occurred_at,
        link.data,
    )


def chain_hash(
    prev_hash: bytes,
    job_id: UUID,
    seq: int,
    event_id: UUID,
    type: str,
    actor: str,
    project_id: str,
    owner_id: str,
    occurred_at: datetime,
    data: str,
) -> bytes:
    """The hash of an event from its fields, as `event_hash` (for a writer that chains the
    events it appends before they are stored). A naive `occurred_at` is local time, as the
    database driver takes it."""
    number = b"%d" % seq
    micros = b"%d" % epoch_micros(occurred_at)
    kind = type.encode()
    who = actor.encode()
    project = project_id.encode()
    owner = owner_id.encode()
    text = data.encode()
    return hashlib.sha256(
        _HASH_INPUT
        % (
            prev_hash,
            str(job_id).encode(),
            len(number),
            number,
            str(event_id).encode(),
            len(kind),
            kind,
            len(who),
            who,
            len(project),
            project,
            len(owner),
            owner,
            len(micros),
            micros,
            len(text),
            text,
        )
    ).digest()


class BrokenLink(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The first place where a job's stored events stop matching their chain."""

    seq: int
    event_id: UUID | None
    reason: str
    position: int | None = None
    """The log position of the event named, when there is one (not for a missing event)."""


def check_link(link: ChainLink, prev_seq: int, prev_hash: bytes) -> BrokenLink | None:
    """Check one event against the one before it (`prev_seq`, `prev_hash`); None if it holds.

    A link is broken when its seq is not the next one (an event removed), its `prev_hash` is not
    the previous event's hash (an event removed or re-chained), or its hash does not match its
    fields (an event altered).
    """
    if link.seq != prev_seq + 1:
        return BrokenLink(
            seq=prev_seq + 1,
            event_id=None,
            reason=f"event {prev_seq + 1} is missing (next is {link.seq})",
        )
    if link.prev_hash != prev_hash:
        return BrokenLink(
            seq=link.seq,
            event_id=link.event_id,
            reason="prev_hash does not match the previous event",
            position=link.position,
        )
    if event_hash(prev_hash, link) != link.hash:
        return BrokenLink(
            seq=link.seq,
            event_id=link.event_id,
            reason="hash does not match the stored fields",
            position=link.position,
        )
    return None


def verify_chain(
    links: list[ChainLink],
    *,
    expected_last_seq: int | None = None,
    after_seq: int = 0,
    anchor: bytes = GENESIS_HASH,
) -> BrokenLink | None:
    """Check a job's events in seq order; return the first broken link, or None.

    From seq 1 by default. `after_seq` and `anchor` start the check later: the first link must
    then be event `after_seq + 1` and follow `anchor`, the hash of event `after_seq` as trusted
    from elsewhere. `expected_last_seq`, when known from elsewhere (the jobs projection), also
    catches events removed from the end.
    """
    prev = anchor
    seq = after_seq
    for link in links:
        broken = check_link(link, seq, prev)
        if broken is not None:
            return broken
        prev = link.hash
        seq = link.seq
    if expected_last_seq is not None and seq < expected_last_seq:
        return BrokenLink(
            seq=seq + 1,
            event_id=None,
            reason=f"events {seq + 1} to {expected_last_seq} are missing",
        )
    return None
