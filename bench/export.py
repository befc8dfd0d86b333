"""Export throughput: the real pipeline on a generated demo project, against `zip`.

Three measurements, all on the same demo project (``create_demo_project``) in a temporary folder:

* **Whole pipeline**: `ExportPipeline.run` with every stage (originals, visualizations, COCO and
  YOLO annotations, metrics, README), timed from the call to the finished archive; archive bytes
  and entries per second of export time.
* **Compression stage alone against `zip`** (the raw baseline). A first run is cancelled as soon
  as compression starts, which leaves every staged file in place; a copy of that folder is what
  both sides archive. The pipeline resumes with the other stages marked done, so only compression
  runs (timed from its `current=0` report to the returned archive: central directory, fsync,
  rename and removal of the staging folder included). `zip -r -q -X -D -n <suffixes>` archives
  the same files at zip's default level 6, which is zlib's default and so the pipeline's, storing
  the same already-compressed suffixes the pipeline stores (PNG, JPEG, ...) and deflating the
  rest; its archive is fsynced inside the timing, as the pipeline's is.
* **Progress reporting cost**: the same pipeline run with reporting off (a no-op callback) and on
  (the worker's path minus the database: reports reach the event loop through the worker's own
  coalescing callback, a pump feeds the `ProgressTracker` with the worker's stage weights and
  throttling, and each emitted `Progress` becomes a `NewEvent` encoded as the event log would
  encode it). Each round runs the export with reporting off and then on, back to back; the
  overhead is the median over the rounds of on ÷ off, so that the machine's drift between rounds
  (a shared machine's speed changes within minutes) cancels out of it. The ratio of the medians
  of all runs is shown beside it, and so is the time spent inside the reporting code itself, the
  steadiest of the three.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas.events import ExportOptions, Progress, Stage, encode_data
from services.common.eventlog import NewEvent
from services.common.timing import within
from services.export.demo import create_demo_project
from services.export.pipeline import (
    _PRECOMPRESSED,
    STAGES,
    ExportPipeline,
    PipelineCancelled,
    stage_weights,
)
from services.export.progress import ProgressTracker
from services.export.worker import CoalescingReporter

from .common import Context, Rendered, Table, run_benchmark, step_message

NAME = "export"
GOAL_OVERHEAD_PERCENT = 5.0
BUSY_MACHINE_CORES = 0.25
OPTIONS = ExportOptions(annotation_formats=("coco", "yolo"))
ARCHIVE_NAME = "demo.zip"
# The worker's pump waits this long for a report before asking the tracker for a heartbeat.
PUMP_TICK_SECONDS = 0.25
ZIP_SUFFIXES = ":".join(sorted(_PRECOMPRESSED))

Progressor = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    images: int
    pairs: int
    """Rounds of whole-pipeline runs, each with reporting off, on, and in the pipeline thread."""
    compression_runs: int
    """Runs of the compression stage alone and of `zip`, each."""
    seed: int = 7
    reduced: bool = False

    @classmethod
    def for_run(cls, *, quick: bool) -> Settings:
        if quick:
            return cls(images=120, pairs=3, compression_runs=3, reduced=True)
        return cls(images=300, pairs=6, compression_runs=5)


@dataclass
class Timed:
    """Repeated runs of one thing over the same files."""

    label: str
    seconds: list[float] = field(default_factory=list)
    input_bytes: int = 0
    archive_bytes: int = 0
    files: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    def per_s(self, amount: float) -> float | None:
        median = self.median
        return amount / median if self.seconds and median > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "runs": len(self.seconds),
            "seconds": [round(s, 4) for s in self.seconds],
            "median_seconds": _round(self.median if self.seconds else None, 4),
            "min_seconds": _round(min(self.seconds) if self.seconds else None, 4),
            "input_bytes": self.input_bytes,
            "archive_bytes": self.archive_bytes,
            "files": self.files,
            "archive_mb_per_s": _round(self.per_s(self.archive_bytes / 1e6), 2),
            "input_mb_per_s": _round(self.per_s(self.input_bytes / 1e6), 2),
            "files_per_s": _round(self.per_s(self.files), 1),
        }


@dataclass
class Reporting:
    """Whole-pipeline runs with progress reporting off and on."""

    off: Timed
    on: Timed
    direct: Timed
    reports: int = 0
    """Reports the pipeline made per run."""
    emitted: list[int] = field(default_factory=list)
    """Progress events the tracker let through, per run with reporting on."""
    encoded_bytes: list[int] = field(default_factory=list)
    callback_seconds: list[float] = field(default_factory=list)
    """Time inside the report callback (pipeline thread), per run."""
    pump_seconds: list[float] = field(default_factory=list)
    """Time the pump spent on reports, tracker and encoding (event loop), per run."""

    @property
    def overhead_percent(self) -> float | None:
        if not self.off.seconds or not self.on.seconds or self.off.median <= 0:
            return None
        return (self.on.median / self.off.median - 1.0) * 100.0

    @property
    def direct_overhead_percent(self) -> float | None:
        if not self.off.seconds or not self.direct.seconds or self.off.median <= 0:
            return None
        return (self.direct.median / self.off.median - 1.0) * 100.0

    @property
    def paired_overhead_percent(self) -> float | None:
        pairs = list(zip(self.on.seconds, self.off.seconds, strict=False))
        if not pairs:
            return None
        return statistics.median((on / off - 1.0) * 100.0 for on, off in pairs)

    @property
    def accounted_percent(self) -> float | None:
        """Time inside the reporting code over the export's time (reporting on)."""
        if not self.on.seconds:
            return None
        shares = [
            (callback + pump) / seconds * 100.0
            for callback, pump, seconds in zip(
                self.callback_seconds, self.pump_seconds, self.on.seconds, strict=False
            )
        ]
        return statistics.median(shares) if shares else None


