"""Retention: the archive of a completed export expires, and an event says so.

Every export process runs one `RetentionSweeper` (unless `EXPORT_ARCHIVE_RETENTION` is 0). Each
round it takes, in bounded batches, the completed jobs that completed longer ago than the
retention and whose archive has not expired, and appends `export:archive-expired` to each at
the seq it read. Only after that transaction has committed does it delete the archive folders:
the event is the truth, and the file follows it. A crash between the two leaves a folder behind
that the log already calls expired; the first sweep of every process, and one an hour after
that, looks for such folders and deletes them.

Several processes sweep at once without doing anything twice: a batch locks its jobs' rows
(`FOR UPDATE SKIP LOCKED`), so another sweeper skips them, and every append names the seq it
expects, so an append that raced anything else (a download's event, another sweeper) is refused
as a conflict, left alone, and looked at again next round. A round that fails (the database
away, a statement refused) is logged and counted, and the next round starts on time.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas.events import ArchiveExpired
from services.common.eventlog import AppendRequest, AppendResult, EventLog, NewEvent
from services.common.queries import QUERIES

from .config import ExportConfig
from .worker import default_worker_id

log = structlog.get_logger(__name__)

ACTOR = "system:retention"
"""The actor of `export:archive-expired` events."""

LEFTOVER_CHUNK = 1000
"""Archive folders checked against the log per query when looking for leftovers."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in a duration: a plain number of seconds, or parts with units such as `90m`,
    `36h`, `7d`, `1w`, `1d12h`. An empty text is 0. Raises ValueError for anything else."""
    compact = text.strip().lower().replace(" ", "")
    if compact == "":
        return 0.0
    if _SECONDS.fullmatch(compact):
        return float(compact)
    if not _DURATION.fullmatch(compact):
        raise ValueError(f"{text!r} is not a duration")
    return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(compact))


def retention_seconds(config: ExportConfig) -> float:
    """The configured retention in seconds (0: archives are kept forever)."""
    try:
        return parse_duration(config.archive_retention)
    except ValueError:
        raise ValueError(
            f"EXPORT_ARCHIVE_RETENTION={config.archive_retention!r}: expected seconds or a "
            "duration such as 36h or 7d (0 keeps archives forever)"
        ) from None


@dataclass(frozen=True, slots=True)
class SweepResult:
    expired: int = 0
    """Archives whose `export:archive-expired` event this round appended."""
    deferred: int = 0
    """Appends refused (a conflict with a concurrent append): looked at again next round."""
    removed: int = 0
    """Archive folders deleted, after their event (this round's or an earlier one's)."""


class RetentionSweeper:
    """Expires archives past the retention; `run()` sweeps until cancelled."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        eventlog: EventLog,
        config: ExportConfig,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._pool = pool
        self._log = eventlog
        self.retention = retention_seconds(config)
        self.interval = max(config.retention_interval, 0.01)
        self.batch = max(config.retention_batch, 1)
        self.archive_root = Path(config.archive_root)
        self.sweeper_id = config.worker_id or default_worker_id()
        self.shutdown_grace = 10.0
        self.leftover_scan_every = 3600.0
        """Seconds between looks for archive folders whose expiry is logged (the first round
        of every process looks too)."""
        self.rounds = 0
        """Rounds finished, failed ones included (tests wait on it)."""
        self._next_leftover_scan = 0.0
        self._unremoved: set[uuid.UUID] = set()
        self._stopping = False
        registry = registry if registry is not None else CollectorRegistry()
        self.expired_total = Counter(
            "export_archives_expired",
            "Archives expired by retention (export:archive-expired appended)",
            registry=registry,
        )
        self.errors_total = Counter(
            "export_retention_sweep_errors",
            "Retention sweeps that stopped on an error (retried next round)",
            registry=registry,
        )

    @property
    def enabled(self) -> bool:
        return self.retention > 0

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep now and then every `interval` seconds until cancelled.

        On cancellation the batch in flight may finish (its event commits and its files go),
        for `shutdown_grace` seconds at most; no further batch starts.
        """
        log.info(
            "archive retention on",
            retention_seconds=self.retention,
            interval=self.interval,
            sweeper=self.sweeper_id,
        )
        while True:
            current = asyncio.create_task(self._round(), name="retention-sweep")
            try:
                await asyncio.shield(current)
            except asyncio.CancelledError:
                self._stopping = True
                done, _ = await asyncio.wait({current}, timeout=self.shutdown_grace)
                if not done:
                    log.warning("retention sweep did not stop in time; cancelling it")
                    current.cancel()
                    await asyncio.wait({current}, timeout=5)
                raise
            await asyncio.sleep(self.interval)

    async def _round(self) -> None:
        try:
            result = await self.sweep()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.errors_total.inc()
            log.warning("retention sweep failed; retrying next round", error=repr(exc))
        except Exception:
            self.errors_total.inc()
            log.exception("retention sweep crashed; retrying next round")
        else:
            if result.expired or result.removed or result.deferred:
                log.info(
                    "retention sweep",
                    expired=result.expired,
                    removed=result.removed,
                    deferred=result.deferred,
                )
        finally:
            self.rounds += 1

    # -- one round -------------------------------------------------------------------------

    async def sweep(self) -> SweepResult:
        """One round: expire what is due, batch by batch, then delete the archive folders of
        expired jobs (this round's, and leftovers when a look for them is due)."""
        expired = deferred = removed = 0
        if self._unremoved:
            removed += await self._remove(list(self._unremoved))
        while not self._stopping:
            found, done, refused = await self._expire_batch()
            expired += len(done)
            deferred += refused
            removed += await self._remove(done)
            if found < self.batch or not done:
                break
        now = time.monotonic()
        if not self._stopping and now >= self._next_leftover_scan:
            removed += await self._remove_leftovers()
            self._next_leftover_scan = now + self.leftover_scan_every
        return SweepResult(expired=expired, deferred=deferred, removed=removed)

    async def _candidates(self, conn: asyncpg.Connection) -> list[asyncpg.Record]:
        """Jobs due for expiry, locked for the caller's transaction: (job_id, last_seq)."""
        rows: list[asyncpg.Record] = await conn.fetch(
            QUERIES["expirable_archives"], self.retention, self.batch
        )
        return rows

    async def _expire_batch(self) -> tuple[int, list[uuid.UUID], int]:
        """Append `export:archive-expired` to one batch of due jobs in one transaction.

        Returns how many jobs were due, those whose event committed, and how many appends were
        refused (the job moved on since it was read: it is looked at again next round).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await self._candidates(conn)
            if not rows:
                return 0, [], 0
            requests = [
                AppendRequest(
                    job_id=row["job_id"],
                    expected_seq=row["last_seq"],
                    events=[NewEvent(data=ArchiveExpired(reason="retention"), actor=ACTOR)],
                )
                for row in rows
            ]
            results = await self._log.append_many(requests, conn=conn)
        # Committed. Only now may the files go; readers are told first.
        done: list[uuid.UUID] = []
        refused = 0
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, AppendResult):
                done.append(result.job_id)
                log.info("archive expired", job_id=str(result.job_id), seq=result.last_seq)
            else:
                refused += 1
                log.info(
                    "archive expiry deferred to the next sweep",
                    job_id=str(request.job_id),
                    reason=str(result),
                )
        if done:
            self._log.committed()
            self.expired_total.inc(len(done))
        return len(rows), done, refused

    # -- files -----------------------------------------------------------------------------

    async def _remove(self, job_ids: list[uuid.UUID]) -> int:
        """Delete the archive folders of jobs whose expiry is committed; a folder that cannot be
        deleted now is tried again next round."""
        if not job_ids:
            return 0
        removed, failed = await asyncio.to_thread(self._remove_folders, job_ids)
        self._unremoved.difference_update(job_ids)
        self._unremoved.update(failed)
        return removed

    def _remove_folders(self, job_ids: list[uuid.UUID]) -> tuple[int, list[uuid.UUID]]:
        removed = 0
        failed: list[uuid.UUID] = []
        for job_id in job_ids:
            try:
                shutil.rmtree(self.archive_root / str(job_id))
            except FileNotFoundError:
                continue  # gone already, or kept by another process's archive root
            except OSError as exc:
                log.warning(
                    "expired archive not deleted; retrying next round",
                    job_id=str(job_id),
                    error=repr(exc),
                )
                failed.append(job_id)
                continue
            removed += 1
        return removed, failed

    async def _remove_leftovers(self) -> int:
        """Delete archive folders that the log already shows as expired (a process stopped
        between committing the event and deleting the files). Folders of any other job, or
        of no job the log knows, are left alone."""
        folders = await asyncio.to_thread(self._archive_folders)
        removed = 0
        for start in range(0, len(folders), LEFTOVER_CHUNK):
            if self._stopping:
                break
            chunk = folders[start : start + LEFTOVER_CHUNK]
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(QUERIES["expired_among"], chunk)
            gone = [row["job_id"] for row in rows]
            if gone:
                log.info("deleting archives left behind after their expiry", jobs=len(gone))
            removed += await self._remove(gone)
        return removed

    def _archive_folders(self) -> list[uuid.UUID]:
        """Job ids that have a folder in the archive root."""
        found: list[uuid.UUID] = []
        try:
            entries = os.scandir(self.archive_root)
        except FileNotFoundError:
            return found
        with entries:
            for entry in entries:
                try:
                    job_id = uuid.UUID(entry.name)
                except ValueError:
                    continue
                if str(job_id) == entry.name and entry.is_dir(follow_symlinks=False):
                    found.append(job_id)
        return found
