"""The hash chain: a correct chain verifies; every alteration or removal names its seq."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.chain import GENESIS_HASH, ChainLink, epoch_micros, event_hash, verify_chain

JOB_ID = UUID("6c1f0a52-3f7e-4d0e-9b7a-0c7c9f3a1e22")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# Text fields that sit next to each other in the hashed input.
ADJACENT_TEXT_FIELDS = ("type", "actor", "project_id", "owner_id")


def link(seq: int, prev_hash: bytes, **fields: object) -> ChainLink:
    """Event `seq` of the test job, chained onto `prev_hash`, with its hash computed."""
    values: dict[str, object] = {
        "job_id": JOB_ID,
        "seq": seq,
        "event_id": UUID(int=seq),
        "type": "export:progress",
        "actor": "worker:w1",
        "project_id": "project-7",
        "owner_id": "user:ada",
        "occurred_at": T0 + timedelta(seconds=seq, microseconds=seq),
        "data": f'{{"phase":"processing","progress":{seq},"phaseProgress":{seq}}}',
    }
    values.update(fields)
    unhashed = ChainLink(prev_hash=prev_hash, hash=b"", **values)  # type: ignore[arg-type]
    return msgspec.structs.replace(unhashed, hash=event_hash(prev_hash, unhashed))


def chain(n: int) -> list[ChainLink]:
    links: list[ChainLink] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        links.append(link(seq, prev))
        prev = links[-1].hash
    return links


def rechain(links: list[ChainLink]) -> list[ChainLink]:
    """Recompute every prev_hash and hash, as a forger who rewrote history would."""
    out: list[ChainLink] = []
    prev = GENESIS_HASH
    for item in links:
        unhashed = msgspec.structs.replace(item, prev_hash=prev)
        out.append(msgspec.structs.replace(unhashed, hash=event_hash(prev, unhashed)))
        prev = out[-1].hash
    return out


def test_a_correct_chain_verifies() -> None:
    links = chain(6)
    assert links[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(links))
    assert len({item.hash for item in links}) == 6
    assert verify_chain(links) is None
    assert verify_chain(links, expected_last_seq=6) is None
    assert verify_chain([]) is None


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "type": st.text(max_size=10),
                "actor": st.text(max_size=10),
                "data": st.text(max_size=30),
                "occurred_at": st.datetimes(timezones=st.just(UTC)),
            }
        ),
        max_size=8,
    )
)
def test_any_chain_built_with_event_hash_verifies(fields: list[dict[str, object]]) -> None:
    links: list[ChainLink] = []
    prev = GENESIS_HASH
    for seq, values in enumerate(fields, 1):
        links.append(link(seq, prev, **values))
        prev = links[-1].hash
    assert verify_chain(links, expected_last_seq=len(links)) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "export:completed"),
        ("actor", "worker:w2"),
        ("project_id", "project-8"),
        ("owner_id", "user:mallory"),
        ("data", '{"phase":"processing","progress":99,"phaseProgress":99}'),
        ("occurred_at", T0 + timedelta(seconds=3, microseconds=4)),
        ("event_id", UUID(int=99)),
        ("job_id", UUID(int=1)),
    ],
)
@pytest.mark.parametrize("seq", [1, 3, 5])
def test_an_altered_field_names_its_event(field: str, value: object, seq: int) -> None:
    links = chain(5)
    links[seq - 1] = msgspec.structs.replace(links[seq - 1], **{field: value})
    broken = verify_chain(links)
    assert broken is not None
    assert broken.seq == seq
    assert broken.event_id == links[seq - 1].event_id
    assert "hash" in broken.reason


def test_an_altered_and_rehashed_event_breaks_the_next_link() -> None:
    links = chain(5)
    forged = msgspec.structs.replace(links[2], actor="user:mallory")
    links[2] = msgspec.structs.replace(forged, hash=event_hash(forged.prev_hash, forged))
    broken = verify_chain(links)
    assert broken is not None
    assert broken.seq == 4
    assert "prev_hash" in broken.reason


def test_a_rewritten_prev_hash_is_caught() -> None:
    links = chain(4)
    links[1] = msgspec.structs.replace(links[1], prev_hash=bytes(32))
    broken = verify_chain(links)
    assert broken is not None
    assert broken.seq == 2


@pytest.mark.parametrize("removed", [2, 3, 5])
def test_an_event_removed_from_the_middle_is_named(removed: int) -> None:
    links = chain(6)
    del links[removed - 1]
    broken = verify_chain(links)
    assert broken is not None
    assert broken.seq == removed
    assert broken.event_id is None
    assert "missing" in broken.reason


def test_a_removed_first_event_is_named() -> None:
    broken = verify_chain(chain(3)[1:])
    assert broken is not None
    assert broken.seq == 1


def test_a_removal_renumbered_and_rechained_is_caught_by_the_next_hash_only_if_anchored() -> None:
    """Renumbering and rechaining everything after a removal produces a self-consistent chain;
    only the known length (the jobs projection) still exposes it."""
    links = chain(5)
    del links[2]
    renumbered = rechain(
        [
            msgspec.structs.replace(item, seq=seq, event_id=UUID(int=seq))
            for seq, item in enumerate(links, 1)
        ]
    )
    assert verify_chain(renumbered) is None
    broken = verify_chain(renumbered, expected_last_seq=5)
    assert broken is not None
    assert broken.seq == 5


@pytest.mark.parametrize("first", [1, 2, 4])
def test_reordered_events_are_named(first: int) -> None:
    links = chain(5)
    links[first - 1], links[first] = links[first], links[first - 1]
    broken = verify_chain(links)
    assert broken is not None
    assert broken.seq == first


def test_reordered_and_renumbered_events_break_the_chain() -> None:
    links = chain(5)
    swapped = [links[0], links[2], links[1], links[3], links[4]]
    renumbered = [msgspec.structs.replace(item, seq=seq) for seq, item in enumerate(swapped, 1)]
    broken = verify_chain(renumbered)
    assert broken is not None
    assert broken.seq == 2


@pytest.mark.parametrize("kept", [0, 1, 3, 5])
def test_events_removed_from_the_end_need_the_expected_last_seq(kept: int) -> None:
    links = chain(6)[:kept]
    assert verify_chain(links) is None  # nothing in the chain itself can tell
    broken = verify_chain(links, expected_last_seq=6)
    assert broken is not None
    assert broken.seq == kept + 1
    assert broken.event_id is None
    assert f"events {kept + 1} to 6 are missing" in broken.reason


@pytest.mark.parametrize(("left", "right"), list(itertools.pairwise(ADJACENT_TEXT_FIELDS)))
def test_moving_text_between_adjacent_fields_changes_the_hash(left: str, right: str) -> None:
    a = link(1, GENESIS_HASH, **{left: "ab", right: "c"})
    b = link(1, GENESIS_HASH, **{left: "a", right: "bc"})
    assert event_hash(GENESIS_HASH, a) != event_hash(GENESIS_HASH, b)
    # Without the length prefix both would hash the same concatenation.
    assert getattr(a, left) + getattr(a, right) == getattr(b, left) + getattr(b, right)


def test_a_separator_inside_a_field_cannot_forge_another_field() -> None:
    a = link(1, GENESIS_HASH, actor="w", project_id="p")
    b = link(1, GENESIS_HASH, actor="w1:p,", project_id="")
    c = link(1, GENESIS_HASH, actor="w,1:p", project_id="")
    assert len({a.hash, b.hash, c.hash}) == 3


def test_the_hash_covers_the_previous_hash() -> None:
    a = link(2, GENESIS_HASH)
    b = link(2, b"\x01" * 32)
    assert a.hash != b.hash


def test_times_hash_at_microsecond_precision_whatever_the_zone() -> None:
    moment = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    elsewhere = moment.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert epoch_micros(moment) == epoch_micros(elsewhere) == 1740830400123456
    assert link(1, GENESIS_HASH, occurred_at=moment).hash == (
        link(1, GENESIS_HASH, occurred_at=elsewhere).hash
    )
    one_later = moment + timedelta(microseconds=1)
    assert link(1, GENESIS_HASH, occurred_at=moment).hash != (
        link(1, GENESIS_HASH, occurred_at=one_later).hash
    )


def test_a_naive_time_is_local_time_as_the_driver_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A POSIX zone string needs no time zone database: EST5 is five hours behind UTC."""
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    try:
        naive = datetime(2026, 1, 1, 12, 0, 0, 123456)
        assert epoch_micros(naive) == epoch_micros(
            datetime(2026, 1, 1, 17, 0, 0, 123456, tzinfo=UTC)
        )
    finally:
        monkeypatch.undo()
        time.tzset()
