"""Ids that sort by the time they were made: UUID version 7 (RFC 9562).

Event ids and job ids are keys of btree indexes that grow with the log: `events_event_id`,
`events_job_seq`, `events_job_position` and `jobs_pkey`. A random id (version 4) lands on a random
leaf of its index, so once an index outgrows the server's buffers nearly every append reads a page
back in, and after each checkpoint it writes that page whole into the WAL before changing it. An
id made from the clock lands at the right-hand end, where the last appends already brought the
page in. Measured on a log of 4 million events (`bench/appends.py`'s closed loop of 1,000 new
jobs for 6.5 s, each run just after a checkpoint, three runs of each interleaved): with random job
and event ids 20,100 to 21,900 full-page images per run, about 4.4 kB of WAL per append and
6,300 to 9,400 events/s; with these 2,050 to 2,090 images, about 2.6 kB and 10,400 to 12,300
events/s.

Layout: 48 bits of Unix time in milliseconds, the version (7), 12 bits of the time within the
millisecond (RFC 9562 section 6.2, method 3: ids made more than about 0.25 µs apart sort in the
order they were made, and a call takes longer than that), the variant, and 62 random bits. The
id tells when it was made, to the millisecond; a job's creation time is no secret from anyone who
may see the job.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from uuid import UUID

from asyncpg.pgproto.pgproto import UUID as _DriverUUID

_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)
_RANDOM_BITS = (1 << 62) - 1
_NS_PER_MS = 1_000_000
_RANDOM_CHUNK = 8 * 512


_numbers: Iterator[tuple[int]] = iter(())
"""Random 64-bit numbers from the operating system's source, read a few kB at a time: one system
call per 512 ids instead of one per id. Taking one is a single step of a C iterator, which two
threads cannot both take the same number from."""


def _fresh_numbers() -> Iterator[tuple[int]]:
    return struct.iter_unpack(">Q", os.urandom(_RANDOM_CHUNK))


def _forget_numbers() -> None:
    """A forked child must not make the ids its parent makes next."""
    global _numbers
    _numbers = iter(())


os.register_at_fork(after_in_child=_forget_numbers)


def uuid7() -> UUID:
    """A new UUID version 7, later in order than the ones made before it in this process (while
    the clock does not go back; two threads within the same 0.25 µs compare by random bits).

    It is the database driver's UUID type, the one asyncpg returns for uuid columns: it passes
    for a `uuid.UUID` (isinstance, equality, hash and order with the standard class, msgspec's
    encoder) while its text, bytes and hash are computed in C, and the driver sends it without
    converting it. Every id an append carries is made, formatted into its hash and sent to the
    database: 3.3 µs of the writer's CPU per id with the standard library's class, 0.9 µs with
    this one."""
    global _numbers
    try:
        (random,) = next(_numbers)
    except StopIteration:
        _numbers = _fresh_numbers()
        (random,) = next(_numbers)
    ms, within = divmod(time.time_ns(), _NS_PER_MS)
    fraction = within * 4096 // _NS_PER_MS
    value = (ms << 80) | _VERSION_AND_VARIANT | (fraction << 64) | (random & _RANDOM_BITS)
    made: UUID = _DriverUUID(value.to_bytes(16, "big"))
    return made
