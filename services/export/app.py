"""The export service's aiohttp application: create_app(config) -> web.Application."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from schemas.events import Event
from services.common.db import create_pool, migrate, pending_migrations
from services.common.eventlog import EventLog
from services.common.notifier import Notifier
from services.common.web import HttpMetrics, error_middleware, error_response, json_response

from .config import ExportConfig

log = structlog.get_logger(__name__)

CONFIG = web.AppKey("config", ExportConfig)
POOL = web.AppKey("pool", asyncpg.Pool)
EVENTLOG = web.AppKey("eventlog", EventLog)
METRICS = web.AppKey("metrics", HttpMetrics)
NOTIFIER = web.AppKey("notifier", Notifier)

MAX_PAGE = 1000


class JobStatusResponse(msgspec.Struct, frozen=True, rename="camel"):
    seq: int
    state: object


class EventPage(msgspec.Struct, frozen=True, rename="camel"):
    events: list[Event]
    next_cursor: int
    """Pass back as afterSeq (a job's events) or after (the log) for the next page."""
    has_more: bool


async def _database(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.notify not in ("after-commit", "transaction"):
        raise ValueError(f"EXPORT_NOTIFY={config.notify!r}: expected after-commit or transaction")
    pool = await create_pool(
        config.database_url, min_size=config.pool_min, max_size=config.pool_max
    )
    notifier = Notifier(config.database_url)
    notifying = asyncio.create_task(notifier.run(), name="notifier")
    try:
        if config.migrate:
            async with pool.acquire() as conn:
                await migrate(conn)
        app[POOL] = pool
        app[NOTIFIER] = notifier
        if config.notify == "transaction":
            app[EVENTLOG] = EventLog(pool, notify=True)
        else:
            app[EVENTLOG] = EventLog(pool, notify=False, on_commit=notifier.poke)
        pool_size = Gauge(
            "db_pool_connections", "Open database connections", registry=app[METRICS].registry
        )
        pool_size.set_function(pool.get_size)
        yield
    finally:
        notifying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await notifying
        await pool.close()


def _job_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["job_id"])
    except ValueError:
        raise web.HTTPBadRequest(reason="job id must be a UUID") from None


def _int_query(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be between {low} and {high}")
    return value


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers and every migration is applied."""
    try:
        async with request.app[POOL].acquire(timeout=2) as conn:
            pending = await pending_migrations(conn)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return error_response(
            503, "database_unavailable", f"database unavailable: {type(exc).__name__}"
        )
    if pending:
        return error_response(503, "migrations_pending", f"migrations not applied: {pending}")
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def job_status(request: web.Request) -> web.Response:
    """A job's state, the fold of its events, and the seq it reflects."""
    job_id = _job_id(request)
    state = await request.app[EVENTLOG].job_state(job_id)
    if state is None:
        raise web.HTTPNotFound(reason=f"no job {job_id}")
    return json_response(JobStatusResponse(seq=state.seq, state=state))


async def job_events(request: web.Request) -> web.Response:
    """A job's events after afterSeq, in seq order, a page at a time."""
    job_id = _job_id(request)
    after = _int_query(request, "afterSeq", 0, low=0, high=2**31 - 1)
    limit = _int_query(request, "limit", MAX_PAGE, low=1, high=MAX_PAGE)
    events = await request.app[EVENTLOG].read_stream(job_id, after, limit + 1)
    if not events and after == 0 and await request.app[EVENTLOG].job_state(job_id) is None:
        raise web.HTTPNotFound(reason=f"no job {job_id}")
    page = events[:limit]
    return json_response(
        EventPage(
            events=page,
            next_cursor=page[-1].seq if page else after,
            has_more=len(events) > limit,
        )
    )


async def log_events(request: web.Request) -> web.Response:
    """The whole log after a position, in position order, a page at a time."""
    after = _int_query(request, "after", 0, low=0, high=2**63 - 1)
    limit = _int_query(request, "limit", MAX_PAGE, low=1, high=MAX_PAGE)
    events = await request.app[EVENTLOG].tail(after, limit + 1)
    page = events[:limit]
    return json_response(
        EventPage(
            events=page,
            next_cursor=page[-1].position if page else after,
            has_more=len(events) > limit,
        )
    )


async def verify_job(request: web.Request) -> web.Response:
    """Recompute a job's hash chain and name its first broken link."""
    job_id = _job_id(request)
    report = await request.app[EVENTLOG].verify(job_id)
    if report.events_checked == 0 and report.broken is None:
        raise web.HTTPNotFound(reason=f"no job {job_id}")
    return json_response(report)


def create_app(config: ExportConfig) -> web.Application:
    """The export service, its resources opened and closed in one cleanup context."""
    http_metrics = HttpMetrics(CollectorRegistry(), "export")
    app = web.Application(middlewares=[error_middleware(http_metrics)], client_max_size=1 << 20)
    app[CONFIG] = config
    app[METRICS] = http_metrics
    app.cleanup_ctx.append(_database)
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/v1/jobs/{job_id}", job_status),
            web.get("/v1/jobs/{job_id}/events", job_events),
            web.get("/v1/jobs/{job_id}/verify", verify_job),
            web.get("/v1/events", log_events),
        ]
    )
    return app
