"""Figures of the export service that come from the database rather than from this process:
how many jobs wait and run across every export process (the work queue's depth)."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Gauge

from services.common.queries import QUERIES

log = structlog.get_logger(__name__)

ACTIVE_STATUSES = ("queued", "running", "cancelling")


class JobCounts:
    """`export_jobs{status}` for the statuses of unfinished jobs, read every `interval` seconds
    with one query served by a partial index (finished jobs are never counted: that would scan a
    table that only grows; their outcomes are counted as events appended)."""

    def __init__(self, pool: asyncpg.Pool, registry: CollectorRegistry, interval: float) -> None:
        self._pool = pool
        self._interval = interval
        self._gauge = Gauge(
            "export_jobs",
            "Unfinished jobs in the database, by status (all export processes)",
            ["status"],
            registry=registry,
        )
        self.refreshed = asyncio.Event()
        for status in ACTIVE_STATUSES:
            self._gauge.labels(status).set(0)

    async def refresh(self) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["active_job_counts"])
        counts = {row["status"]: row["count"] for row in rows}
        for status in ACTIVE_STATUSES:
            self._gauge.labels(status).set(counts.get(status, 0))
        self.refreshed.set()

    async def run(self) -> None:
        """Refresh until cancelled; a database that does not answer is retried next round."""
        while True:
            try:
                await self.refresh()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("counting jobs failed; retrying", error=repr(exc))
            except Exception:
                # A figure is not worth stopping for (readiness watches this task).
                log.exception("counting jobs failed; retrying")
            await asyncio.sleep(self._interval)
