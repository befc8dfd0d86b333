"""The progress core: throttling, heartbeats, weighting, the final flush and the ETA.

Schedules are synthetic: time is a number the test advances, so the rules are checked exactly
and nothing here sleeps. The property tests replay random schedules (bursts, long pauses,
reports that go backwards, ticks at uneven times) and check the rules after every single call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import PROCESSING_SHARE, DownloadProgress, Progress, Stage
from schemas.messages import render
from services.export.progress import STAGE_ORDER, DownloadTracker, ProgressTracker

MIN_INTERVAL = 0.25
HEARTBEAT = 2.0
MIN_STEP = 1.0
TICK_AT_MOST = 0.1
# Payloads carry two decimals; the rules act on the exact value.
ROUNDING = 0.01

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Kind = Literal["update", "tick", "flush"]


@dataclass(frozen=True)
class Emitted:
    at: float
    kind: Kind
    payload: Progress | DownloadProgress


@dataclass
class Rules:
    """Checks the throttling rules after each call, against the test's own model of the job."""

    emitted: list[Emitted] = field(default_factory=list)

    def after(
        self,
        kind: Kind,
        now: float,
        payload: Progress | DownloadProgress | None,
        *,
        level: float,
        marker: object,
        ongoing: bool,
    ) -> None:
        if payload is not None:
            self.emitted.append(Emitted(now, kind, payload))
        if not self.emitted:
            return
        last = self.emitted[-1]
        elapsed = now - last.at
        if elapsed < MIN_INTERVAL:
            return
        # The interval has passed, so anything the rules call news must be out already.
        assert level - last.payload.phase_progress < MIN_STEP + ROUNDING, (now, level, last)
        assert marker == getattr(last.payload, "stage", None), (now, marker, last)
        if ongoing:
            assert elapsed < HEARTBEAT, (now, last)
        else:  # finishing is news however small the last step
            assert level - last.payload.phase_progress < ROUNDING, (now, level, last)

    def check_sequence(self) -> None:
        """What holds over the whole run: never backwards, spaced out, no long silences."""
        for before, after in zip(self.emitted, self.emitted[1:], strict=False):
            assert after.payload.progress >= before.payload.progress
            assert after.payload.phase_progress >= before.payload.phase_progress
            if after.kind != "flush":
                assert after.at - before.at >= MIN_INTERVAL
            if before.payload.phase_progress < 100.0:
                assert after.at - before.at <= HEARTBEAT + MIN_INTERVAL


# -- processing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    gap: float
    """Seconds since the previous report."""
    stage: Stage
    current: int
    total: int
    item: str | None


@dataclass(frozen=True)
class Schedule:
    weights: dict[Stage, float]
    reports: list[Report]
    tick_every: float


# Items come in bursts (cached), at an ordinary pace, or after a long pause (a big file).
GAPS = st.one_of(st.floats(0.0, 0.01), st.floats(0.01, 0.6), st.floats(2.0, 6.0))


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    chosen = draw(st.sets(st.sampled_from(STAGE_ORDER), min_size=1))
    stages = [stage for stage in STAGE_ORDER if stage in chosen]
    # Some stages may be left out of the weights: they cost nothing but still report.
    weighted = draw(st.sets(st.sampled_from(stages), min_size=1))
    weights = {stage: draw(st.floats(0.05, 10.0)) for stage in stages if stage in weighted}
    reports = []
    for stage in stages:
        total = draw(st.integers(0, 15))
        for current in range(total + 1):
            if current and draw(st.integers(0, 9)) == 0:  # a retried item: a report going back
                again = draw(st.integers(0, current - 1))
                reports.append(Report(draw(GAPS), stage, again, total, f"retry_{again}"))
            item = f"{stage}_{current:04d}.png" if current < total else None
            reports.append(Report(draw(GAPS), stage, current, total, item))
    return Schedule(weights, reports, draw(st.floats(0.02, TICK_AT_MOST)))


def model_fraction(weights: dict[Stage, float], stage: Stage, current: int, total: int) -> float:
    """The weighted fraction done, computed the slow and obvious way."""
    costs = [weights.get(s, 0.0) for s in STAGE_ORDER]
    index = STAGE_ORDER.index(stage)
    done = 1.0 if total <= 0 else min(1.0, max(0.0, current / total))
    return (sum(costs[:index]) + costs[index] * done) / sum(costs)


