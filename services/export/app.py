"""The export service's aiohttp application: create_app(config) -> web.Application.

Resources are opened and closed in one cleanup context, in a known order: the pool, then the
notifier, the worker and the archive retention sweeper; on the way out the sweeper finishes its
batch, the worker hands its running jobs back, then the notifier stops, then the pool closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from services.common.auth import TokenVerifier
from services.common.db import check_server_settings, create_pool, migrate, pending_migrations
from services.common.eventlog import AppendMetrics, EventLog, GroupCommit
from services.common.gcpacer import GcPacer
from services.common.logs import quiet_unparsable_requests
from services.common.looplag import LoopLag
from services.common.notifier import Notifier
from services.common.timing import within
from services.common.web import HttpMetrics, error_middleware, error_response, json_response

from . import api, audit, download, openapi, streams, webroot
from .config import ExportConfig
from .keys import (
    CONFIG,
    EVENTLOG,
    GC_PACER,
    JOB_COUNTS,
    METRICS,
    NOTIFIER,
    POOL,
    STREAMS,
    TASKS,
    VERIFIER,
    WORKER,
)
from .metrics import JobCounts
from .retention import RetentionSweeper, retention_seconds
from .worker import Worker

log = structlog.get_logger(__name__)

GC_PERIOD = 60.0
"""Seconds between the export service's full garbage collections (see `gc_pacer`)."""
GC_YOUNG = 10_000
"""New objects between two young collections, where CPython's default is 700. An append lives
for a group commit's turn, long enough for 700 new objects to come and go many times, so with
the default nearly every object of an append was walked by a young collection and again by a
middle one before it died. Measured at 20,000 appends/s offered from 1,000 jobs (2-core AMD
EPYC, the probe of the README's eighth round, interleaved): p99 29 to 46 ms against 63 to 617
with 700 while the machine ran fast, 224 to 407 against 301 to 917 while it ran slow, 1 to
2 µs less of the writer's CPU per append; 50,000 made each young collection long enough to show
in the p99 (71 to 165 ms)."""


def gc_pacer() -> GcPacer:
    """The schedule of full collections the export service runs its process on: one a minute
    (at most 2 % of the time), none in between, and a young collection every `GC_YOUNG` new
    objects; see `services.common.gcpacer`. The appends benchmark installs the same one, so
    that its group-commit figures are the service's."""
    return GcPacer(max_period=GC_PERIOD, young=GC_YOUNG)


async def _end_streams(app: web.Application) -> None:
    """Server-Sent Events streams never end by themselves: end them so shutdown does not wait
    for them (their clients reconnect with Last-Event-ID)."""
    if STREAMS in app:
        app[STREAMS].close_all()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    pool = await create_pool(
        config.database_url, min_size=config.pool_min, max_size=config.pool_max
    )
    notifier = Notifier(config.database_url)
    tasks: list[asyncio.Task[None]] = []
    try:
        async with pool.acquire() as conn:
            if config.migrate:
                await migrate(conn)
            await check_server_settings(conn)
        group = (
            GroupCommit(
                max_batch=config.append_batch_max,
                in_flight=config.append_in_flight,
                min_alongside=config.append_min_alongside,
                max_wait=config.append_max_wait,
            )
            if config.append_batch_max > 0
            else None
        )
        registry = app[METRICS].registry
        metrics = AppendMetrics(registry, "export")
        if config.notify == "transaction":
            eventlog = EventLog(pool, notify=True, group_commit=group, metrics=metrics)
        else:
            eventlog = EventLog(
                pool,
                notify=False,
                on_commit=notifier.poke,
                group_commit=group,
                metrics=metrics,
            )
        worker = Worker(pool, eventlog, config)
        app[POOL] = pool
        app[NOTIFIER] = notifier
        app[EVENTLOG] = eventlog
        app[WORKER] = worker
        app[TASKS] = tasks
        job_counts = JobCounts(pool, registry, interval=config.metrics_interval)
        app[JOB_COUNTS] = job_counts
        Gauge("db_pool_connections", "Open database connections", registry=registry).set_function(
            pool.get_size
        )
        Gauge("export_jobs_running", "Exports this process runs", registry=registry).set_function(
            lambda: len(worker.running)
        )
        tasks.append(asyncio.create_task(notifier.run(), name="notifier"))
        tasks.append(asyncio.create_task(worker.run(), name="worker"))
        tasks.append(asyncio.create_task(job_counts.run(), name="job-counts"))
        tasks.append(asyncio.create_task(LoopLag(registry, "export").run(), name="loop-lag"))
        pacer = app.get(GC_PACER)
        if pacer is not None:
            # Nothing here ends in cycles the way a gateway's connections do: the period alone.
            tasks.append(asyncio.create_task(pacer.run(lambda: 0), name="gc-pacer"))
        sweeper = RetentionSweeper(pool, eventlog, config, registry=registry)
        if sweeper.enabled:  # stopped before the worker: it may finish its batch
            tasks.append(asyncio.create_task(sweeper.run(), name="retention"))
        hub = streams.StreamHub(eventlog, config.database_url, poll_interval=config.poll_interval)
        app[STREAMS] = hub
        head = await eventlog.head_position()
        tasks.append(asyncio.create_task(hub.run(start=head), name="stream-hub"))
        for task in tasks:
            task.add_done_callback(_report_death)
        yield
    finally:
        for task in reversed(tasks):  # the worker first: it still appends while stopping
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task had failed", task=task.get_name())
        if EVENTLOG in app:
            await app[EVENTLOG].aclose()
        try:
            await within(pool.close(), 10)
        except TimeoutError:
            log.warning("database connections still busy at shutdown; terminating them")
            pool.terminate()