@dataclass
class Report:
    settings: Settings
    project_bytes: int
    entries: int
    pipeline: Timed
    compression: Timed
    zip: Timed | None
    zip_note: str | None
    reporting: Reporting
    stage_seconds: dict[str, float]

    @property
    def zip_ratio(self) -> float | None:
        """The compression stage's speed over zip's on the same files (> 1: faster than zip)."""
        if self.zip is None or not self.zip.seconds or not self.compression.seconds:
            return None
        return self.zip.median / self.compression.median


# --------------------------------------------------------------------------- measuring


class _Sink:
    """What the worker does with a progress event, minus the database: wrap and encode it."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0

    def __call__(self, progress: Progress) -> None:
        event = NewEvent(data=progress, actor="worker:bench")
        self.bytes += len(encode_data(event.data))
        self.events += 1


def _pipeline(
    project: Path,
    work: Path,
    report: Callable[[Stage, int, int, str | None], None],
    is_cancelled: Callable[[], bool] = lambda: False,
) -> ExportPipeline:
    return ExportPipeline(
        project, work, OPTIONS, report=report, is_cancelled=is_cancelled, archive_name=ARCHIVE_NAME
    )


def _ignore(stage: Stage, current: int, total: int, item: str | None) -> None:
    return None


async def _run_off(project: Path, work: Path) -> tuple[float, int, int]:
    """(seconds, archive bytes, entries) with a no-op report callback."""
    pipeline = _pipeline(project, work, _ignore)
    plan = await asyncio.to_thread(pipeline.plan)
    started = time.perf_counter()
    result = await asyncio.to_thread(pipeline.run)
    seconds = time.perf_counter() - started
    await asyncio.to_thread(pipeline.cleanup)
    return seconds, result.size_bytes, dict(plan)["compression"]


@dataclass
class _OnRun:
    seconds: float
    reports: int
    emitted: int
    encoded_bytes: int
    callback_seconds: float
    pump_seconds: float
    stage_seconds: dict[str, float]


async def _run_on(project: Path, work: Path) -> _OnRun:
    """A run with the worker's reporting path: callback → loop → tracker → encoded event."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Stage, int, int, str | None] | None] = asyncio.Queue()
    counted = {"reports": 0}
    callback_time = [0.0]
    first: dict[Stage, float] = {}
    last: dict[Stage, float] = {}

    # The worker's own callback: reports reach the loop coalesced (services/export/worker.py).
    hand_over = CoalescingReporter(loop, queue.put_nowait)

    def report(stage: Stage, current: int, total: int, item: str | None) -> None:
        began = time.perf_counter()
        first.setdefault(stage, began)
        last[stage] = began
        counted["reports"] += 1
        hand_over(stage, current, total, item)
        callback_time[0] += time.perf_counter() - began

    pipeline = _pipeline(project, work, report)
    plan = await asyncio.to_thread(pipeline.plan)
    weights = stage_weights(plan)
    tracker = ProgressTracker(weights or {"compression": 1.0})
    sink = _Sink()
    pump_time = [0.0]

    async def pump() -> None:
        while True:
            item: tuple[Stage, int, int, str | None] | bool | None
            try:
                item = await within(queue.get(), PUMP_TICK_SECONDS)
            except TimeoutError:
                item = False
            if item is None:
                return
            began = time.perf_counter()
            now = loop.time()
            if isinstance(item, tuple):
                stage, current, total, name = item
                progress = tracker.update(stage, current, total, name, now)
            else:
                progress = tracker.tick(now)
            if progress is not None:
                sink(progress)
            pump_time[0] += time.perf_counter() - began

    pumping = asyncio.create_task(pump())
    started = time.perf_counter()
    try:
        result = await asyncio.to_thread(pipeline.run)
    finally:
        hand_over.flush()
        queue.put_nowait(None)
        await pumping
    began = time.perf_counter()
    final = tracker.flush(loop.time())
    if final is not None:
        sink(final)
    pump_time[0] += time.perf_counter() - began
    seconds = time.perf_counter() - started
    ended = started + seconds
    await asyncio.to_thread(pipeline.cleanup)
    del result
    stages = [stage for stage in STAGES if stage in first]
    spans: dict[str, float] = {
        stage: (first[stages[i + 1]] if i + 1 < len(stages) else ended) - first[stage]
        for i, stage in enumerate(stages)
    }
    return _OnRun(
        seconds=seconds,
        reports=counted["reports"],
        emitted=sink.events,
        encoded_bytes=sink.bytes,
        callback_seconds=callback_time[0],
        pump_seconds=pump_time[0],
        stage_seconds=spans,
    )