def run_processing(schedule: Schedule) -> tuple[ProgressTracker, Rules, float]:
    """Replay a schedule with ticks in between; check the rules after every call."""
    tracker = ProgressTracker(schedule.weights)
    rules = Rules()
    now = 0.0
    fraction = 0.0
    stage: Stage | None = None

    def after(kind: Kind, payload: Progress | None) -> None:
        rules.after(
            kind, now, payload, level=100.0 * fraction, marker=stage, ongoing=fraction < 1.0 - 1e-9
        )

    for report in schedule.reports:
        target = now + report.gap
        while now + schedule.tick_every < target:
            now += schedule.tick_every
            after("tick", tracker.tick(now))
        now = target
        fraction = max(
            fraction, model_fraction(schedule.weights, report.stage, report.current, report.total)
        )
        stage = report.stage
        payload = tracker.update(report.stage, report.current, report.total, report.item, now)
        assert tracker.fraction == pytest.approx(fraction, abs=1e-9)
        after("update", payload)
    # A little later the worker wraps up: a last few ticks, then the flush before the outcome.
    for _ in range(3):
        now += schedule.tick_every
        after("tick", tracker.tick(now))
    after("flush", tracker.flush(now))
    return tracker, rules, now


@SETTINGS
@given(schedules())
def test_the_throttling_rules_hold_for_any_schedule(schedule: Schedule) -> None:
    _, rules, _ = run_processing(schedule)
    rules.check_sequence()
    for emitted in rules.emitted:
        payload = emitted.payload
        assert isinstance(payload, Progress)
        eta = payload.estimated_time_remaining
        assert eta is None or (math.isfinite(eta) and eta >= 0.0)
        assert payload.phase == "processing"
        assert payload.progress == pytest.approx(
            PROCESSING_SHARE * payload.phase_progress / 100.0, abs=ROUNDING
        )
        counts, text = payload.stage_progress, payload.message
        assert counts is not None
        assert text is not None
        suffix = "" if counts.current_item is not None else ".counts"
        assert text.key == f"export.stage.{payload.stage}{suffix}"
        assert text.text == render(text.key, text.params)


@SETTINGS
@given(schedules())
def test_the_end_is_reported_exactly_at_100_and_only_once(schedule: Schedule) -> None:
    tracker, rules, now = run_processing(schedule)
    last = rules.emitted[-1].payload
    assert last.phase_progress == 100.0
    assert last.progress == PROCESSING_SHARE
    assert tracker.flush(now + 1.0) is None
    assert tracker.tick(now + 10.0) is None  # no heartbeats once the work is done
    flushes = [e for e in rules.emitted if e.kind == "flush"]
    assert len(flushes) <= 1
    if flushes and len(rules.emitted) > 1:
        before, final = rules.emitted[-2].payload, rules.emitted[-1].payload
        assert isinstance(before, Progress)
        assert isinstance(final, Progress)
        snapshot = (final.stage, final.phase_progress, final.stage_progress)
        assert (before.stage, before.phase_progress, before.stage_progress) != snapshot


def test_the_first_report_is_emitted_at_once_with_its_message() -> None:
    tracker = ProgressTracker({"images": 0.2, "visualizations": 0.8})
    first = tracker.update("visualizations", 5, 50, "img_0005.png", 10.0)
    assert first is not None
    assert first.stage == "visualizations"
    assert first.phase_progress == 28.0  # images done (20) + 5/50 of visualizations (8)
    assert first.progress == pytest.approx(PROCESSING_SHARE * 0.28)
    assert first.stage_progress is not None
    assert first.stage_progress.current_item == "img_0005.png"
    assert first.message is not None
    assert first.message.text == "Rendering visualizations (5/50): img_0005.png"
    assert first.message.params == {"current": 5, "total": 50, "item": "img_0005.png"}
    assert first.estimated_time_remaining is None


def test_stages_move_the_bar_by_their_measured_cost() -> None:
    # Seconds work as well as shares: 30 s of images and 90 s of visualizations.
    tracker = ProgressTracker({"images": 30.0, "visualizations": 90.0})
    done = tracker.flush(0.0)
    assert done is None  # nothing reported yet
    tracker.update("images", 10, 10, None, 0.0)
    assert tracker.fraction == 0.25
    tracker.update("annotations", 0, 4, None, 1.0)  # not weighted: costs nothing
    assert tracker.fraction == 1.0


def test_reports_within_the_interval_are_held_and_then_released() -> None:
    tracker = ProgressTracker({"images": 1.0})
    assert tracker.update("images", 0, 100, "a", 0.0) is not None
    assert tracker.update("images", 5, 100, "b", 0.1) is None  # too soon
    assert tracker.update("images", 6, 100, "c", 0.2) is None
    assert tracker.tick(0.24) is None
    released = tracker.tick(0.25)
    assert released is not None
    assert released.phase_progress == 6.0
    assert tracker.tick(0.5) is None  # nothing new worth a report