def _report_death(task: asyncio.Task[None]) -> None:
    """A background task must run as long as the app: say so loudly if one stops early."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task stopped", task=task.get_name(), exc_info=task.exception())


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers and every migration is applied."""
    try:
        async with request.app[POOL].acquire(timeout=2) as conn:
            pending = await pending_migrations(conn)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        log.warning("not ready: database unavailable", error=repr(exc))
        return error_response(503, "database_unavailable", "the database does not answer")
    if pending:
        log.warning("not ready: migrations pending", versions=pending)
        return error_response(503, "migrations_pending", "database migrations are pending")
    if any(task.done() for task in request.app[TASKS]):
        return error_response(503, "worker_stopped", "the export worker is not running")
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def _verifier(config: ExportConfig) -> TokenVerifier:
    if not config.jwt_secret and not config.jwt_public_key:
        raise ValueError("set EXPORT_JWT_SECRET (or JWT_SECRET) or EXPORT_JWT_PUBLIC_KEY")
    if config.notify not in ("after-commit", "transaction"):
        raise ValueError(f"EXPORT_NOTIFY={config.notify!r}: expected after-commit or transaction")
    return TokenVerifier(
        secret=config.jwt_secret or None,
        public_key=config.jwt_public_key or None,
        audience=config.jwt_audience or None,
        issuer=config.jwt_issuer or None,
    )


def create_app(config: ExportConfig, *, gc_pacer: GcPacer | None = None) -> web.Application:
    """The export service; raises ValueError for configuration it cannot run with.

    `gc_pacer`, installed for the process by its caller (`python -m services.export` does, as
    `EXPORT_GC_PACING` says), runs its full collections while the app runs."""
    verifier = _verifier(config)
    retention_seconds(config)  # refuse a bad EXPORT_ARCHIVE_RETENTION before serving
    webroot.check_web_root(config.web_root)
    http_metrics = HttpMetrics(CollectorRegistry(), "export")
    quiet_unparsable_requests()
    app = web.Application(
        middlewares=[
            error_middleware(http_metrics),
            api.auth_middleware,
            audit.audit_reads_middleware,
        ],
        client_max_size=api.MAX_BODY,
    )
    app[CONFIG] = config
    app[METRICS] = http_metrics
    app[VERIFIER] = verifier
    if gc_pacer is not None:
        app[GC_PACER] = gc_pacer
        gc_pacer.expose(http_metrics.registry, "export", "once a minute")
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_end_streams)
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi.openapi_json),
            *api.routes(),
            *audit.routes(),
            *streams.routes(),
            web.get("/projects/{project_id}/export/{job_id}/download", download.download_export),
            *webroot.routes(),
        ]
    )
    return app