async def _run_direct(project: Path, work: Path) -> tuple[float, int]:
    """(seconds, events): the tracker and the sink called in the pipeline's own thread, with no
    hand-off to the event loop; tells the tracker's cost from the cross-thread hand-off's."""
    sink = _Sink()
    holder: list[ProgressTracker] = []

    def report(stage: Stage, current: int, total: int, item: str | None) -> None:
        progress = holder[0].update(stage, current, total, item, time.monotonic())
        if progress is not None:
            sink(progress)

    pipeline = _pipeline(project, work, report)
    plan = await asyncio.to_thread(pipeline.plan)
    holder.append(ProgressTracker(stage_weights(plan) or {"compression": 1.0}))
    started = time.perf_counter()
    await asyncio.to_thread(pipeline.run)
    final = holder[0].flush(time.monotonic())
    if final is not None:
        sink(final)
    seconds = time.perf_counter() - started
    await asyncio.to_thread(pipeline.cleanup)
    return seconds, sink.events


def _stage_files(project: Path, work: Path) -> Path:
    """Run every stage but compression (cancelled when it starts); the staging folder."""
    compressing = [False]

    def report(stage: Stage, current: int, total: int, item: str | None) -> None:
        if stage == "compression":
            compressing[0] = True

    pipeline = _pipeline(project, work, report, lambda: compressing[0])
    try:
        pipeline.run()
    except PipelineCancelled:
        pass
    else:  # pragma: no cover - the cancel check precedes the first entry
        raise RuntimeError("the pipeline finished instead of stopping at compression")
    (work / f"{ARCHIVE_NAME}.partial").unlink(missing_ok=True)
    return work / "staging"


def _compress_only(project: Path, work: Path, files: Path) -> tuple[float, int]:
    """Restore staging from `files`, resume with only compression left; (seconds, bytes)."""
    staging = work / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(files, staging)
    began: list[float] = []

    def report(stage: Stage, current: int, total: int, item: str | None) -> None:
        if stage == "compression" and current == 0 and not began:
            began.append(time.perf_counter())

    pipeline = _pipeline(project, work, report)
    done = frozenset(stage for stage in STAGES if stage != "compression")
    result = pipeline.run(done_stages=done)
    seconds = time.perf_counter() - began[0]
    pipeline.cleanup()
    return seconds, result.size_bytes


