"""The ids the services make for events and jobs: UUID version 7, in the order they were made."""

from __future__ import annotations

import os
import time
import uuid

import asyncpg
import msgspec

from services.common.eventlog import NewEvent
from services.common.ids import uuid7
from tests.support import progress


def test_an_id_is_a_version_7_uuid_of_the_rfc_variant() -> None:
    value = uuid7()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert uuid.UUID(str(value)) == value


def test_an_id_passes_for_the_standard_librarys_uuid() -> None:
    earlier = uuid7()
    value = uuid7()
    same = uuid.UUID(str(value))
    assert isinstance(value, uuid.UUID)
    assert value == same
    assert same == value
    assert hash(value) == hash(same)
    assert {same: 1}[value] == 1
    assert earlier < same
    assert uuid.UUID(str(earlier)) < value
    assert msgspec.json.decode(msgspec.json.encode(value), type=uuid.UUID) == value
    assert (str(value), value.bytes, value.int) == (str(same), same.bytes, same.int)


def test_an_id_carries_the_millisecond_it_was_made() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_ids_made_one_after_another_sort_in_that_order() -> None:
    made = [uuid7() for _ in range(20_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    # Their database order is the same: PostgreSQL compares uuids by their bytes.
    assert [m.bytes for m in made] == sorted(m.bytes for m in made)


def test_ids_made_in_one_millisecond_differ_in_their_random_bits() -> None:
    made = [uuid7() for _ in range(2_000)]
    random_parts = {m.int & ((1 << 62) - 1) for m in made}
    assert len(random_parts) == len(made)


def test_new_events_get_a_version_7_id_unless_given_one() -> None:
    assert NewEvent(data=progress(1).data, actor="t").event_id.version == 7
    given = uuid.uuid4()
    assert NewEvent(data=progress(1).data, actor="t", event_id=given).event_id == given


def test_a_forked_child_does_not_make_the_ids_its_parent_makes() -> None:
    """Random bits are read ahead a few kB at a time; a forked child must not share them."""
    uuid7()  # the parent has random bits in hand
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only writes and leaves
        os.write(writer, uuid7().bytes)
        os._exit(0)
    os.close(writer)
    made_there = uuid.UUID(bytes=os.read(reader, 16))
    os.close(reader)
    os.waitpid(child, 0)
    made_here = uuid7()
    random_bits = (1 << 62) - 1
    assert made_here.int & random_bits != made_there.int & random_bits


async def test_an_id_goes_to_the_database_and_back_unchanged(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        made = uuid7()
        assert await conn.fetchval("SELECT $1::uuid", made) == made
        assert await conn.fetchval("SELECT $1::uuid::text", made) == str(made)
    finally:
        await conn.close()
