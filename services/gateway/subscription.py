"""One client's subscription to one job's stream: the replay→live hand-over, with no socket in it.

The gateway holds one `Subscription` per client per job and pumps it: every input (the snapshot,
a replay page, a live event from the tailer) goes in through a method, and the actions to carry
out come back as a list. The pump reads what it is asked to read and sends what it is asked to
send, in order; the machine never awaits and never touches the database or the socket.

The protocol a client sees (guarantee 6, lossless reconnect):

    status-sync(state, seq)  the authoritative state, first on every (re)connect
    event ...                every event after the client's seq, in seq order, no gap, no duplicate
    caught-up(seq)           the replay round is over; what follows is live
    event ...                live events, still contiguous in seq
    end-of-stream(seq)       only after `export:failed` or `export:cancelled`

End of stream is sent after a failed or cancelled outcome only, never after `export:completed`:
the log still accepts the download phase (`POST_COMPLETION_TYPES`) after a completion, and a
stream that ended there would make a client miss those events. Nothing can follow a failure or a
cancellation, so ending there loses nothing. A completed job's stream stays live until the client
or the gateway closes it.

Live events are never buffered (guarantee 7). While replaying, a live event is dropped and only
its seq is remembered, as a high-water mark: a page that ends the round below that mark was read
before the event was committed, so another page is read instead of going live. A live event past
the next expected seq means the tailer skipped something: the machine goes back to replaying from
what it has delivered. The pump must register the subscription with the tailer before `start()`,
so that every event is either in a page or arrives live afterwards.

`StreamSubscription` is the same hand-over for a stream of many jobs (a project, the whole log),
resumed by log position instead of seq. Positions have gaps (other projects, rolled-back
appends), so the machine cannot see a gap; it relies on the tailer, which never skips a position
because positions are handed out in commit order (guarantee 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias
from uuid import UUID

from schemas.events import Cancelled, Event, Failed
from schemas.state import JobState

SubscriptionPhase: TypeAlias = Literal["snapshot", "replaying", "live", "ended"]

END_TYPES: frozenset[str] = frozenset({Failed.TYPE, Cancelled.TYPE})
"""Outcomes after which the log accepts nothing more: the stream ends after them."""

END_STATUSES: frozenset[str] = frozenset({"failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class ReadSnapshot:
    """Read the job's current state (None when the job has no event yet)."""


@dataclass(frozen=True, slots=True)
class SendStatusSync:
    """Send the authoritative state, as of `seq`."""

    state: JobState | None
    seq: int


@dataclass(frozen=True, slots=True)
class ReadPage:
    """Read at most `limit` events of the job with a seq above `after_seq`, then call `on_page`."""

    after_seq: int
    limit: int


@dataclass(frozen=True, slots=True)
class Send:
    """Send one (live) event to the client."""

    event: Event


@dataclass(frozen=True, slots=True)
class SendPage:
    """Send `page[start:stop]`, the new events of the replay page just fed to `on_page`, in
    order (the pump sends them as one frame). One action per page, not one per event: a storm of
    reconnecting clients replays thousands of pages."""

    page: Sequence[Event]
    start: int
    stop: int

    @property
    def events(self) -> Sequence[Event]:
        return self.page[self.start : self.stop]


@dataclass(frozen=True, slots=True)
class SendCaughtUp:
    """Every event up to `seq` has been sent; what follows is live."""

    seq: int


@dataclass(frozen=True, slots=True)
class SendEndOfStream:
    """The job failed or was cancelled at `seq` and everything up to it has been sent."""

    seq: int


@dataclass(frozen=True, slots=True)
class SendStreamSync:
    """Send the stream's state as of log position `position` (the head when it was read)."""

    position: int


@dataclass(frozen=True, slots=True)
class ReadStreamPage:
    """Read at most `limit` of the stream's events above log position `after_position`, in
    position order, then call `on_page`."""

    after_position: int
    limit: int


@dataclass(frozen=True, slots=True)
class SendStreamCaughtUp:
    """Every event of the stream up to log position `position` has been sent."""

    position: int


