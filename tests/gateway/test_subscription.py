"""The subscription state machine, without sockets or a database: inputs in, actions out."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    ArchiveInfo,
    Cancelled,
    Completed,
    DownloadProgress,
    DownloadStarted,
    Event,
    EventData,
    Failed,
    Progress,
    Queued,
)
from schemas.state import JobState, replay
from services.gateway.subscription import (
    Action,
    ReadPage,
    ReadSnapshot,
    Send,
    SendCaughtUp,
    SendEndOfStream,
    SendPage,
    SendStatusSync,
    Subscription,
    SubscriptionError,
)
from tests.gateway.conftest import events_sent

JOB = uuid.UUID(int=1)
WHEN = datetime(2024, 1, 1, tzinfo=UTC)


def event(seq: int, data: EventData | None = None, job_id: uuid.UUID = JOB) -> Event:
    if data is None:
        data = Queued() if seq == 1 else Progress(phase="processing", progress=0, phase_progress=0)
    return Event(
        job_id=job_id,
        project_id="p1",
        seq=seq,
        position=seq,
        event_id=uuid.UUID(int=seq),
        type=type(data).TYPE,
        occurred_at=WHEN,
        actor="test",
        data=data,
    )


def history(n: int, last: EventData | None = None) -> list[Event]:
    events = [event(seq) for seq in range(1, n + 1)]
    if last is not None:
        events[-1] = event(n, last)
    return events


def state_of(events: list[Event]) -> JobState:
    state = replay(events)
    assert state is not None
    return state


def phase_of(sub: Subscription) -> str:
    # Through a function, so that mypy does not narrow the property across calls.
    return sub.phase


def sent(actions: list[Action]) -> list[int]:
    return [e.seq for e in events_sent(actions)]


ARCHIVE = ArchiveInfo(file_name="a.zip", size_bytes=1, sha256="0" * 64)


# Examples, one per rule.


def test_reconnect_syncs_state_then_replays_then_goes_live() -> None:
    events = history(5)
    sub = Subscription(JOB, 2, page_size=2)
    assert sub.start() == [ReadSnapshot()]
    assert sub.on_snapshot(state_of(events)) == [
        SendStatusSync(state_of(events), 5),
        ReadPage(2, 2),
    ]
    assert phase_of(sub) == "replaying"
    assert sub.on_page(events[2:4]) == [SendPage(events[2:4], 0, 2), ReadPage(4, 2)]
    assert sub.on_page(events[4:]) == [SendPage(events[4:], 0, 1), SendCaughtUp(5)]
    assert phase_of(sub) == "live"
    sixth = event(6)
    assert sub.on_live(sixth) == [Send(sixth)]
    assert sub.delivered_seq == 6


def test_state_only_client_gets_no_replayed_events() -> None:
    events = history(4)
    sub = Subscription(JOB, None)
    sub.start()
    assert sub.on_snapshot(state_of(events)) == [
        SendStatusSync(state_of(events), 4),
        ReadPage(4, 500),
    ]
    assert sub.on_page([]) == [SendCaughtUp(4)]


def test_client_from_the_future_is_resynced_to_the_snapshot() -> None:
    events = history(3)
    sub = Subscription(JOB, 10, page_size=5)
    sub.start()
    actions = sub.on_snapshot(state_of(events))
    assert actions == [SendStatusSync(state_of(events), 3), ReadPage(3, 5)]
    assert sub.delivered_seq == 3
    assert sub.on_page([]) == [SendCaughtUp(3)]
    assert sub.on_live(event(4)) == [Send(event(4))]


def test_job_without_state_gets_an_empty_sync_then_events_as_they_come() -> None:
    sub = Subscription(JOB, 0, page_size=3)
    sub.start()
    assert sub.on_snapshot(None) == [SendStatusSync(None, 0), ReadPage(0, 3)]
    assert sub.on_page([]) == [SendCaughtUp(0)]
    assert sub.on_live(event(1)) == [Send(event(1))]


def test_live_events_during_replay_are_dropped_not_buffered() -> None:
    events = history(4)
    sub = Subscription(JOB, 0, page_size=10)
    sub.start()
    sub.on_snapshot(state_of(events[:2]))
    assert sub.on_live(events[2]) == []
    assert sub.on_live(events[3]) == []
    # The page was read before 3 and 4 were committed: below the live mark, read again.
    assert sub.on_page(events[:2]) == [SendPage(events[:2], 0, 2), ReadPage(2, 10)]
    assert sub.on_page(events[2:]) == [SendPage(events[2:], 0, 2), SendCaughtUp(4)]


def test_live_event_already_replayed_is_dropped() -> None:
    events = history(3)
    sub = Subscription(JOB, 0)
    sub.start()
    sub.on_snapshot(state_of(events))
    sub.on_page(events)
    assert sub.on_live(events[2]) == []
    assert sub.on_live(events[0]) == []
    assert sent(sub.on_live(event(4))) == [4]


def test_gap_while_live_goes_back_to_replaying() -> None:
    events = history(6)
    sub = Subscription(JOB, 0, page_size=10)
    sub.start()
    sub.on_snapshot(state_of(events[:2]))
    sub.on_page(events[:2])
    assert sub.on_live(events[4]) == [ReadPage(2, 10)]
    assert phase_of(sub) == "replaying"
    assert sub.on_live(events[5]) == []
    assert sent(sub.on_page(events[2:])) == [3, 4, 5, 6]
    assert phase_of(sub) == "live"


def test_pages_overlapping_what_was_sent_send_nothing_twice() -> None:
    events = history(5)
    sub = Subscription(JOB, 0, page_size=3)
    sub.start()
    sub.on_snapshot(state_of(events))
    assert sent(sub.on_page(events[:3])) == [1, 2, 3]
    assert sent(sub.on_page(events[1:4])) == [4]


def test_caught_up_is_sent_once_per_switch_to_live() -> None:
    events = history(4)
    sub = Subscription(JOB, 0, page_size=10)
    sub.start()
    sub.on_snapshot(state_of(events[:1]))
    assert sub.on_page(events[:1])[-1] == SendCaughtUp(1)
    assert not any(isinstance(a, SendCaughtUp) for a in sub.on_live(events[1]))
    sub.on_live(events[3])
    assert sub.on_page(events[2:]) == [SendPage(events[2:], 0, 2), SendCaughtUp(4)]


@pytest.mark.parametrize("outcome", [Failed(code="boom"), Cancelled()])
def test_stream_ends_after_failure_or_cancellation(outcome: EventData) -> None:
    events = history(3, outcome)
    sub = Subscription(JOB, 1)
    sub.start()
    sub.on_snapshot(state_of(events))
    assert sub.on_page(events[1:]) == [
        SendPage(events[1:], 0, 2),
        SendCaughtUp(3),
        SendEndOfStream(3),
    ]
    assert phase_of(sub) == "ended"
    assert sub.on_live(event(3, outcome)) == []

    live = Subscription(JOB, 2)
    live.start()
    live.on_snapshot(state_of(events[:2]))
    live.on_page([])
    assert live.on_live(events[2]) == [Send(events[2]), SendEndOfStream(3)]


def test_terminal_snapshot_already_delivered_ends_at_once() -> None:
    events = history(3, Failed(code="boom"))
    sub = Subscription(JOB, None)
    sub.start()
    assert sub.on_snapshot(state_of(events)) == [
        SendStatusSync(state_of(events), 3),
        SendCaughtUp(3),
        SendEndOfStream(3),
    ]


def test_completion_does_not_end_the_stream_download_events_follow() -> None:
    events = history(2)
    events.append(event(3, Completed(archive=ARCHIVE)))
    sub = Subscription(JOB, None)
    sub.start()
    sub.on_snapshot(state_of(events))
    assert sub.on_page([]) == [SendCaughtUp(3)]
    started = event(4, DownloadStarted(download_id="d", total_bytes=1))
    done = event(5, DownloadProgress(download_id="d", bytes_sent=1, total_bytes=1, progress=100))
    assert sub.on_live(started) == [Send(started)]
    assert sub.on_live(done) == [Send(done)]
    assert phase_of(sub) == "live"


def test_misuse_is_refused() -> None:
    sub = Subscription(JOB, 0)
    with pytest.raises(SubscriptionError):
        sub.on_snapshot(None)
    sub.start()
    with pytest.raises(SubscriptionError):
        sub.start()
    with pytest.raises(SubscriptionError):
        sub.on_page([])
    sub.on_snapshot(None)
    with pytest.raises(SubscriptionError):
        sub.on_live(event(1, job_id=uuid.UUID(int=2)))
    with pytest.raises(SubscriptionError):
        sub.on_page([event(2)])
    with pytest.raises(ValueError, match="page_size"):
        Subscription(JOB, 0, page_size=0)


# The property: any interleaving of commits, live deliveries and late page answers.


def outcome_history(n: int, ending: str, completed_at: int) -> list[Event]:
    events = history(n)
    if n == 0:
        return events
    if ending in ("failed", "cancelled"):
        events[-1] = event(n, Failed(code="x") if ending == "failed" else Cancelled())
    elif ending == "completed":
        at = min(max(completed_at, 1), n)
        events[at - 1] = event(at, Completed(archive=ARCHIVE))
        for seq in range(at + 1, n + 1):
            events[seq - 1] = event(
                seq, DownloadProgress(download_id="d", bytes_sent=seq, total_bytes=n, progress=50)
            )
    return events


@dataclass
class World:
    """The log, the tailer and a pump that reads when asked and answers whenever it likes."""

    events: list[Event]
    sub: Subscription
    committed: int
    tailer: list[Event] = field(default_factory=list)  # committed, not yet delivered live
    last_live: Event | None = None
    snapshot_asked: bool = False
    snapshot_done: bool = False
    read_asked: ReadPage | None = None
    page_read: list[Event] | None = None
    out: list[tuple[str, Action]] = field(default_factory=list)
    outstanding: int = 0
    max_outstanding: int = 0

    def take(self, source: str, actions: list[Action]) -> None:
        for action in actions:
            self.out.append((source, action))
            if isinstance(action, ReadSnapshot):
                self.snapshot_asked = True
            elif isinstance(action, ReadPage):
                assert self.read_asked is None
                assert self.page_read is None
                self.read_asked = action
                self.outstanding += 1
                self.max_outstanding = max(self.max_outstanding, self.outstanding)

    def moves(self, duplicates_left: int) -> list[str]:
        moves = []
        if self.committed < len(self.events):
            moves.append("commit")
        if self.tailer:
            moves.append("live")
        if self.last_live is not None and duplicates_left > 0:
            moves.append("duplicate")
        if self.read_asked is not None:
            moves.append("read-page")
        if self.page_read is not None:
            moves.append("answer-page")
        return moves


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_interleaving_delivers_every_event_once_in_order(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 60), label="n")
    ending = data.draw(st.sampled_from(["open", "failed", "cancelled", "completed"]))
    events = outcome_history(n, ending, data.draw(st.integers(1, 60)))
    after_seq = data.draw(st.none() | st.integers(0, n), label="after_seq")
    page_size = data.draw(st.integers(1, 10), label="page_size")
    # Events committed before the subscription registered with the tailer never come live.
    committed = data.draw(st.integers(0, n), label="committed before")
    world = World(events, Subscription(JOB, after_seq, page_size=page_size), committed)
    sub = world.sub
    world.take("start", sub.start())
    duplicates = data.draw(st.integers(0, 10))
    snapshot_state: JobState | None = None
    snapshot_taken = False

    for _ in range(10_000):
        moves = world.moves(duplicates)
        if not snapshot_taken and world.snapshot_asked:
            moves.append("read-snapshot")
        if snapshot_taken and not world.snapshot_done:
            moves.append("answer-snapshot")
        if not moves:
            break
        move = data.draw(st.sampled_from(moves))
        if move == "commit":
            world.tailer.append(events[world.committed])
            world.committed += 1
        elif move == "live":
            world.last_live = world.tailer.pop(0)
            world.take("live", sub.on_live(world.last_live))
        elif move == "duplicate":
            duplicates -= 1
            assert world.last_live is not None
            world.take("live", sub.on_live(world.last_live))
        elif move == "read-snapshot":
            snapshot_state = replay(events[: world.committed])
            snapshot_taken = True
            world.snapshot_asked = False
        elif move == "answer-snapshot":
            world.snapshot_done = True
            world.take("snapshot", sub.on_snapshot(snapshot_state))
        elif move == "read-page":
            request = world.read_asked
            assert request is not None
            world.read_asked = None
            visible = events[: world.committed]
            world.page_read = visible[request.after_seq : request.after_seq + request.limit]
        elif move == "answer-page":
            page = world.page_read
            assert page is not None
            world.page_read = None
            world.outstanding -= 1
            world.take("page", sub.on_page(page))
    else:
        pytest.fail("the machine did not settle")

    actions = [action for _, action in world.out]
    assert actions[0] == ReadSnapshot()
    assert isinstance(actions[1], SendStatusSync)
    sync = actions[1]
    assert sync.state == snapshot_state
    assert not any(isinstance(a, SendStatusSync) for a in actions[2:])
    start = sync.seq if after_seq is None or after_seq > sync.seq else after_seq
    assert sent(actions) == list(range(start + 1, n + 1))
    assert sub.delivered_seq == n
    assert world.max_outstanding <= 1

    caught_up = False
    for source, action in world.out:
        if isinstance(action, SendCaughtUp):
            caught_up = True
        if isinstance(action, (Send, SendPage)) and source == "live":
            assert caught_up, "a live event was sent before caught-up"

    ends = [a for a in actions if isinstance(a, SendEndOfStream)]
    if ending in ("failed", "cancelled") and n > 0:
        assert ends == [SendEndOfStream(n)]
        assert actions[-2:] == [SendCaughtUp(n), SendEndOfStream(n)] or (
            isinstance(actions[-2], Send) and actions[-1] == SendEndOfStream(n)
        )
        assert phase_of(sub) == "ended"
    else:
        assert ends == []
        assert phase_of(sub) == "live"
        assert isinstance(actions[-1], (SendCaughtUp, Send))
