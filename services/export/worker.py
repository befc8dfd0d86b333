"""Running export jobs: claim under a lease, run the pipeline, report, and end in one outcome.

Each export process runs one `Worker`. It waits for work on "notified, poll timer or stop",
claims jobs with `FOR UPDATE SKIP LOCKED` under a lease it renews while the job runs, and runs
each job's pipeline in a thread (the stages are file and image work), pumping the pipeline's
per-item reports through the progress tracker into the log.

A job ends in exactly one outcome, decided by the log: every append names the seq it expects, so
a cancel requested by any process makes the worker's next append conflict; the worker then reads
the job, sees the cancel, stops at the current item, cleans up and appends `cancelled`.

Takeover: a worker that dies stops renewing its lease. Once the lease has run out another worker
claims the job, appends `export:resumed`, and resumes from the first stage the log does not show
as finished, reusing that stage's outputs when the scratch folder is shared and intact (the
pipeline checks) and redoing them otherwise. After `max_attempts` claims the job fails as
`worker_lost`, retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import msgspec
import structlog

from schemas.events import (
    ArchiveInfo,
    Cancelled,
    CancelledBy,
    Completed,
    EventData,
    Failed,
    Progress,
    Resumed,
    Stage,
    Started,
)
from schemas.messages import CATALOGUE, message
from schemas.state import JobState
from services.common.db import DATABASE_ERRORS
from services.common.eventlog import ConflictError, EventLog, JobClosedError, NewEvent
from services.common.listener import Listener
from services.common.queries import QUERIES
from services.common.timing import wait_event, within

from .config import ExportConfig
from .pipeline import ExportPipeline, PipelineCancelled, PipelineError, stage_weights
from .progress import ProgressTracker

log = structlog.get_logger(__name__)

JOBS_CHANNEL = "exportlog_jobs"
CANCEL_CHANNEL = "exportlog_cancel"

_state_decoder = msgspec.json.Decoder(JobState)

_Report = tuple[Stage, int, int, str | None]


class CoalescingReporter:
    """A report callback for the pipeline's thread that hands reports to `deliver` on `loop`.

    The pipeline reports every item (thousands per export); waking the event loop for each one
    cost an export about 10 % of its time (`python -m bench --only export`). Reports wait in a
    list instead, the newest of a stage replacing the one before it, and they are handed over
    at most every `interval` seconds: `deliver` sees every stage, in order, and its latest
    count, which is all the progress tracker needs (it throttles to 250 ms anyway). `flush()`,
    on the loop, hands over what waits at once (at the end of a run)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[_Report], None],
        *,
        interval: float = 0.05,
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self._interval = interval
        self._lock = threading.Lock()
        self._waiting: list[_Report] = []
        self._woken = False
        self._last = 0.0

    def __call__(self, stage: Stage, current: int, total: int, item: str | None) -> None:
        with self._lock:
            if self._waiting and self._waiting[-1][0] == stage:
                self._waiting[-1] = (stage, current, total, item)
            else:
                self._waiting.append((stage, current, total, item))
            if self._woken:
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        delay = self._last + self._interval - self._loop.time()
        if delay <= 0:
            self.flush()
        else:
            self._loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Hand over every waiting report now (on the loop)."""
        with self._lock:
            taken = self._waiting.copy()
            self._waiting.clear()
            self._woken = False
        self._last = self._loop.time()
        for report in taken:
            self._deliver(report)


"""One pipeline report: stage, items done, items in all, the current item's name."""


class LeaseLost(Exception):
    """Another worker holds the job now: stop without writing anything more."""


