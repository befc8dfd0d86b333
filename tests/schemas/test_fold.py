"""Properties of the fold: total, monotonic, terminal states absorb, resumable from a snapshot."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import (
    EVENT_TYPES,
    POST_COMPLETION_TYPES,
    PROCESSING_SHARE,
    ArchiveInfo,
    Cancelled,
    CancelRequested,
    Completed,
    DownloadCompleted,
    DownloadProgress,
    DownloadStarted,
    Event,
    EventData,
    Failed,
    PhaseChanged,
    Progress,
    Queued,
    Started,
)
from schemas.state import JobState, fold, initial_state, replay
from tests.schemas.strategies import (
    JOB_ID,
    PROJECT_ID,
    WILD_PAYLOADS,
    History,
    event,
    random_events,
    random_histories,
    typed,
    valid_histories,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def states_along(events: list[Event]) -> list[JobState]:
    """The state before the first event and after each one."""
    state = initial_state(JOB_ID, PROJECT_ID)
    states = [state]
    for e in events:
        state = fold(state, e)
        states.append(state)
    return states


def only_clock_moved(before: JobState, after: JobState, e: Event) -> bool:
    return after == msgspec.structs.replace(before, seq=e.seq, updated_at=e.occurred_at)


def check_step(before: JobState, e: Event, after: JobState) -> None:
    """(c), (d), (e): what any single fold step may and may not change."""
    if e.seq <= before.seq:
        assert after is before or after == before, "a duplicate or stale seq changed the state"
        return
    if e.type not in EVENT_TYPES:
        assert only_clock_moved(before, after, e), f"unknown type {e.type!r} changed the state"
    if before.status != "completed" and e.type in POST_COMPLETION_TYPES:
        # The log refuses the download phase before completion; the fold ignores it too.
        assert only_clock_moved(before, after, e), f"{e.type} changed a {before.status} job"
    if before.status in ("failed", "cancelled"):
        assert only_clock_moved(before, after, e), f"{e.type} changed a {before.status} job"
    elif before.status == "completed" and e.type not in POST_COMPLETION_TYPES:
        assert only_clock_moved(before, after, e), f"{e.type} changed a completed job"


def check_monotonic(before: JobState, after: JobState) -> None:
    """(b): progress never moves back; the phase only moves forward."""
    assert 0.0 <= after.progress <= 100.0
    assert 0.0 <= after.phase_progress <= 100.0
    assert after.progress >= before.progress
    if after.phase == before.phase:
        assert after.phase_progress >= before.phase_progress
    assert not (before.phase == "downloading" and after.phase == "processing")


def check_resumable(events: list[Event], final: JobState | None, cut: int) -> None:
    """(f): replay equals folding one by one, and resumes from a snapshot taken anywhere."""
    assert replay(events) == final
    snapshot = replay(events[:cut])
    assert replay(events[cut:], snapshot) == final
    if snapshot is not None:
        # A snapshot that went over the wire (status-sync, the jobs projection) resumes as well.
        wire = msgspec.json.decode(msgspec.json.encode(snapshot), type=JobState)
        assert replay(events[cut:], wire) == final


def check_status(history: History, state: JobState) -> None:
    """(g): the status follows the outcome event, or the job is still in flight."""
    if history.outcome is not None:
        expected = {Completed.TYPE: "completed", Failed.TYPE: "failed", Cancelled.TYPE: "cancelled"}
        assert state.status == expected[history.outcome]
        assert state.finished_at is not None
    elif history.cancel_requested:
        assert state.status == "cancelling"
    elif history.started:
        assert state.status == "running"
    else:
        assert state.status == "queued"
    if history.outcome == Completed.TYPE:
        assert state.progress >= PROCESSING_SHARE
        assert state.archive is not None
    if history.outcome == Failed.TYPE:
        assert state.failure is not None
    if history.outcome == Cancelled.TYPE:
        assert state.cancellation is not None
        assert (state.cancellation.requested_by is not None) == history.cancel_requested


@SETTINGS
@given(valid_histories(), st.data())
def test_a_valid_history(history: History, data: st.DataObject) -> None:
    """(a) to (g) along every history the export service could write."""
    events = history.events
    states = states_along(events)  # (a): never raises
    for e, (before, after) in zip(events, itertools.pairwise(states), strict=True):
        check_monotonic(before, after)  # (b)
        check_step(before, e, after)  # (c), (e)
    final = states[-1]
    assert final.seq == len(events)
    # (e): the same events delivered again (a replay overlapping the live stream) change nothing.
    again = data.draw(st.lists(st.sampled_from(events), max_size=3))
    assert replay(again, final) == final
    check_resumable(events, final, data.draw(st.integers(0, len(events))))  # (f)
    check_status(history, final)  # (g)


@SETTINGS
@given(random_histories(), st.data())
def test_any_history(events: list[Event], data: st.DataObject) -> None:
    """(a) to (f) whatever arrives: any type, any order, duplicates, unknown and junk payloads."""
    states = states_along(events)  # (a): never raises
    for e, (before, after) in zip(events, itertools.pairwise(states), strict=True):
        check_monotonic(before, after)  # (b)
        check_step(before, e, after)  # (c), (d), (e)
    assert (replay(events) is None) == (not events)
    if events:
        check_resumable(events, states[-1], data.draw(st.integers(0, len(events))))  # (f)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([Completed.TYPE, Failed.TYPE, Cancelled.TYPE]).flatmap(
        lambda outcome: valid_histories(outcome=outcome)
    ),
    st.lists(random_events(st.integers(-2, 5)), min_size=1, max_size=12),
)
def test_a_terminal_state_absorbs_everything_but_the_download_phase(
    history: History, tail: list[Event]
) -> None:
    """(c): after the outcome only the download phase moves, and only after `completed`."""
    final = replay(history.events)
    assert final is not None
    assert final.is_terminal
    state = final
    for e in tail:
        e = msgspec.structs.replace(e, seq=state.seq + e.seq)
        after = fold(state, e)
        check_step(state, e, after)
        check_monotonic(state, after)
        # Whatever happens, the outcome itself never changes.
        assert after.status == final.status
        assert after.failure == final.failure
        assert after.cancellation == final.cancellation
        assert after.finished_at == final.finished_at
        assert after.archive == final.archive
        state = after


LATE_REPORTS = st.lists(
    st.one_of(
        *(
            WILD_PAYLOADS[cls]
            for cls in (
                PhaseChanged,
                Progress,
                Completed,
                DownloadStarted,
                DownloadProgress,
                DownloadCompleted,
            )
        )
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_histories(), LATE_REPORTS)
def test_late_and_wild_reports_never_move_progress_or_phase_back(
    history: History, reports: list[EventData]
) -> None:
    """(b) beyond valid histories: stray phase changes (back to processing too), progress from
    the wrong phase, out-of-range and NaN values, at whatever point the job has reached."""
    state = replay(history.events)
    assert state is not None
    for seq, payload in enumerate(reports, state.seq + 1):
        after = fold(state, typed(seq, payload))
        check_monotonic(state, after)
        state = after


def test_fold_is_total_on_a_raw_payload_that_is_not_json() -> None:
    """(a) A `msgspec.Raw` payload of a known type that is not JSON at all (truncated, or read
    from somewhere other than the `json` column) is skipped, not raised: `msgspec.DecodeError`,
    not only its subclass `ValidationError`, must be absorbed."""
    state = fold(None, typed(1, Queued()))
    for junk in (b"", b"{", b'{"phase": "processing", ', b"nope"):
        e = event(2, Progress.TYPE, msgspec.Raw(junk))
        assert only_clock_moved(state, fold(state, e), e), junk


# --- the seeds' scenarios ------------------------------------------------------------------------


def run(*payloads: EventData) -> JobState:
    state = replay(typed(seq, p) for seq, p in enumerate(payloads, 1))
    assert state is not None
    return state


def test_cancel_requested_then_completed_is_completed() -> None:
    """seeds/002: the cancel lost the race; the first outcome in the log wins."""
    state = run(
        Queued(requested_by="user:ada"),
        Started(worker_id="w1"),
        Progress(phase="processing", progress=80.0, phase_progress=88.0),
        CancelRequested(requested_by="user:ada"),
        Completed(archive=_archive()),
        Cancelled(cancelled_by="user", progress=80.0),
    )
    assert state.status == "completed"
    assert state.cancellation is None
    assert state.archive == _archive()
    assert state.seq == 6


def test_cancel_requested_then_cancelled_records_who_asked() -> None:
    state = run(
        Queued(requested_by="user:ada"),
        Started(worker_id="w1"),
        Progress(phase="processing", progress=35.0, phase_progress=38.0),
        CancelRequested(requested_by="user:bo", reason="wrong project"),
        Progress(phase="processing", progress=36.0, phase_progress=40.0),
        Cancelled(cancelled_by="user", progress=36.0, cleanup_completed=True),
        Completed(archive=_archive()),
    )
    assert state.status == "cancelled"
    assert state.cancellation is not None
    assert state.cancellation.requested_by == "user:bo"
    assert state.cancellation.cancelled_by == "user"
    assert state.cancellation.cleanup_completed is True
    assert state.archive is None
    assert state.progress == 36.0


def test_a_late_lower_progress_report_does_not_pull_the_bar_back() -> None:
    state = run(
        Queued(),
        Started(),
        Progress(phase="processing", progress=40.0, phase_progress=44.0),
        Progress(phase="processing", progress=30.0, phase_progress=33.0),
    )
    assert state.progress == 40.0
    assert state.phase_progress == 44.0


def test_out_of_range_progress_is_clamped() -> None:
    state = run(
        Queued(),
        Started(),
        Progress(phase="processing", progress=-5.0, phase_progress=-1.0),
    )
    assert (state.progress, state.phase_progress) == (0.0, 0.0)
    state = run(
        Queued(),
        Started(),
        Progress(phase="processing", progress=250.0, phase_progress=1e300),
    )
    assert (state.progress, state.phase_progress) == (100.0, 100.0)


def test_the_download_phase_follows_completion() -> None:
    state = run(
        Queued(),
        Started(),
        Progress(phase="processing", progress=60.0, phase_progress=66.0),
        Completed(archive=_archive()),
    )
    assert (state.phase, state.progress, state.phase_progress) == ("processing", 90.0, 100.0)
    resumed = replay(
        [
            typed(5, DownloadStarted(download_id="d1", total_bytes=1000)),
            typed(
                6,
                DownloadProgress(
                    download_id="d1",
                    bytes_sent=500,
                    total_bytes=1000,
                    progress=95.0,
                    phase_progress=50.0,
                ),
            ),
            # Not something the log accepts after completion; the fold absorbs it all the same.
            typed(7, PhaseChanged(from_phase="downloading", to_phase="processing", progress=0.0)),
        ],
        state,
    )
    assert resumed is not None
    state = resumed
    assert (state.status, state.phase) == ("completed", "downloading")
    assert (state.progress, state.phase_progress) == (95.0, 50.0)
    state = fold(state, typed(8, DownloadCompleted(download_id="d1", bytes_sent=1000)))
    assert (state.progress, state.phase_progress, state.downloads_completed) == (100.0, 100.0, 1)
    assert state.download is not None
    assert state.download.total_bytes == 1000
    assert state.download.completed


def test_nothing_follows_a_failure() -> None:
    state = run(
        Queued(),
        Started(),
        Failed(code="storage_full", stage="compression", retryable=True),
        Started(attempt=2),
        Progress(phase="processing", progress=50.0, phase_progress=50.0),
        Completed(archive=_archive()),
    )
    assert state.status == "failed"
    assert state.failure is not None
    assert (state.failure.code, state.failure.retryable) == ("storage_full", True)
    assert state.progress == 0.0


@pytest.mark.parametrize("seq", [0, -1])
def test_a_first_event_at_or_below_zero_is_ignored(seq: int) -> None:
    state = fold(None, typed(seq, Queued()))
    assert state == initial_state(JOB_ID, PROJECT_ID)


def _archive() -> ArchiveInfo:
    return ArchiveInfo(file_name="export.zip", size_bytes=1234, sha256="ab" * 32)
