"""When to report progress, and what to report: the pure core behind every progress event.

Reports come in per item, often far faster than anyone needs to see them and sometimes not at all
for a while. The trackers here turn that stream into the few events worth appending: at most one
per `min_interval`, at least one per `min_step` points of phase progress, one as soon as a stage
changes or the work is all done, and a heartbeat every `heartbeat` seconds while work goes on, so
a quiet job never looks stuck and a fast one never floods the log.

Nothing here reads a clock or does I/O: every call takes `now` (seconds on any monotonic clock),
which keeps the rules testable with synthetic schedules and the callers free to pick their clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import get_args

from schemas.events import PROCESSING_SHARE, DownloadProgress, Progress, Stage, StageProgress
from schemas.messages import message

STAGE_ORDER: tuple[Stage, ...] = get_args(Stage)
"""The order the pipeline runs its stages in; reaching a stage means the ones before it are done."""

ETA_WARMUP = 0.5
"""Seconds of observations needed before a rate, and so an ETA, is given at all."""


class _Throttle:
    """The emission rules both trackers share, over phase progress and a change marker."""

    def __init__(self, min_interval: float, heartbeat: float, min_step: float) -> None:
        if not 0.0 <= min_interval <= heartbeat:
            raise ValueError("need 0 <= min_interval <= heartbeat")
        if not min_step > 0.0:
            raise ValueError("min_step must be positive")
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self.min_step = min_step
        self.last_at: float | None = None
        self.last_level = 0.0
        self.last_marker: object = None
        self.last_snapshot: object = None

    def due(self, now: float, level: float, marker: object, *, ongoing: bool) -> bool:
        """Whether to emit now: `level` is the phase progress, `marker` what counts as news
        in itself (the stage)."""
        if self.last_at is None:
            return True
        elapsed = now - self.last_at
        if elapsed < self.min_interval:
            return False
        return (
            marker != self.last_marker
            or level - self.last_level >= self.min_step
            # The last bit of work is news however small: the bar should not wait at 99.4 %
            # for whoever remembers to flush.
            or (not ongoing and level > self.last_level)
            or (ongoing and elapsed >= self.heartbeat)
        )

    def emitted(self, now: float, level: float, marker: object, snapshot: object) -> None:
        self.last_at = now
        self.last_level = level
        self.last_marker = marker
        self.last_snapshot = snapshot


class _Rate:
    """An exponentially time-weighted average of progress per second.

    Both the progress made and the time spent are summed with weights that decay by
    `exp(-age / smoothing)`, and the rate is their ratio. Weighting by time rather than by report
    is what makes it settle with uneven items: a burst of fifty cached items and one slow item
    count for the seconds they took, not for how many reports they sent, and the estimate is the
    same however finely the work is reported. Over a window short against `smoothing` it is
    simply progress over elapsed time, so it needs no special start-up case.
    """

    def __init__(self, smoothing: float) -> None:
        if not smoothing > 0.0:
            raise ValueError("smoothing must be positive")
        self._smoothing = smoothing
        self._at: float | None = None
        self._fraction = 0.0
        self._span = 0.0
        self._progress = 0.0
        self._time = 0.0

    def observe(self, now: float, fraction: float) -> None:
        """Record that `fraction` (never decreasing) of the work is done at `now`."""
        if self._at is None:
            self._at, self._fraction = now, fraction
            return
        gained = fraction - self._fraction
        elapsed = max(0.0, now - self._at)
        decay = math.exp(-elapsed / self._smoothing)
        # The rate is taken as constant between two reports, and each moment of that interval
        # is weighted by its own age (the integral of the decay over the interval), not by the
        # age of its end: otherwise the latest interval is over-weighted and a job of alternating
        # short and long items gets an ETA biased by the long ones.
        weight = -self._smoothing * math.expm1(-elapsed / self._smoothing)
        share = weight / elapsed if elapsed > 0.0 else 1.0
        self._progress = self._progress * decay + gained * share
        self._time = self._time * decay + weight
        self._span += elapsed
        self._fraction = fraction
        self._at = max(self._at, now)

    def remaining(self, now: float) -> float | None:
        """Seconds left at `now`, or None while the rate is unknown.

        Between observations the estimate counts down rather than growing at every quiet
        moment: the next observation corrects it either way, and a bar whose ETA rises while
        an item is simply taking its usual time reads as a stall.
        """
        if self._fraction >= 1.0:
            return 0.0
        if self._at is None or self._span < ETA_WARMUP or min(self._progress, self._time) <= 0.0:
            return None
        rate = self._progress / self._time
        left = (1.0 - self._fraction) / rate - max(0.0, now - self._at)
        if not math.isfinite(left):
            return None
        return round(max(0.0, left), 1)


class ProgressTracker:
    """Per-item reports of the processing phase in, throttled `Progress` payloads out.

    `weights` are the stages' measured costs: overall progress moves through each stage in
    proportion to the time it usually takes, so the bar moves at an even pace instead of
    racing through cheap stages and crawling through dear ones. Any non-negative numbers work
    (seconds, or shares summing to 1); they are normalised. A stage missing from `weights` costs
    nothing and moves the bar not at all, though its reports are still shown.

    Phase progress is `100 * fraction done` and overall progress `PROCESSING_SHARE * fraction`;
    both only ever grow, whatever the reports say, because `fold` keeps the maximum anyway and a
    bar that is seen to go back (a retried item, a resumed stage) loses the user's trust.
    Heartbeats stop once the weighted work is all done; `flush` then says the last word.
    `eta_smoothing` is the time constant, in seconds, of the rate behind the ETA: longer is
    steadier, shorter follows a change of pace sooner.
    """

    def __init__(
        self,
        weights: Mapping[Stage, float],
        *,
        min_interval: float = 0.25,
        heartbeat: float = 2.0,
        min_step: float = 1.0,
        eta_smoothing: float = 20.0,
        start_progress: float = 0.0,
    ) -> None:
        """`start_progress`: the overall progress already reported (a resumed job); nothing
        below it is emitted."""
        for stage, cost in weights.items():
            if stage not in STAGE_ORDER:
                raise ValueError(f"unknown stage {stage!r}")
            if not (math.isfinite(cost) and cost >= 0.0):
                raise ValueError(f"the cost of {stage!r} must be a finite number >= 0")
        # Cumulative costs summed in pipeline order, so that a finished last stage gives a
        # fraction of exactly 1 (the same additions in the same order) and the final report
        # reads 100 %, not 99.99999.
        self._before: dict[Stage, float] = {}
        self._cost: dict[Stage, float] = {}
        total = 0.0
        for stage in STAGE_ORDER:
            self._before[stage] = total
            self._cost[stage] = float(weights.get(stage, 0.0))
            total += self._cost[stage]
        if not total > 0.0:
            raise ValueError("at least one stage needs a positive cost")
        self._total = total
        self._throttle = _Throttle(min_interval, heartbeat, min_step)
        self._rate = _Rate(eta_smoothing)
        self._floor = min(PROCESSING_SHARE, max(0.0, start_progress))
        self._fraction = self._floor / PROCESSING_SHARE
        self._latest: tuple[Stage, StageProgress] | None = None

    def update(
        self, stage: Stage, current: int, total: int, item: str | None, now: float
    ) -> Progress | None:
        """Record that `current` of `total` items of `stage` are done and `item` is in hand.

        Returns the payload to append now, or None when the rules say to wait.
        """
        if stage not in self._cost:
            raise ValueError(f"unknown stage {stage!r}")
        done = 1.0 if total <= 0 else min(1.0, max(0.0, current / total))
        reached = (self._before[stage] + self._cost[stage] * done) / self._total
        self._fraction = max(self._fraction, min(1.0, reached))
        self._latest = (stage, StageProgress(current=current, total=total, current_item=item))
        self._rate.observe(now, self._fraction)
        return self._emit_if_due(now)

    def tick(self, now: float) -> Progress | None:
        """Called in quiet spells: a held-back report whose time has come, or a heartbeat when
        `heartbeat` seconds have passed since the last emission and work is going on."""
        return self._emit_if_due(now)

    def flush(self, now: float) -> Progress | None:
        """The latest progress if it was never emitted, ignoring `min_interval`.

        Called just before a phase change or an outcome, so the log's last progress is the true
        one (100 % when all stages finished). Never repeats the last emission.
        """
        if self._latest is None or self._snapshot() == self._throttle.last_snapshot:
            return None
        return self._emit(now, *self._latest)

    @property
    def fraction(self) -> float:
        """The weighted fraction of the processing work done, 0 to 1."""
        return self._fraction

    def _snapshot(self) -> object:
        return (self._latest, self._fraction)

    def _emit_if_due(self, now: float) -> Progress | None:
        if self._latest is None:
            return None
        stage, counts = self._latest
        ongoing = self._fraction < 1.0
        if not self._throttle.due(now, 100.0 * self._fraction, stage, ongoing=ongoing):
            return None
        return self._emit(now, stage, counts)

    def _emit(self, now: float, stage: Stage, counts: StageProgress) -> Progress:
        self._throttle.emitted(now, 100.0 * self._fraction, stage, self._snapshot())
        if counts.current_item is None:
            text = message(
                f"export.stage.{stage}.counts", current=counts.current, total=counts.total
            )
        else:
            text = message(
                f"export.stage.{stage}",
                current=counts.current,
                total=counts.total,
                item=counts.current_item,
            )
        return Progress(
            phase="processing",
            stage=stage,
            # Two decimals: finer steps are invisible on any bar and only bloat the log.
            progress=max(self._floor, round(PROCESSING_SHARE * self._fraction, 2)),
            phase_progress=max(
                round(100.0 * self._floor / PROCESSING_SHARE, 2),
                round(100.0 * self._fraction, 2),
            ),
            stage_progress=counts,
            message=text,
            estimated_time_remaining=self._rate.remaining(now),
        )


class DownloadTracker:
    """Bytes sent by one download in, throttled `DownloadProgress` payloads out.

    Overall progress runs from `start_progress` (where processing left the bar) to 100 and
    phase progress from 0 to 100, both by bytes and never backwards, under the same rules as
    `ProgressTracker`.
    """

    def __init__(
        self,
        total_bytes: int,
        *,
        download_id: str,
        min_interval: float = 0.25,
        heartbeat: float = 2.0,
        min_step: float = 1.0,
        start_progress: float = PROCESSING_SHARE,
    ) -> None:
        if total_bytes < 0:
            raise ValueError("total_bytes must be >= 0")
        if not 0.0 <= start_progress <= 100.0:
            raise ValueError("start_progress must be between 0 and 100")
        self.download_id = download_id
        self.total_bytes = total_bytes
        self._start = start_progress
        self._throttle = _Throttle(min_interval, heartbeat, min_step)
        self._sent: int | None = None

    def update(self, bytes_sent: int, now: float) -> DownloadProgress | None:
        """Record that `bytes_sent` bytes have gone out; the payload to append now, or None."""
        self._sent = max(self._sent or 0, min(bytes_sent, self.total_bytes))
        return self._emit_if_due(now)

    def tick(self, now: float) -> DownloadProgress | None:
        """A held-back report whose time has come, or a heartbeat while bytes remain."""
        return self._emit_if_due(now)

    def flush(self, now: float) -> DownloadProgress | None:
        """The latest progress if it was never emitted, ignoring `min_interval`; never a repeat."""
        if self._sent is None or self._sent == self._throttle.last_snapshot:
            return None
        return self._emit(now, self._sent)

    def _fraction(self, sent: int) -> float:
        return 1.0 if self.total_bytes == 0 else sent / self.total_bytes

    def _emit_if_due(self, now: float) -> DownloadProgress | None:
        sent = self._sent
        if sent is None:
            return None
        level = 100.0 * self._fraction(sent)
        if not self._throttle.due(now, level, None, ongoing=sent < self.total_bytes):
            return None
        return self._emit(now, sent)

    def _emit(self, now: float, sent: int) -> DownloadProgress:
        fraction = self._fraction(sent)
        self._throttle.emitted(now, 100.0 * fraction, None, sent)
        return DownloadProgress(
            download_id=self.download_id,
            bytes_sent=sent,
            total_bytes=self.total_bytes,
            progress=round(self._start + (100.0 - self._start) * fraction, 2),
            phase_progress=round(100.0 * fraction, 2),
        )