Action: TypeAlias = (
    ReadSnapshot
    | SendStatusSync
    | ReadPage
    | Send
    | SendPage
    | SendCaughtUp
    | SendEndOfStream
    | SendStreamSync
    | ReadStreamPage
    | SendStreamCaughtUp
)


class SubscriptionError(Exception):
    """The pump fed the machine something it cannot have asked for."""


class Subscription:
    """The state machine of one client's subscription to one job's events."""

    __slots__ = (
        "_delivered",
        "_live_high",
        "_pending_limit",
        "_phase",
        "_started",
        "after_seq",
        "job_id",
        "page_size",
    )

    def __init__(self, job_id: UUID, after_seq: int | None, *, page_size: int = 500) -> None:
        """`after_seq` is the last seq the client saw; None asks for the state only, then live."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.job_id = job_id
        self.after_seq = after_seq
        self.page_size = page_size
        self._phase: SubscriptionPhase = "snapshot"
        self._started = False
        self._delivered = max(after_seq or 0, 0)
        self._pending_limit: int | None = None  # the limit of the one outstanding ReadPage
        self._live_high = 0  # highest live seq seen: a mark, not a buffer

    @property
    def delivered_seq(self) -> int:
        """The seq of the last event sent (or the state's seq the client was synced to)."""
        return self._delivered

    @property
    def phase(self) -> SubscriptionPhase:
        return self._phase

    @property
    def reading(self) -> bool:
        """Whether a ReadPage is outstanding (there is never more than one)."""
        return self._pending_limit is not None

    def start(self) -> list[Action]:
        """The first actions: read the snapshot."""
        if self._started:
            raise SubscriptionError("subscription already started")
        self._started = True
        return [ReadSnapshot()]

    def on_snapshot(self, state: JobState | None) -> list[Action]:
        """The job's state as read: sync the client to it, then replay what it has not seen."""
        if not self._started or self._phase != "snapshot":
            raise SubscriptionError("snapshot not asked for")
        if state is not None and state.job_id != self.job_id:
            raise SubscriptionError(f"snapshot of job {state.job_id}, not {self.job_id}")
        snapshot_seq = state.seq if state is not None else 0
        if self.after_seq is None or self.after_seq >= snapshot_seq:
            # State only, or a client from the future (a reset log): resync it to the snapshot.
            self._delivered = snapshot_seq
        else:
            self._delivered = max(self.after_seq, 0)
        actions: list[Action] = [SendStatusSync(state, snapshot_seq)]
        if state is not None and state.status in END_STATUSES and self._delivered == snapshot_seq:
            return actions + self._end()
        # Even a client synced to the snapshot gets one read: events committed between the
        # snapshot and the tailer's first delivery would otherwise be missed.
        return actions + self._replay()

    def on_page(self, events: Sequence[Event]) -> list[Action]:
        """A replay page the pump read for the outstanding ReadPage."""
        limit = self._pending_limit
        if limit is None:
            raise SubscriptionError("page not asked for")
        self._pending_limit = None
        if self._phase == "ended":
            return []
        actions: list[Action] = []
        start = -1
        for i, event in enumerate(events):
            self._check_job(event)
            if event.seq <= self._delivered:
                continue
            if event.seq != self._delivered + 1:
                raise SubscriptionError(
                    f"page skips from seq {self._delivered} to {event.seq}: the log has no gaps"
                )
            if start < 0:
                start = i
            self._delivered = event.seq
            if event.type in END_TYPES:
                return [SendPage(events, start, i + 1), *self._end()]
        if start >= 0:
            actions.append(SendPage(events, start, len(events)))
        if len(events) >= limit or self._live_high > self._delivered:
            # A full page may have more behind it; a short one below the live mark was read
            # before the events the tailer has already seen were committed.
            return actions + self._replay()
        self._phase = "live"
        actions.append(SendCaughtUp(self._delivered))
        return actions

    def on_live(self, event: Event) -> list[Action]:
        """A live event of this job from the tailer."""
        self._check_job(event)
        if self._phase == "ended":
            return []
        self._live_high = max(self._live_high, event.seq)
        if self._phase != "live" or event.seq <= self._delivered:
            # Not buffered: the replay reads it, or it was already sent.
            return []
        if event.seq != self._delivered + 1:
            # The tailer skipped something (or this client fell behind): never skip, read it.
            return self._replay()
        self._delivered = event.seq
        actions: list[Action] = [Send(event)]
        if event.type in END_TYPES:
            actions.append(SendEndOfStream(event.seq))
            self._phase = "ended"
        return actions

    def _replay(self) -> list[Action]:
        self._phase = "replaying"
        self._pending_limit = self.page_size
        return [ReadPage(self._delivered, self.page_size)]

    def _end(self) -> list[Action]:
        # Reached from the snapshot or a replay page: caught-up first, so every stream has one.
        self._phase = "ended"
        return [SendCaughtUp(self._delivered), SendEndOfStream(self._delivered)]

    def _check_job(self, event: Event) -> None:
        if event.job_id != self.job_id:
            raise SubscriptionError(f"event of job {event.job_id}, not {self.job_id}")


class StreamSubscription:
    """The state machine of one client's subscription to a stream of many jobs' events.

    The pump feeds it only the events of its stream (a project's, or all). The snapshot is the
    log's head position `H` as read with the stream's state; every event at or below `H` was
    committed before that read, so a short page read afterwards covers all of them and the
    cursor can move to `H` even when the stream's last event is far below it."""

    __slots__ = (
        "_delivered",
        "_head",
        "_live_high",
        "_pending_limit",
        "_phase",
        "_started",
        "after_position",
        "page_size",
    )

    def __init__(self, after_position: int | None, *, page_size: int = 500) -> None:
        """`after_position` is the client's cursor; None asks for the state only, then live."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.after_position = after_position
        self.page_size = page_size
        self._phase: SubscriptionPhase = "snapshot"
        self._started = False
        self._delivered = max(after_position or 0, 0)
        self._head = 0
        self._pending_limit: int | None = None
        self._live_high = 0

    @property
    def delivered_position(self) -> int:
        """The client's cursor: everything of the stream up to it has been sent."""
        return self._delivered

    @property
    def phase(self) -> SubscriptionPhase:
        return self._phase

    @property
    def reading(self) -> bool:
        return self._pending_limit is not None

    def start(self) -> list[Action]:
        if self._started:
            raise SubscriptionError("subscription already started")
        self._started = True
        return [ReadSnapshot()]

    def on_snapshot(self, head: int) -> list[Action]:
        """The stream's state was read when the log's head was at `head`."""
        if not self._started or self._phase != "snapshot":
            raise SubscriptionError("snapshot not asked for")
        if head < 0:
            raise SubscriptionError("a log position cannot be negative")
        self._head = head
        if self.after_position is None or self.after_position >= head:
            # State only, or a cursor from the future (a reset log): resync to the head.
            self._delivered = head
        actions: list[Action] = [SendStreamSync(head)]
        return actions + self._replay()

    def on_page(self, events: Sequence[Event]) -> list[Action]:
        """A replay page the pump read for the outstanding ReadStreamPage."""
        limit = self._pending_limit
        if limit is None:
            raise SubscriptionError("page not asked for")
        self._pending_limit = None
        actions: list[Action] = []
        previous = -1
        start = -1
        for i, event in enumerate(events):
            if event.position <= previous:
                raise SubscriptionError("a page must be in position order")
            previous = event.position
            if event.position <= self._delivered:
                continue
            if start < 0:
                start = i
            self._delivered = event.position
        if start >= 0:
            actions.append(SendPage(events, start, len(events)))
        if len(events) >= limit or self._live_high > self._delivered:
            return actions + self._replay()
        # A short page read after the snapshot holds every event up to the snapshot's head.
        self._delivered = max(self._delivered, self._head)
        self._phase = "live"
        actions.append(SendStreamCaughtUp(self._delivered))
        return actions

    def on_live(self, event: Event) -> list[Action]:
        """A live event of this stream from the tailer, in position order."""
        self._live_high = max(self._live_high, event.position)
        if self._phase != "live" or event.position <= self._delivered:
            return []
        self._delivered = event.position
        return [Send(event)]

    def _replay(self) -> list[Action]:
        self._phase = "replaying"
        self._pending_limit = self.page_size
        return [ReadStreamPage(self._delivered, self.page_size)]
