"""The export HTTP API: the paths the seeds' frontend calls, answered from the log.

Every request carries a bearer JWT. A caller reaches only the projects its token names (auditors
read every project, and change nothing). Job state is always the fold of the job's events, read
from the projection that the append writes in the same transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import structlog
from aiohttp import web

from schemas.events import Cancelled, CancelRequested, Event, ExportOptions, Queued
from schemas.messages import message
from schemas.state import JobState
from services.common.auth import AuthError, Principal, bearer_token
from services.common.eventlog import ConflictError, JobClosedError, NewEvent
from services.common.ids import uuid7
from services.common.queries import QUERIES
from services.common.web import error_response, json_response

from .keys import CONFIG, EVENTLOG, NOTIFIER, POOL, VERIFIER, WORKER
from .worker import CANCEL_CHANNEL, JOBS_CHANNEL

log = structlog.get_logger(__name__)

PRINCIPAL = web.RequestKey("principal", Principal)
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/demo",
        "/demo/{path}",
        "/demo/config.json",
    }
)
"""Routes (as their templates: `/demo/{path}` is every file of the demo page) open to all."""
MAX_BODY = 1 << 20
"""The largest request body the service reads (aiohttp's `client_max_size`); beyond, 413. The
API's bodies (export options, consumers, acks) are a few hundred bytes."""
MAX_PAGE = 1000
MAX_HISTORY_PAGE = 100
MAX_IDEMPOTENCY_KEY = 200
PROJECT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

_options_decoder = msgspec.json.Decoder(ExportOptions)
_state_decoder = msgspec.json.Decoder(JobState)


# -- wire types ------------------------------------------------------------------------------


class ExportAccepted(msgspec.Struct, frozen=True, rename="camel"):
    job_id: uuid.UUID
    seq: int
    status: str
    status_url: str
    events_url: str


class JobStatus(msgspec.Struct, frozen=True, rename="camel"):
    job_id: uuid.UUID
    seq: int
    state: JobState
    queue_position: int | None = None


class CancelAccepted(msgspec.Struct, frozen=True, rename="camel"):
    job_id: uuid.UUID
    seq: int
    """The seq of the cancel-requested event."""
    already_requested: bool = False


class Outcome(msgspec.Struct, frozen=True, rename="camel"):
    code: str
    message: str
    outcome: str
    seq: int


class OutcomeError(msgspec.Struct, frozen=True):
    error: Outcome


class EventPage(msgspec.Struct, frozen=True, rename="camel"):
    events: list[Event]
    next_cursor: int
    """Pass back as afterSeq (a job's events) or after (the log) for the next page."""
    has_more: bool


class HistoryItem(msgspec.Struct, frozen=True, rename="camel"):
    job_id: uuid.UUID
    status: str
    seq: int
    created_at: datetime
    state: JobState


class HistoryPage(msgspec.Struct, frozen=True, rename="camel"):
    jobs: list[HistoryItem]
    next_cursor: str | None


# -- authentication --------------------------------------------------------------------------


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Attach the caller's principal, or answer 401 with the reason."""
    resource = request.match_info.route.resource
    if request.path in PUBLIC_PATHS or (
        resource is not None and resource.canonical in PUBLIC_PATHS
    ):
        response: web.StreamResponse = await handler(request)
        return response
    try:
        principal = request.app[VERIFIER].verify(bearer_token(request.headers.get("Authorization")))
    except AuthError as exc:
        response = error_response(401, "unauthorized", str(exc))
        response.headers["WWW-Authenticate"] = 'Bearer realm="exportlog"'
        return response
    request[PRINCIPAL] = principal
    unstorable = _unstorable_text(request)
    if unstorable is not None:
        return error_response(400, "bad_request", unstorable)
    response = await handler(request)
    return response


def _unstorable_text(request: web.Request) -> str | None:
    """Why the path or the query cannot be taken as text, if it cannot.

    A NUL character decoded from `%00` is valid in a URL but not in a PostgreSQL string: an
    auditor's read, whose path and parameters are recorded before it is served, would fail to
    be recorded and be refused with a 503 that no retry can cure. It is refused here, with a
    400, for every caller alike."""
    if "\x00" in request.path:
        return "the path cannot contain a NUL character (%00)"
    for name, value in request.query.items():
        if "\x00" in name or "\x00" in value:
            return "query parameters cannot contain a NUL character (%00)"
    return None


def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def _project(request: web.Request, *, write: bool = False) -> str:
    project_id = request.match_info["project_id"]
    if not PROJECT_ID.fullmatch(project_id):
        raise web.HTTPBadRequest(
            reason="a project id is 1 to 128 letters, digits, '.', '_' or '-', "
            "and does not start with '.'"
        )
    principal = _principal(request)
    allowed = principal.can_write(project_id) if write else principal.can_read(project_id)
    if not allowed:
        verb = "change" if write else "read"
        raise web.HTTPForbidden(reason=f"this token may not {verb} project {project_id!r}")
    return project_id


def _job_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["job_id"])
    except ValueError:
        raise web.HTTPBadRequest(reason="job id must be a UUID") from None