def _zip(files: Path, out: Path) -> tuple[float, int]:
    """`zip` over the same files at its default level 6, storing what the pipeline stores."""
    out.unlink(missing_ok=True)
    command = ["zip", "-r", "-q", "-X", "-D", "-n", ZIP_SUFFIXES, str(out), "."]
    started = time.perf_counter()
    subprocess.run(command, cwd=files, check=True)
    descriptor = os.open(out, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    seconds = time.perf_counter() - started
    size = out.stat().st_size
    out.unlink()
    return seconds, size


def _tree(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder`."""
    count = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            count += 1
            size += path.stat().st_size
    return count, size


async def measure_all(settings: Settings, *, progress: Progressor | None = None) -> Report:
    say = progress or (lambda _message: None)
    steps = settings.pairs + 2

    with tempfile.TemporaryDirectory(prefix="bench-export-") as directory:
        root = Path(directory)
        say(step_message(1, steps, f"demo project of {settings.images} images, a warm-up export"))
        project = await asyncio.to_thread(
            create_demo_project, root / "data", "demo", images=settings.images, seed=settings.seed
        )
        _, project_bytes = _tree(project)
        work = root / "work"

        # A warm-up run: page cache, fonts, imports.
        _, _, entries = await _run_off(project, work)

        pipeline = Timed("pipeline, all stages (reporting off)")
        reporting = Reporting(
            off=Timed("reporting off (no-op callback)"),
            on=Timed("reporting on (worker path)"),
            direct=Timed("tracker in the pipeline thread"),
        )
        stage_samples: dict[str, list[float]] = {}
        for index in range(settings.pairs):
            say(
                step_message(
                    index + 2,
                    steps,
                    f"whole exports, round {index + 1} of {settings.pairs}: progress reporting "
                    "off / on / in the pipeline thread",
                )
            )
            modes = ("off", "on", "direct")
            for mode in modes[index % 3 :] + modes[: index % 3]:
                if mode == "direct":
                    seconds, _ = await _run_direct(project, work)
                    reporting.direct.seconds.append(seconds)
                elif mode == "off":
                    seconds, size, _ = await _run_off(project, work)
                    reporting.off.seconds.append(seconds)
                    pipeline.seconds.append(seconds)
                    pipeline.archive_bytes = size
                else:
                    run = await _run_on(project, work)
                    reporting.on.seconds.append(run.seconds)
                    reporting.reports = run.reports
                    reporting.emitted.append(run.emitted)
                    reporting.encoded_bytes.append(run.encoded_bytes)
                    reporting.callback_seconds.append(run.callback_seconds)
                    reporting.pump_seconds.append(run.pump_seconds)
                    for stage, span in run.stage_seconds.items():
                        stage_samples.setdefault(stage, []).append(span)
        pipeline.files = entries

        say(
            step_message(
                steps,
                steps,
                f"compression stage alone and zip on the same files, {settings.compression_runs} "
                "runs each",
            )
        )
        staging = await asyncio.to_thread(_stage_files, project, work)
        files = root / "files"
        await asyncio.to_thread(shutil.copytree, staging, files)
        # README.md is in it too: compression writes it before its first cancellation check.
        await asyncio.to_thread(_compress_only, project, work, files)  # warm-up
        file_count, input_bytes = _tree(files)
        compression = Timed("compression stage alone", input_bytes=input_bytes, files=file_count)
        pipeline.input_bytes = input_bytes
        have_zip = shutil.which("zip") is not None
        zipped = (
            Timed("zip -r -q (raw baseline)", input_bytes=input_bytes, files=file_count)
            if have_zip
            else None
        )
        zip_note = (
            None
            if have_zip
            else "The `zip` command is not installed: the raw baseline was skipped (install "
            "the `zip` package to measure it)."
        )
        for index in range(settings.compression_runs):
            order = ("pipeline", "zip") if index % 2 == 0 else ("zip", "pipeline")
            for side in order:
                if side == "pipeline":
                    seconds, size = await asyncio.to_thread(_compress_only, project, work, files)
                    compression.seconds.append(seconds)
                    compression.archive_bytes = size
                elif zipped is not None:
                    seconds, size = await asyncio.to_thread(_zip, files, root / "zip.zip")
                    zipped.seconds.append(seconds)
                    zipped.archive_bytes = size
        if zipped is not None:
            # Confirm the baseline archived the same entries.
            with zipfile.ZipFile(await asyncio.to_thread(_zip_once, files, root)) as check:
                if len(check.namelist()) != file_count:
                    zip_note = (
                        f"zip archived {len(check.namelist())} entries, not {file_count}: "
                        "the baseline is not like for like."
                    )
    reporting.off.input_bytes = reporting.on.input_bytes = input_bytes
    reporting.off.archive_bytes = reporting.on.archive_bytes = pipeline.archive_bytes
    reporting.off.files = reporting.on.files = entries
    reporting.direct.input_bytes = input_bytes
    reporting.direct.archive_bytes = pipeline.archive_bytes
    reporting.direct.files = entries
    return Report(
        settings=settings,
        project_bytes=project_bytes,
        entries=entries,
        pipeline=pipeline,
        compression=compression,
        zip=zipped,
        zip_note=zip_note,
        reporting=reporting,
        stage_seconds={s: statistics.median(v) for s, v in stage_samples.items()},
    )


def _zip_once(files: Path, root: Path) -> Path:
    out = root / "check.zip"
    out.unlink(missing_ok=True)
    subprocess.run(
        ["zip", "-r", "-q", "-X", "-D", "-n", ZIP_SUFFIXES, str(out), "."], cwd=files, check=True
    )
    return out


# --------------------------------------------------------------------------- reporting


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or value != value else round(value, digits)


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or value != value else f"{value:,.{digits}f}"


def _goal(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "NO")


def throughput_table(report: Report) -> Table:
    table = Table(
        headers=[
            "what",
            "runs",
            "median s",
            "input MB",
            "archive MB",
            "archive MB/s",
            "input MB/s",
            "files/s",
            "speed ÷ zip",
        ]
    )
    rows = [report.pipeline, report.compression, *([report.zip] if report.zip else [])]
    for timed in rows:
        ratio = ""
        if timed is report.compression:
            ratio = _num(report.zip_ratio, 2) + "×" if report.zip_ratio else "—"
        elif timed is report.zip:
            ratio = "1.00×"
        table.add(
            timed.label,
            str(len(timed.seconds)),
            _num(timed.median, 3),
            _num(timed.input_bytes / 1e6, 2),
            _num(timed.archive_bytes / 1e6, 2),
            _num(timed.per_s(timed.archive_bytes / 1e6), 1),
            _num(timed.per_s(timed.input_bytes / 1e6), 1),
            _num(timed.per_s(timed.files), 0),
            ratio,
        )
    return table


def reporting_table(report: Report) -> Table:
    r = report.reporting
    table = Table(
        headers=[
            "progress reporting",
            "runs",
            "median s",
            "min s",
            "reports / run",
            "events / run",
            "in reporting code",
            "overhead",
            f"goal < {GOAL_OVERHEAD_PERCENT:g} %",
        ]
    )
    table.add(
        r.off.label,
        str(len(r.off.seconds)),
        _num(r.off.median, 3),
        _num(min(r.off.seconds) if r.off.seconds else None, 3),
        f"{r.reports:,}",
        "0",
        "—",
        "",
        "",
    )
    overhead = r.paired_overhead_percent
    table.add(
        r.on.label,
        str(len(r.on.seconds)),
        _num(r.on.median, 3),
        _num(min(r.on.seconds) if r.on.seconds else None, 3),
        f"{r.reports:,}",
        _num(statistics.median(r.emitted), 0) if r.emitted else "—",
        _num(r.accounted_percent, 2) + " %",
        _num(overhead, 2) + " % (medians " + _num(r.overhead_percent, 2) + " %)",
        _goal(None if overhead is None else overhead < GOAL_OVERHEAD_PERCENT),
    )
    table.add(
        r.direct.label + " (diagnostic)",
        str(len(r.direct.seconds)),
        _num(r.direct.median, 3),
        _num(min(r.direct.seconds) if r.direct.seconds else None, 3),
        f"{r.reports:,}",
        "",
        "—",
        _num(r.direct_overhead_percent, 2) + " %",
        "",
    )
    return table


def _notes(report: Report) -> list[str]:
    s = report.settings
    notes = []
    if s.reduced:
        notes.append(
            f"Quick run: {s.images} images and {s.pairs} rounds instead of 300 and 6; run without "
            "--quick for the figures the goal is about."
        )
    if report.zip_note:
        notes.append(report.zip_note)
    if report.stage_seconds:
        notes.append(
            "Stage times of a whole run (median, reporting on): "
            + ", ".join(
                f"{stage} {seconds:.3f} s" for stage, seconds in report.stage_seconds.items()
            )
            + ". The archive rate of a whole export is bound by the stages before compression "
            "(drawing the visualizations above all), not by the archiving."
        )
    r = report.reporting
    if r.emitted and r.encoded_bytes:
        notes.append(
            f"Reporting on: {r.reports:,} reports per run became "
            f"{statistics.median(r.emitted):.0f} progress events "
            f"({statistics.median(r.encoded_bytes) / max(1, statistics.median(r.emitted)):.0f} "
            "bytes each encoded); 'in reporting code' is the time inside the callback and the "
            "pump over the run's time, the figure that does not move with disk noise; "
            "'overhead' is the median over rounds of the on ÷ off ratio of the round's two runs "
            "(beside it, the ratio of the medians of all runs, which the machine's drift between "
            "rounds moves) and can be negative when the difference is within the noise."
        )
    return notes


def render(
    report: Report,
    *,
    server: Mapping[str, Any],
    machine: Mapping[str, Any],
    source: str,
    started_at: str,
    duration_seconds: float,
) -> Rendered:
    s = report.settings
    header = (
        f"Demo project of {s.images} images ({report.project_bytes / 1e6:.2f} MB, seed {s.seed}), "
        f"options {', '.join(f'{k}={v}' for k, v in asdict_options().items())}; "
        f"{machine.get('cpu_count')} CPUs; Python {machine.get('python')}. The database is not "
        f"used (PostgreSQL {server.get('server_version')} via {source} was only provisioned)."
    )
    method = (
        "Medians over runs alternating between the sides compared, after a warm-up run. "
        "Compression alone runs from its first report to the returned archive (central "
        "directory, fsync, rename and removal of staging included); zip is "
        f"`zip -r -q -X -D -n {ZIP_SUFFIXES}` (level 6, as zlib's default the pipeline uses; "
        "those suffixes stored, as the pipeline stores them) plus an fsync of its archive."
    )
    loads = [machine.get("idle_load_before"), machine.get("idle_load_after")]
    if any(load is not None for load in loads):
        shown = " / ".join("—" if load is None else f"{load:.2f}" for load in loads)
        busy = any(load is not None and load > BUSY_MACHINE_CORES for load in loads)
        method += f" Busy cores while the benchmark sat idle, before / after: {shown}" + (
            " — the machine was shared with other work: figures are depressed and noisy."
            if busy
            else "."
        )
    tables = [
        ("Archive throughput", throughput_table(report)),
        ("Progress reporting cost", reporting_table(report)),
    ]
    notes = _notes(report)
    text_parts = [f"Export — {started_at}", header, method]
    md_parts = [f"# Export — {started_at}", "", header, "", method]
    for title, table in tables:
        text_parts += ["", title, table.text()]
        md_parts += ["", f"## {title}", "", table.markdown()]
    text_parts += ["", *notes]
    md_parts += ["", *(f"- {line}" for line in notes)]
    r = report.reporting
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "started_at": started_at,
        "duration_seconds": round(duration_seconds, 1),
        "settings": asdict(s),
        "options": asdict_options(),
        "machine": dict(machine),
        "server": {"source": source, **server},
        "goals": {"progress_overhead_percent_below": GOAL_OVERHEAD_PERCENT},
        "project_bytes": report.project_bytes,
        "entries": report.entries,
        "pipeline": report.pipeline.to_json(),
        "compression": report.compression.to_json(),
        "zip": report.zip.to_json() if report.zip else None,
        "compression_speed_over_zip": _round(report.zip_ratio),
        "stage_seconds": {k: round(v, 4) for k, v in report.stage_seconds.items()},
        "reporting": {
            "off": r.off.to_json(),
            "on": r.on.to_json(),
            "reports_per_run": r.reports,
            "events_per_run": r.emitted,
            "encoded_bytes_per_run": r.encoded_bytes,
            "callback_seconds": [round(v, 5) for v in r.callback_seconds],
            "pump_seconds": [round(v, 5) for v in r.pump_seconds],
            "in_reporting_code_percent": _round(r.accounted_percent),
            "overhead_percent": _round(r.overhead_percent),
            "paired_overhead_percent": _round(r.paired_overhead_percent),
            "direct": r.direct.to_json(),
            "direct_overhead_percent": _round(r.direct_overhead_percent),
        },
        "notes": notes,
    }
    return Rendered(text="\n".join(text_parts), markdown="\n".join(md_parts), payload=payload)


def asdict_options() -> dict[str, Any]:
    return {
        "include_original_images": OPTIONS.include_original_images,
        "include_visualizations": OPTIONS.include_visualizations,
        "annotation_formats": list(OPTIONS.annotation_formats),
        "metrics_formats": list(OPTIONS.metrics_formats),
        "include_documentation": OPTIONS.include_documentation,
    }


async def main(ctx: Context) -> None:
    """Run the benchmark, print the tables, write export.json/.md."""
    settings = Settings.for_run(quick=ctx.quick)

    async def measure(dsn: str) -> Report:
        del dsn  # the export pipeline does not touch the database
        return await measure_all(settings, progress=ctx.progress)

    await run_benchmark(ctx, NAME, measure, render)