@dataclass(eq=False)
class RunningJob:
    """A job this process is running, and the flags its pipeline thread reads."""

    job_id: uuid.UUID
    project_id: str
    state: JobState
    seq: int
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    lease_lost: bool = False
    shutting_down: bool = False

    def stop(self) -> None:
        self.cancel.set()


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Claims and runs jobs until cancelled; `run()` owns every task it starts."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        eventlog: EventLog,
        config: ExportConfig,
        *,
        worker_id: str | None = None,
    ) -> None:
        self._pool = pool
        self._log = eventlog
        self._config = config
        self.worker_id = worker_id or config.worker_id or default_worker_id()
        self._wake = asyncio.Event()
        self._running: dict[uuid.UUID, RunningJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.data_root = Path(config.data_root)
        self.work_root = Path(config.work_root)
        self.archive_root = Path(config.archive_root)
        # NOTIFY wake-ups: a job was queued somewhere, or a cancel was requested. Work queued
        # while we were not listening is looked for on every (re)connect.
        self._listener = Listener(
            config.database_url,
            {JOBS_CHANNEL: lambda _payload: self.wake(), CANCEL_CHANNEL: self._on_cancel_notice},
            on_connected=self.wake,
            name="worker",
        )
        self.shutdown_grace = 10.0
        # A seam for tests of the cancel-versus-complete race: awaited with the archive ready,
        # just before `completed` is appended.
        self.before_outcome: Callable[[uuid.UUID], Awaitable[None]] | None = None
        self._queues: dict[uuid.UUID, asyncio.Queue[_Report | None]] = {}
        self._checks: set[asyncio.Task[None]] = set()

    # -- control ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for work now (a job was queued or a slot freed)."""
        self._wake.set()

    def cancel_local(self, job_id: uuid.UUID) -> bool:
        """Stop a job this process runs at its current item; False if it runs elsewhere."""
        job = self._running.get(job_id)
        if job is None:
            return False
        job.stop()
        return True

    @property
    def listening(self) -> bool:
        return self._listener.connected

    @property
    def running(self) -> list[uuid.UUID]:
        return list(self._running)

    async def run(self) -> None:
        """Claim and run jobs until cancelled; on the way out give running jobs back."""
        self.archive_root.mkdir(parents=True, exist_ok=True)
        self.work_root.mkdir(parents=True, exist_ok=True)
        helpers = [
            asyncio.create_task(self._listener.run(), name="worker-listen"),
            asyncio.create_task(self._heartbeat(), name="worker-heartbeat"),
        ]
        try:
            while True:
                await wait_event(self._wake, self._config.poll_interval)
                self._wake.clear()
                try:
                    await self._claim()
                except DATABASE_ERRORS as exc:
                    log.warning("claiming work failed; retrying", error=repr(exc))
        finally:
            # Stop listening, but keep renewing leases until the jobs have stopped: a lease that
            # ran out now would let another process take over a job still running here.
            listener, heartbeat = helpers
            for helper in [listener, *self._checks]:
                helper.cancel()
            for job in self._running.values():
                job.shutting_down = True
                job.stop()
            if self._tasks:
                # Running jobs stop at their next item and hand their lease back; a job that
                # does not manage it in time is cancelled, so shutdown always ends.
                _done, pending = await asyncio.wait(self._tasks, timeout=self.shutdown_grace)
                for task in pending:
                    log.warning("export job did not stop in time; cancelling", task=task.get_name())
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5)
            heartbeat.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper

    async def _claim(self) -> None:
        free = self._config.workers - len(self._running)
        if free <= 0:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            # One claim at a time across processes, so the per-user limit counts every lease.
            await conn.execute("SELECT pg_advisory_xact_lock(1162628167, 17)")
            rows = await conn.fetch(
                QUERIES["claim_jobs"],
                self.worker_id,
                free,
                self._config.lease_seconds,
                self._config.per_user_limit,
                # Never a job this process still runs: after an outage longer than the lease,
                # its own lease has run out too, and it would run the job twice.
                list(self._running),
            )
        for row in rows:
            state = _state_decoder.decode(row["state"])
            job = RunningJob(
                job_id=row["job_id"],
                project_id=row["project_id"],
                state=state,
                seq=row["last_seq"],
                attempt=row["attempts"],
            )
            self._running[job.job_id] = job
            task = asyncio.create_task(
                self._run_job(job, previous_owner=row["previous_owner"]),
                name=f"export-{job.job_id}",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one job ---------------------------------------------------------------------------

    async def _run_job(self, job: RunningJob, *, previous_owner: str | None) -> None:
        # Every log line of this job's task, whichever module writes it, names the job.
        structlog.contextvars.bind_contextvars(
            job_id=str(job.job_id), project_id=job.state.project_id, worker=self.worker_id
        )
        bound = log.bind(job_id=str(job.job_id), worker=self.worker_id)
        log.info("export job claimed", seq=job.state.seq, previous_owner=previous_owner)
        try:
            await self._execute(job, previous_owner, bound)
        except LeaseLost:
            bound.warning("lease lost: another worker has the job")
        except _CancelWon:
            # A cancel or another outcome got in before our append; the log decides.
            shutil.rmtree(self.work_root / str(job.job_id), ignore_errors=True)
            if not job.state.is_terminal:
                await self._cancelled(job)
        except Exception:
            bound.exception("export job crashed")
            with contextlib.suppress(Exception):
                await self._finish(
                    job,
                    Failed(
                        code="internal",
                        message=message("export.failed.internal"),
                        retryable=True,
                        progress=job.state.progress,
                    ),
                )
            if job.state.status != "completed" and not job.lease_lost:
                # An archive published by a transaction that then failed must not linger.
                await asyncio.to_thread(shutil.rmtree, self.archive_root / str(job.job_id), True)
        finally:
            log.info(
                "export job left",
                status=job.state.status,
                seq=job.state.seq,
                handed_back=job.shutting_down,
                lease_lost=job.lease_lost,
            )
            self._running.pop(job.job_id, None)
            if not job.shutting_down and not job.lease_lost:
                # The job has ended (or failed to start): its scratch space goes with it. A job
                # handed back keeps it, so that the next worker can resume from it.
                await asyncio.to_thread(
                    shutil.rmtree, self.work_root / str(job.job_id), ignore_errors=True
                )
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    if job.shutting_down:
                        # Give the job back at once: another process resumes it, and a
                        # graceful hand-back does not count against the job's attempts.
                        await conn.execute(QUERIES["hand_back"], job.job_id, self.worker_id)
                    else:
                        await conn.execute(QUERIES["release_lease"], job.job_id, self.worker_id)
            self.wake()

    async def _execute(
        self, job: RunningJob, previous_owner: str | None, bound: structlog.BoundLogger
    ) -> None:
        state = job.state
        if state.is_terminal:
            return
        work_dir = self.work_root / str(job.job_id)
        if job.attempt > self._config.max_attempts:
            shutil.rmtree(work_dir, ignore_errors=True)
            await self._finish(
                job,
                Failed(
                    code="worker_lost",
                    message=message("export.failed.worker_lost", attempts=job.attempt - 1),
                    retryable=True,
                    progress=state.progress,
                ),
            )
            return
        if state.status == "cancelling":
            shutil.rmtree(work_dir, ignore_errors=True)
            await self._cancelled(job)
            return

        reporter = self._reporter(job)
        pipeline = ExportPipeline(
            self.data_root / job.project_id,
            work_dir,
            state.options,
            report=reporter,
            is_cancelled=job.cancel.is_set,
            archive_name=f"{job.project_id}-export-{str(job.job_id)[:8]}.zip",
        )
        try:
            plan = await asyncio.to_thread(pipeline.plan)
        except PipelineError as exc:
            await self._clean(pipeline)
            await self._failed(job, exc)
            return
        total_items = sum(items for _, items in plan)
        done: frozenset[Stage] = frozenset()
        if state.status == "queued":
            await self._append(
                job,
                Started(worker_id=self.worker_id, attempt=job.attempt, total_items=total_items),
            )
        else:
            done = _finished_stages(state, [stage for stage, _ in plan])
            await self._append(
                job,
                Resumed(
                    worker_id=self.worker_id,
                    previous_worker=previous_owner or "",
                    attempt=job.attempt,
                    from_stage=next((s for s, _ in plan if s not in done), None),
                ),
            )
        bound.info("export started", attempt=job.attempt, items=total_items)

        weights = stage_weights(plan)
        tracker = ProgressTracker(
            weights or {stage: 1.0 for stage, _ in plan} or {"compression": 1.0},
            # A resumed job redoes part of a stage: its reports start from what the log shows.
            start_progress=state.progress if state.phase == "processing" else 0.0,
        )
        started = time.monotonic()
        reports: asyncio.Queue[_Report | None] = asyncio.Queue()
        self._queues[job.job_id] = reports
        pump = asyncio.create_task(self._pump(job, tracker, reports))
        try:
            try:
                result = await asyncio.to_thread(pipeline.run, done_stages=done)
            finally:
                reporter.flush()  # the last reports before the end
                reports.put_nowait(None)
                await pump
                self._queues.pop(job.job_id, None)
        except PipelineCancelled:
            # Scratch files stay for whoever resumes the job (a hand-back) or owns it now (a
            # lost lease); only a real cancel cleans up.
            if job.lease_lost:
                raise LeaseLost from None
            if job.shutting_down:
                bound.info("export handed back for another process to resume")
                return
            await self._cancelled(job, cleanup_completed=await self._clean(pipeline))
            return
        except PipelineError as exc:
            await self._clean(pipeline)
            await self._failed(job, exc)
            return

        final = tracker.flush(asyncio.get_running_loop().time())
        archive_dir = self.archive_root / str(job.job_id)
        archive_path = archive_dir / result.file_name
        completed = Completed(
            archive=ArchiveInfo(
                file_name=result.file_name, size_bytes=result.size_bytes, sha256=result.sha256
            ),
            processing_time_ms=int((time.monotonic() - started) * 1000),
            message=message("export.completed", file=result.file_name, bytes=result.size_bytes),
        )

        async def publish() -> None:
            # Inside the fenced transaction: only the lease holder puts its archive in place,
            # and it is there before `completed` becomes visible.
            if not archive_path.exists():
                archive_dir.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(shutil.move, result.path, archive_path)

        if self.before_outcome is not None:
            await self.before_outcome(job.job_id)
        events: list[EventData] = [*([final] if final else []), completed]
        try:
            await self._append(job, *events, prepare=publish)
        except (JobClosedError, _CancelWon):
            # The cancel committed first: it wins, and no archive may remain.
            if job.state.status != "completed":
                await asyncio.to_thread(shutil.rmtree, archive_dir, True)
            await self._clean(pipeline)
            await self._cancelled(job)
            return
        await self._clean(pipeline)
        bound.info("export completed", bytes=result.size_bytes, seq=job.seq)

    async def _clean(self, pipeline: ExportPipeline) -> bool:
        """Remove the job's scratch files and partial archive; False if some could not be."""
        try:
            await asyncio.to_thread(pipeline.cleanup)
        except OSError as exc:
            log.warning("export clean-up incomplete", error=repr(exc))
            return False
        return True

    # -- reporting -------------------------------------------------------------------------

    def _reporter(self, job: RunningJob) -> CoalescingReporter:
        """The pipeline thread's report callback: reports reach the job's queue on the loop."""

        def deliver(report: _Report) -> None:
            queue = self._queues.get(job.job_id)
            if queue is not None:
                queue.put_nowait(report)

        return CoalescingReporter(asyncio.get_running_loop(), deliver)

    async def _pump(
        self,
        job: RunningJob,
        tracker: ProgressTracker,
        reports: asyncio.Queue[_Report | None],
    ) -> None:
        """Throttled progress into the log, one append at a time; heartbeats in quiet spells."""
        loop = asyncio.get_running_loop()
        while True:
            report: _Report | bool | None
            try:
                report = await within(reports.get(), 0.25)
            except TimeoutError:
                report = False  # nothing new: maybe a heartbeat is due
            if report is None:
                return
            now = loop.time()
            progress: Progress | None
            if report is False:
                progress = tracker.tick(now)
            else:
                stage, current, total, item = report  # type: ignore[misc]
                progress = tracker.update(stage, current, total, item, now)
            if progress is None or job.cancel.is_set():
                continue
            try:
                await self._append(job, progress)
            except (ConflictError, JobClosedError, _CancelWon):
                job.stop()
            except LeaseLost:
                job.stop()
            except DATABASE_ERRORS as exc:
                # Progress is informative; a lost report is replaced by the next one.
                log.warning("progress append failed", job_id=str(job.job_id), error=repr(exc))

    async def _append(
        self,
        job: RunningJob,
        *data: EventData,
        prepare: Callable[[], Awaitable[None]] | None = None,
        outcome_of_cancel: bool = False,
    ) -> None:
        """Append to the job at the seq we know, fenced by our lease; on conflict re-read.

        Each append runs in a transaction that first checks (and extends) this worker's lease on
        the job, so a worker that lost the job can never write to it again. `prepare` runs inside
        that transaction, before the append (putting the archive in place for `completed`).
        Raises _CancelWon when a cancel or another outcome got in first (unless this append is
        the cancel's own outcome), LeaseLost when another worker holds the job.
        """
        events = [NewEvent(data=d, actor=f"worker:{self.worker_id}") for d in data]
        # A database that is restarting is waited for (the same event ids make a retry safe),
        # for as long as the lease would have lasted; conflicts are re-read, five at most.
        give_up = time.monotonic() + self._config.lease_seconds
        pause = 0.05
        conflicts = 0
        while conflicts < 5:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    fenced = await conn.fetchval(
                        QUERIES["lease_fence"],
                        job.job_id,
                        self.worker_id,
                        self._config.lease_seconds,
                    )
                    if fenced is None:
                        job.lease_lost = True
                        job.stop()
                        raise LeaseLost
                    if prepare is not None:
                        await prepare()
                    result = await self._log.append(job.job_id, job.seq, events, conn=conn)
            except ConflictError:
                conflicts += 1
                await self._refresh(job, outcome_of_cancel=outcome_of_cancel)
                continue
            except DATABASE_ERRORS as exc:
                if time.monotonic() + pause > give_up:
                    raise
                log.warning("append failed; retrying", error=repr(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            self._log.committed()
            job.seq = result.last_seq
            if result.state is not None:
                job.state = result.state
            return
        raise ConflictError(job.job_id, job.seq, job.seq)

    async def _refresh(self, job: RunningJob, *, outcome_of_cancel: bool = False) -> None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["job_lease"], job.job_id)
        if row is None or row["lease_owner"] != self.worker_id:
            job.lease_lost = True
            job.stop()
            raise LeaseLost
        state = _state_decoder.decode(row["state"])
        job.state, job.seq = state, state.seq
        if state.is_terminal or (state.status == "cancelling" and not outcome_of_cancel):
            job.stop()
            raise _CancelWon

    async def _finish(self, job: RunningJob, outcome: EventData) -> None:
        await self._append(job, outcome)

    async def _cancelled(self, job: RunningJob, *, cleanup_completed: bool = True) -> None:
        # Read the job as the log has it now: the cancel request (and who made it) arrived
        # after our last append.
        fresh = await self._log.job_state(job.job_id)
        if fresh is not None:
            job.state, job.seq = fresh, fresh.seq
        state = job.state
        if state.is_terminal:
            return
        by: CancelledBy = "user" if state.cancel_requested_by else "system"
        outcome = Cancelled(
            cancelled_by=by,
            progress=state.progress,
            cleanup_completed=cleanup_completed,
            message=message("export.cancelled", progress=round(state.progress)),
        )
        with contextlib.suppress(_CancelWon, JobClosedError):
            await self._append(job, outcome, outcome_of_cancel=True)

    async def _failed(self, job: RunningJob, error: PipelineError) -> None:
        outcome = Failed(
            stage=error.stage,
            code=error.code,
            message=message(
                key if (key := f"export.failed.{error.code}") in CATALOGUE else "export.failed",
                detail=error.message,
                code=error.code,
            ),
            retryable=error.retryable,
            progress=job.state.progress,
        )
        try:
            await self._finish(job, outcome)
        except (_CancelWon, JobClosedError):
            await self._cancelled(job)

    # -- liveness and signals ----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Renew the leases of running jobs; notice cancels and takeovers the log shows."""
        interval = max(self._config.lease_seconds / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            if not self._running:
                continue
            ids = list(self._running)
            try:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch(
                        QUERIES["renew_leases"], self.worker_id, ids, self._config.lease_seconds
                    )
            except DATABASE_ERRORS as exc:
                log.warning("lease renewal failed", error=repr(exc))
                continue
            held = {row["job_id"]: row["status"] for row in rows}
            for job_id in ids:
                job = self._running.get(job_id)
                if job is None:
                    continue
                if job_id not in held:
                    job.lease_lost = True
                    job.stop()
                elif held[job_id] in ("cancelling", "cancelled", "failed", "completed"):
                    job.stop()

    def _on_cancel_notice(self, payload: str) -> None:
        try:
            job_id = uuid.UUID(payload)
        except ValueError:
            return
        job = self._running.get(job_id)
        if job is None:
            return
        check = asyncio.get_running_loop().create_task(self._check_cancel(job))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _check_cancel(self, job: RunningJob) -> None:
        # A NOTIFY is only a hint: stop the job only if the log says its cancel was requested.
        try:
            state = await self._log.job_state(job.job_id)
        except DATABASE_ERRORS:
            return  # the heartbeat looks again soon
        if state is not None and (state.status == "cancelling" or state.is_terminal):
            job.stop()


class _CancelWon(Exception):
    """A cancel (or another outcome) committed before our append."""


def _finished_stages(state: JobState, stages: list[Stage]) -> frozenset[Stage]:
    """Stages the log shows as finished: those before the last reported stage, and that one
    when its last report had every item done."""
    if state.stage is None or state.stage not in stages:
        return frozenset()
    index = stages.index(state.stage)
    done = set(stages[:index])
    progress = state.stage_progress
    if progress is not None and progress.total > 0 and progress.current >= progress.total:
        done.add(state.stage)
    return frozenset(done)