def test_small_steps_wait_for_the_heartbeat() -> None:
    tracker = ProgressTracker({"images": 1.0})
    tracker.update("images", 0, 1000, "a", 0.0)
    for i in range(1, 10):  # 0.1 % each: under the 1-point step
        assert tracker.update("images", i, 1000, "b", 0.2 * i) is None
    beat = tracker.tick(2.0)
    assert beat is not None
    assert beat.phase_progress == 0.9
    assert tracker.tick(3.9) is None
    again = tracker.tick(4.0)  # a heartbeat even with nothing new: the job is alive
    assert again is not None
    assert again.phase_progress == 0.9


def test_a_stage_change_is_emitted_as_soon_as_the_interval_allows() -> None:
    tracker = ProgressTracker({"images": 0.5, "metrics": 0.5})
    tracker.update("images", 0, 1000, "a", 0.0)
    assert tracker.update("metrics", 0, 1000, None, 0.1) is None
    changed = tracker.tick(0.25)
    assert changed is not None
    assert changed.stage == "metrics"
    assert changed.message is not None
    assert changed.message.text == "Computing metrics (0/1,000)"


def test_a_report_going_back_never_pulls_the_bar_back() -> None:
    tracker = ProgressTracker({"images": 1.0})
    tracker.update("images", 50, 100, "x", 0.0)
    back = tracker.update("images", 10, 100, "retry", 5.0)
    assert back is not None  # the heartbeat was due
    assert back.phase_progress == 50.0
    assert back.stage_progress is not None
    assert back.stage_progress.current == 10  # the counts say what really happens


def test_flush_ignores_the_interval_but_never_repeats() -> None:
    tracker = ProgressTracker({"compression": 1.0})
    tracker.update("compression", 0, 10, "a", 0.0)
    assert tracker.update("compression", 10, 10, None, 0.01) is None
    final = tracker.flush(0.02)
    assert final is not None
    assert (final.phase_progress, final.progress) == (100.0, PROCESSING_SHARE)
    assert final.estimated_time_remaining == 0.0
    assert tracker.flush(0.03) is None
    assert tracker.tick(5.0) is None


def test_the_eta_waits_for_half_a_second_of_observations() -> None:
    tracker = ProgressTracker({"images": 1.0}, min_interval=0.0, min_step=0.001)
    first = tracker.update("images", 1, 100, "a", 0.0)
    soon = tracker.update("images", 2, 100, "b", 0.3)
    later = tracker.update("images", 6, 100, "c", 0.5)
    assert first is not None
    assert soon is not None
    assert later is not None
    assert first.estimated_time_remaining is None
    assert soon.estimated_time_remaining is None
    assert later.estimated_time_remaining == pytest.approx(94 / 10, abs=0.1)  # 10 items/s


def test_the_eta_counts_down_between_reports() -> None:
    tracker = ProgressTracker({"images": 1.0})
    tracker.update("images", 0, 10, "a", 0.0)
    tracker.update("images", 1, 10, "b", 3.0)
    beat = tracker.tick(5.0)
    assert beat is not None
    assert beat.estimated_time_remaining == pytest.approx(27.0 - 2.0, abs=0.1)


