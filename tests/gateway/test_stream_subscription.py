"""The stream subscription machine (a project, the whole log), without sockets or a database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Event, Progress
from services.gateway.subscription import (
    Action,
    ReadSnapshot,
    ReadStreamPage,
    Send,
    SendPage,
    SendStreamCaughtUp,
    SendStreamSync,
    StreamSubscription,
    SubscriptionError,
)
from tests.gateway.conftest import events_sent

WHEN = datetime(2024, 1, 1, tzinfo=UTC)


def event(position: int, project: str = "p1") -> Event:
    return Event(
        job_id=uuid.UUID(int=position % 7),
        project_id=project,
        seq=position,
        position=position,
        event_id=uuid.UUID(int=position),
        type=Progress.TYPE,
        occurred_at=WHEN,
        actor="test",
        data=Progress(phase="processing", progress=0, phase_progress=0),
    )


def sent(actions: list[Action]) -> list[int]:
    return [e.position for e in events_sent(actions)]


def test_resume_from_a_position_replays_then_goes_live() -> None:
    sub = StreamSubscription(3, page_size=2)
    assert sub.start() == [ReadSnapshot()]
    assert sub.on_snapshot(9) == [SendStreamSync(9), ReadStreamPage(3, 2)]
    actions = sub.on_page([event(5), event(8)])
    assert sent(actions) == [5, 8]
    assert actions[-1] == ReadStreamPage(8, 2)
    # The stream's last event is at 8, the head at 9: the cursor moves to the head.
    assert sub.on_page([]) == [SendStreamCaughtUp(9)]
    assert sub.delivered_position == 9
    assert sent(sub.on_live(event(12))) == [12]
    assert sub.on_live(event(12)) == []


def test_state_only_starts_at_the_head() -> None:
    sub = StreamSubscription(None)
    sub.start()
    assert sub.on_snapshot(40)[0] == SendStreamSync(40)
    # Events committed between the snapshot and the first live delivery are still read.
    assert sent(sub.on_page([event(41)])) == [41]


def test_a_cursor_beyond_the_head_is_resynced_to_it() -> None:
    sub = StreamSubscription(100)
    sub.start()
    assert sub.on_snapshot(10) == [SendStreamSync(10), ReadStreamPage(10, 500)]


def test_live_events_during_replay_are_not_buffered_and_force_another_read() -> None:
    sub = StreamSubscription(0, page_size=5)
    sub.start()
    sub.on_snapshot(2)
    assert sub.on_live(event(3)) == []
    # A short page that does not reach the live mark was read before it was committed.
    assert sub.on_page([event(1), event(2)])[-1] == ReadStreamPage(2, 5)
    assert sent(sub.on_page([event(3)])) == [3]
    assert sub.phase == "live"


def test_misuse_is_refused() -> None:
    sub = StreamSubscription(0)
    with pytest.raises(SubscriptionError):
        sub.on_snapshot(1)
    sub.start()
    with pytest.raises(SubscriptionError):
        sub.start()
    with pytest.raises(SubscriptionError):
        sub.on_page([])
    sub.on_snapshot(5)
    with pytest.raises(SubscriptionError, match="position order"):
        sub.on_page([event(4), event(2)])
    with pytest.raises(ValueError, match="page_size"):
        StreamSubscription(0, page_size=0)


@dataclass
class World:
    log: list[Event]  # every event, in position (= commit) order; some are not of the stream
    committed: int
    tailer: list[Event] = field(default_factory=list)
    out: list[tuple[str, Action]] = field(default_factory=list)
    asked: ReadStreamPage | None = None
    read: list[Event] | None = None
    snapshot_asked: bool = False

    def take(self, source: str, actions: list[Action]) -> None:
        for action in actions:
            self.out.append((source, action))
            if isinstance(action, ReadSnapshot):
                self.snapshot_asked = True
            if isinstance(action, ReadStreamPage):
                assert self.asked is None, "two reads outstanding"
                assert self.read is None, "two reads outstanding"
                self.asked = action


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_interleaving_delivers_each_event_of_the_stream_once_in_order(
    data: st.DataObject,
) -> None:
    n = data.draw(st.integers(0, 50), label="n")
    gaps = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n), label="gaps")
    ours = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="of the stream")
    positions = [sum(gaps[: i + 1]) for i in range(n)]
    log = [event(p, "p1" if mine else "other") for p, mine in zip(positions, ours, strict=True)]
    mine = [e for e in log if e.project_id == "p1"]
    after = data.draw(st.none() | st.integers(0, (positions[-1] if n else 0) + 3), label="after")
    page_size = data.draw(st.integers(1, 6), label="page_size")
    world = World(log, data.draw(st.integers(0, n), label="committed before"))
    sub = StreamSubscription(after, page_size=page_size)
    world.take("start", sub.start())
    head: int | None = None
    snapshot_done = False
    duplicates = data.draw(st.integers(0, 5))
    last_live: Event | None = None

    for _ in range(10_000):
        moves = []
        if world.committed < n:
            moves.append("commit")
        if world.tailer:
            moves.append("live")
        if last_live is not None and duplicates:
            moves.append("duplicate")
        if world.snapshot_asked and head is None:
            moves.append("read-snapshot")
        if head is not None and not snapshot_done:
            moves.append("answer-snapshot")
        if world.asked is not None:
            moves.append("read-page")
        if world.read is not None:
            moves.append("answer-page")
        if not moves:
            break
        move = data.draw(st.sampled_from(moves))
        if move == "commit":
            committed = log[world.committed]
            world.committed += 1
            if committed.project_id == "p1":  # the pump feeds only the stream's events
                world.tailer.append(committed)
        elif move == "live":
            last_live = world.tailer.pop(0)
            world.take("live", sub.on_live(last_live))
        elif move == "duplicate":
            duplicates -= 1
            assert last_live is not None
            world.take("live", sub.on_live(last_live))
        elif move == "read-snapshot":
            head = log[world.committed - 1].position if world.committed else 0
        elif move == "answer-snapshot":
            assert head is not None
            snapshot_done = True
            world.take("snapshot", sub.on_snapshot(head))
        elif move == "read-page":
            request = world.asked
            assert request is not None
            world.asked = None
            visible = [e for e in log[: world.committed] if e.project_id == "p1"]
            world.read = [e for e in visible if e.position > request.after_position][
                : request.limit
            ]
        elif move == "answer-page":
            page = world.read
            assert page is not None
            world.read = None
            world.take("page", sub.on_page(page))
    else:
        pytest.fail("the machine did not settle")

    assert head is not None
    start = head if after is None or after >= head else after
    actions = [action for _, action in world.out]
    assert actions[:2] == [ReadSnapshot(), SendStreamSync(head)]
    assert sent(actions) == [e.position for e in mine if e.position > start]
    assert sub.phase == "live"
    caught_up = False
    for source, action in world.out:
        if isinstance(action, SendStreamCaughtUp):
            caught_up = True
            assert action.position >= head
        if isinstance(action, (Send, SendPage)) and source == "live":
            assert caught_up, "a live event was sent before caught-up"