async def _job_in_project(request: web.Request, project_id: str) -> tuple[uuid.UUID, JobState]:
    job_id = _job_id(request)
    state = await request.app[EVENTLOG].job_state(job_id)
    if state is None or state.project_id != project_id:
        raise web.HTTPNotFound(reason=f"no export {job_id} in project {project_id!r}")
    return job_id, state


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


async def _notify(request: web.Request, channel: str, payload: str) -> None:
    """A hint for other export processes; losing it costs latency, never correctness."""
    try:
        async with request.app[POOL].acquire() as conn:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
    except (OSError, asyncpg.PostgresError) as exc:
        log.warning("notify failed", channel=channel, error=repr(exc))


# -- handlers --------------------------------------------------------------------------------


async def start_export(request: web.Request) -> web.Response:
    """Queue an export of a project. With an Idempotency-Key, a retry returns the same job."""
    project_id = _project(request, write=True)
    principal = _principal(request)
    config = request.app[CONFIG]
    project_dir = Path(config.data_root) / project_id
    if not project_dir.is_dir():
        raise web.HTTPNotFound(reason=f"no project {project_id!r} to export")
    body = await request.read()
    try:
        options = _options_decoder.decode(body) if body.strip() else ExportOptions()
    except msgspec.ValidationError as exc:
        raise web.HTTPUnprocessableEntity(reason=f"invalid export options: {exc}") from None
    except msgspec.DecodeError:
        raise web.HTTPBadRequest(
            reason="the body must be a JSON object of export options"
        ) from None
    if not (
        options.include_original_images
        or options.include_visualizations
        or options.annotation_formats
        or options.metrics_formats
    ):
        raise web.HTTPUnprocessableEntity(reason="the export options select nothing to export")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise web.HTTPBadRequest(
            reason=f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )
    request_hash = hashlib.sha256(msgspec.json.encode(options)).hexdigest()

    eventlog = request.app[EVENTLOG]
    job_id = uuid7()  # sorts by creation: see services/common/ids.py
    async with request.app[POOL].acquire() as conn, conn.transaction():
        if key is not None:
            stored = await conn.fetchval(
                QUERIES["remember_idempotency_key"],
                principal.user_id,
                project_id,
                key,
                request_hash,
                job_id,
            )
            if stored is None:
                previous = await conn.fetchrow(
                    QUERIES["idempotency_key"], principal.user_id, project_id, key
                )
                assert previous is not None
                if previous["request_hash"] != request_hash:
                    raise web.HTTPUnprocessableEntity(
                        reason="this Idempotency-Key was used with different export options"
                    )
                job_id = previous["job_id"]
                # On this connection: a second one from the pool could wait forever for
                # connections held by requests like this one.
                head = await conn.fetchrow(QUERIES["job_head"], job_id)
                assert head is not None
                return _accepted(project_id, job_id, head["last_seq"], head["status"])
        ahead = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'")
        queued = Queued(options=options, requested_by=principal.user_id, queue_position=ahead)
        result = await eventlog.append(
            job_id,
            0,
            [NewEvent(data=queued, actor=principal.actor)],
            project_id=project_id,
            owner_id=principal.user_id,
            conn=conn,
        )
    request.app[NOTIFIER].poke()
    request.app[WORKER].wake()
    await _notify(request, JOBS_CHANNEL, "")
    log.info("export queued", job_id=str(job_id), project_id=project_id, seq=result.last_seq)
    return _accepted(project_id, job_id, result.last_seq, "queued")


def _accepted(project_id: str, job_id: uuid.UUID, seq: int, status: str) -> web.Response:
    base = f"/projects/{project_id}/export/{job_id}"
    return json_response(
        ExportAccepted(
            job_id=job_id,
            seq=seq,
            status=status,
            status_url=f"{base}/status",
            events_url=f"{base}/events?afterSeq={seq}",
        ),
        status=202,
        headers={"Location": f"{base}/status"},
    )


async def export_status(request: web.Request) -> web.Response:
    """The job's state (the fold of its events), the seq it reflects, its place in the queue."""
    project_id = _project(request)
    job_id, state = await _job_in_project(request, project_id)
    position = None
    if state.status == "queued":
        async with request.app[POOL].acquire() as conn:
            position = await conn.fetchval(QUERIES["queue_position"], job_id)
    return json_response(
        JobStatus(job_id=job_id, seq=state.seq, state=state, queue_position=position)
    )