def test_settings_that_make_no_sense_are_refused() -> None:
    with pytest.raises(ValueError, match="positive cost"):
        ProgressTracker({})
    with pytest.raises(ValueError, match="images"):
        ProgressTracker({"images": -1.0})
    with pytest.raises(ValueError, match="images"):
        ProgressTracker({"images": math.nan})
    with pytest.raises(ValueError, match="unknown stage"):
        ProgressTracker({"thumbnails": 1.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="min_interval"):
        ProgressTracker({"images": 1.0}, min_interval=3.0, heartbeat=2.0)


@st.composite
def steady_jobs(draw: st.DrawFn) -> tuple[dict[Stage, float], dict[Stage, int], float]:
    chosen = draw(st.sets(st.sampled_from(STAGE_ORDER), min_size=1))
    weights = {s: draw(st.floats(0.1, 5.0)) for s in STAGE_ORDER if s in chosen}
    items = {s: draw(st.integers(1, 40)) for s in weights}
    return weights, items, draw(st.floats(5.0, 60.0))


def replay_eta(
    weights: dict[Stage, float], reports: list[tuple[float, Stage, int, int]], end: float
) -> list[tuple[float, float | None]]:
    """(time, ETA) of every emission over a list of (time, stage, current, total) reports."""
    tracker = ProgressTracker(weights)
    out: list[tuple[float, float | None]] = []
    now = 0.0

    def keep(payload: Progress | None) -> None:
        if payload is not None:
            out.append((now, payload.estimated_time_remaining))

    for at, stage, current, total in reports:
        while now + TICK_AT_MOST < at:
            now += TICK_AT_MOST
            keep(tracker.tick(now))
        now = at
        keep(tracker.update(stage, current, total, f"item_{current}", now))
    keep(tracker.flush(end))
    return out


@SETTINGS
@given(steady_jobs())
def test_a_steady_job_gets_an_eta_within_ten_percent(
    job: tuple[dict[Stage, float], dict[Stage, int], float],
) -> None:
    weights, items, duration = job
    # Each stage takes its weight's share of the time, in equal items: when the weights are the
    # measured costs, the weighted fraction grows at one even rate.
    scale = duration / sum(weights.values())
    reports: list[tuple[float, Stage, int, int]] = []
    start = 0.0
    for stage, n in items.items():
        step = weights[stage] * scale / n
        reports.extend((start + i * step, stage, i, n) for i in range(n + 1))
        start += weights[stage] * scale
    emissions = replay_eta(weights, reports, duration)
    # The rate is known from the first report at least half a second after the first one.
    known = min(t for t, *_ in reports if t >= 0.5)
    warm = [(t, eta) for t, eta in emissions if t >= max(known, 0.1 * duration)]
    assert warm
    for t, eta in warm:
        truth = duration - t
        assert eta is not None
        assert abs(eta - truth) <= 0.1 * truth + 0.1, (t, eta, truth)


def test_uneven_items_give_an_eta_that_settles() -> None:
    # Items alternate between 0.05 s and 1.95 s (one second on average), as cached and uncached
    # images would. The ETA must follow the average, not each item's pace.
    reports: list[tuple[float, Stage, int, int]] = []
    at = 0.0
    for i in range(121):
        reports.append((at, "images", i, 120))
        at += 0.05 if i % 2 == 0 else 1.95
    emissions = replay_eta({"images": 1.0}, reports, 120.0)
    for t, eta in emissions:
        if 10.0 <= t <= 110.0:
            assert eta is not None
            assert abs(eta - (120.0 - t)) <= 0.05 * (120.0 - t) + 1.0, (t, eta)


# -- downloads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    gap: float
    bytes_sent: int


@st.composite
def downloads(draw: st.DrawFn) -> tuple[int, list[Chunk], float]:
    total = draw(st.integers(0, 10_000_000))
    chunks = []
    sent = 0
    for _ in range(draw(st.integers(1, 60))):
        sent = min(total, sent + draw(st.integers(0, max(1, total // 20))))
        # A client that resumes with a Range request reports fewer bytes than before.
        reported = sent if draw(st.integers(0, 9)) else draw(st.integers(0, sent))
        chunks.append(Chunk(draw(GAPS), reported))
    chunks.append(Chunk(draw(GAPS), total))
    return total, chunks, draw(st.floats(0.02, TICK_AT_MOST))


@SETTINGS
@given(downloads(), st.floats(0.0, 100.0))
def test_download_progress_follows_the_same_rules(
    download: tuple[int, list[Chunk], float], start: float
) -> None:
    total, chunks, tick_every = download
    tracker = DownloadTracker(total, download_id="d-1", start_progress=start)
    rules = Rules()
    now = 0.0
    sent = 0

    def after(kind: Kind, payload: DownloadProgress | None) -> None:
        level = 100.0 if total == 0 else 100.0 * sent / total
        rules.after(kind, now, payload, level=level, marker=None, ongoing=sent < total)

    for chunk in chunks:
        target = now + chunk.gap
        while now + tick_every < target:
            now += tick_every
            after("tick", tracker.tick(now))
        now = target
        sent = max(sent, chunk.bytes_sent)
        after("update", tracker.update(chunk.bytes_sent, now))
    after("flush", tracker.flush(now))
    rules.check_sequence()
    for emitted in rules.emitted:
        shown = emitted.payload
        assert isinstance(shown, DownloadProgress)
        assert shown.download_id == "d-1"
        assert shown.total_bytes == total
        assert start - ROUNDING <= shown.progress <= 100.0
    last = rules.emitted[-1].payload
    assert isinstance(last, DownloadProgress)
    assert (last.bytes_sent, last.phase_progress, last.progress) == (total, 100.0, 100.0)
    assert tracker.flush(now + 1.0) is None
    assert tracker.tick(now + 10.0) is None


def test_download_progress_starts_where_processing_left_the_bar() -> None:
    tracker = DownloadTracker(1000, download_id="d-1")
    first = tracker.update(0, 0.0)
    assert first is not None
    assert (first.progress, first.phase_progress) == (PROCESSING_SHARE, 0.0)
    assert tracker.update(500, 0.1) is None
    half = tracker.tick(0.25)
    assert half is not None
    assert (half.bytes_sent, half.phase_progress) == (500, 50.0)
    assert half.progress == pytest.approx(PROCESSING_SHARE + (100.0 - PROCESSING_SHARE) / 2)
    assert tracker.update(400, 0.3) is None  # fewer bytes is not news
    assert tracker.update(1000, 0.4) is None
    done = tracker.flush(0.4)
    assert done is not None
    assert (done.bytes_sent, done.progress, done.phase_progress) == (1000, 100.0, 100.0)