async def cancel_export(request: web.Request) -> web.Response:
    """Request a cancel: 202 with the seq of cancel-requested, 409 when the job has ended."""
    project_id = _project(request, write=True)
    job_id, state = await _job_in_project(request, project_id)
    principal = _principal(request)
    eventlog = request.app[EVENTLOG]
    for _ in range(10):
        if state.is_terminal:
            return _ended(job_id, state)
        if state.status == "cancelling":
            return json_response(
                CancelAccepted(job_id=job_id, seq=state.seq, already_requested=True), status=202
            )
        events = [
            NewEvent(data=CancelRequested(requested_by=principal.user_id), actor=principal.actor)
        ]
        if state.status == "queued":
            # No worker has started it: the cancel is complete at once. A worker that claimed
            # it meanwhile finds its `started` append refused by the seq.
            events.append(
                NewEvent(
                    data=Cancelled(
                        cancelled_by="user",
                        progress=state.progress,
                        cleanup_completed=True,
                        message=message("export.cancelled", progress=0),
                    ),
                    actor=principal.actor,
                )
            )
        try:
            result = await eventlog.append(job_id, state.seq, events)
        except (ConflictError, JobClosedError):
            fresh = await eventlog.job_state(job_id)
            assert fresh is not None
            state = fresh
            continue
        request.app[NOTIFIER].poke()
        if not request.app[WORKER].cancel_local(job_id):
            await _notify(request, CANCEL_CHANNEL, str(job_id))
        log.info("export cancel requested", job_id=str(job_id), seq=result.first_seq)
        return json_response(CancelAccepted(job_id=job_id, seq=result.first_seq), status=202)
    raise web.HTTPServiceUnavailable(reason="the job is changing too fast; try again")


def _ended(job_id: uuid.UUID, state: JobState) -> web.Response:
    return json_response(
        OutcomeError(
            Outcome(
                code="already_ended",
                message=f"export {job_id} has already {state.status}",
                outcome=state.status,
                seq=state.seq,
            )
        ),
        status=409,
    )


async def export_events(request: web.Request) -> web.Response:
    """The job's events after afterSeq, in seq order: the fallback for clients without a socket."""
    project_id = _project(request)
    job_id, _state = await _job_in_project(request, project_id)
    after = _int_query(request, "afterSeq", 0, low=0, high=2**31 - 1)
    limit = _int_query(request, "limit", MAX_PAGE, low=1, high=MAX_PAGE)
    events = await request.app[EVENTLOG].read_stream(job_id, after, limit + 1)
    page = events[:limit]
    return json_response(
        EventPage(
            events=page, next_cursor=page[-1].seq if page else after, has_more=len(events) > limit
        )
    )


async def export_history(request: web.Request) -> web.Response:
    """The project's exports, newest first, a page at a time."""
    project_id = _project(request)
    limit = _int_query(request, "limit", 20, low=1, high=MAX_HISTORY_PAGE)
    created, after_id = _decode_cursor(request.query.get("cursor"))
    async with request.app[POOL].acquire() as conn:
        rows = await conn.fetch(
            QUERIES["project_jobs_page"], project_id, created, after_id, limit + 1
        )
    items = [
        HistoryItem(
            job_id=row["job_id"],
            status=row["status"],
            seq=row["last_seq"],
            created_at=row["created_at"],
            state=_state_decoder.decode(row["state"]),
        )
        for row in rows[:limit]
    ]
    cursor = _encode_cursor(items[-1]) if len(rows) > limit else None
    return json_response(HistoryPage(jobs=items, next_cursor=cursor))


def _encode_cursor(item: HistoryItem) -> str:
    raw = f"{item.created_at.isoformat()}|{item.job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[datetime | None, uuid.UUID | None]:
    if not cursor:
        return None, None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise web.HTTPBadRequest(reason="cursor is not one this API gave out") from None


async def verify_export(request: web.Request) -> web.Response:
    """Recompute the job's hash chain and name its first broken link."""
    project_id = _project(request)
    job_id, _state = await _job_in_project(request, project_id)
    return json_response(await request.app[EVENTLOG].verify(job_id))


async def log_events(request: web.Request) -> web.Response:
    """The whole log after a position: for auditors and subscribing services only."""
    principal = _principal(request)
    if not (principal.is_auditor or "service" in principal.roles):
        raise web.HTTPForbidden(reason="reading the whole log needs the auditor or service role")
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


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}/export"
    return [
        web.post(base, start_export),
        web.get(f"{base}/history", export_history),
        web.get(base + "/{job_id}/status", export_status),
        web.post(base + "/{job_id}/cancel", cancel_export),
        web.get(base + "/{job_id}/events", export_events),
        web.get(base + "/{job_id}/verify", verify_export),
        web.get("/v1/events", log_events),
    ]
