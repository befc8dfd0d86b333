"""The auditors' HTTP side: history queries across jobs, job timelines, range verification, and
the record of every read an auditor makes.

    GET /v1/audit/events                         events across jobs, filtered, in cursor pages
                                                 (JSON) or streamed whole (NDJSON, CSV)
    GET /projects/{p}/export/{job}/timeline      a job's events with the time between them
    GET /v1/verify?from=&to=                     the hash chains of a range of the log

An auditor (role `auditor`) reads every project; so does a service (role `service`, which may
read the whole log anyway). Any other token reads the projects it names: asking for another
project is 403, and results never hold another project's events. Every read by an auditor, on
these routes and every other, is written to `audit_reads` before anything is served, finished
with the number of events served (where the route counts them), and logged.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import structlog
from aiohttp import web

from schemas.events import Event, Timestamp
from services.common import audit
from services.common.audit import AuditEvent, EventQuery
from services.common.auth import ALL_PROJECTS, Principal
from services.common.eventlog import event_from_row
from services.common.verify import RangeVerifyReport
from services.common.web import json_response

from .api import MAX_PAGE, PRINCIPAL, PROJECT_ID
from .keys import CONFIG, EVENTLOG, POOL

log = structlog.get_logger(__name__)

MAX_POSITION = 2**63 - 1
MAX_VALUES = 100
"""Values one filter may list (projects, jobs, types, actors)."""
MAX_TEXT = 200
MAX_VERIFY_SPAN = 1_000_000
"""Positions one range verification over HTTP may cover."""
MAX_TIMELINE_PAGE = 1000
VERIFY_ROLES = frozenset({"auditor", "service"})

NDJSON = "application/x-ndjson"
CSV = "text/csv"
FORMATS = {"json": "application/json", "ndjson": NDJSON, "csv": CSV}
_ACCEPTED = {
    "application/json": "json",
    NDJSON: "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    CSV: "csv",
}

REPEATABLE = ("project", "job", "type", "actor")
SINGLE = (
    "occurredFrom",
    "occurredTo",
    "fromPosition",
    "toPosition",
    "after",
    "limit",
    "format",
)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# -- wire types ------------------------------------------------------------------------------


class AuditEventPage(msgspec.Struct, frozen=True, rename="camel"):
    events: list[AuditEvent]
    next_cursor: int
    """Pass back as `after` for the next page."""
    has_more: bool


class TimelineEntry(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    event: Event
    since_previous: float | None
    """Seconds from the previous event's `occurredAt` (null for the job's first event); negative
    when the clocks of the processes that wrote them disagree."""
    since_first: float
    """Seconds from the job's first event's `occurredAt`."""


class JobTimeline(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    job_id: uuid.UUID
    project_id: str
    owner_id: str
    status: str
    first_occurred_at: Timestamp
    entries: list[TimelineEntry]
    next_cursor: int
    """Pass back as `afterSeq` for the next page."""
    has_more: bool


# -- the record of auditors' reads -----------------------------------------------------------


@dataclass(slots=True)
class AuditedRead:
    """What an audited read served; the handlers of the routes that count events update it."""

    rows: int | None = None
    completed: bool = True
    status: int | None = None
    """Set by a handler that has sent its status line (a stream), in case it then fails."""

    def served(self, count: int) -> None:
        self.rows = (self.rows or 0) + count


AUDITED = web.RequestKey("audited_read", AuditedRead)

_START_READ = """
INSERT INTO audit_reads (auditor, roles, method, endpoint, path, filters)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
RETURNING id
"""
_FINISH_READ = """
UPDATE audit_reads
   SET row_count = $2, status = $3, completed = $4, finished_at = now()
 WHERE id = $1
"""
_finishing: set[asyncio.Task[None]] = set()
"""Records being finished after their request was cancelled (a client that hung up)."""


def _filters(request: web.Request) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in request.query.items():
        found.setdefault(name, []).append(value)
    return found


@web.middleware
async def audit_reads_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record every read by an auditor: written before the handler runs, finished after."""
    principal = request.get(PRINCIPAL)
    if principal is None or not principal.is_auditor or request.method not in ("GET", "HEAD"):
        response: web.StreamResponse = await handler(request)
        return response
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else request.path
    filters = _filters(request)
    pool = request.app[POOL]
    try:
        async with pool.acquire() as conn:
            read_id: int = await conn.fetchval(
                _START_READ,
                principal.user_id,
                sorted(principal.roles),
                request.method,
                endpoint,
                request.path,
                msgspec.json.encode(filters).decode(),
            )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        log.error("auditor read not recorded; refused", endpoint=endpoint, error=repr(exc))
        raise web.HTTPServiceUnavailable(
            reason="the read could not be recorded in the audit trail; try again"
        ) from None
    read = AuditedRead()
    request[AUDITED] = read
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except BaseException:
        # Cancelled (the client hung up) or failed: the status sent, if any, is in `read`.
        read.completed = False
        status = read.status or status
        raise
    finally:
        fields = {
            "audit_id": read_id,
            "auditor": principal.user_id,
            "method": request.method,
            "endpoint": endpoint,
            "path": request.path,
            "filters": filters,
            "rows": read.rows,
            "status": status,
            "completed": read.completed and status < 400,
        }
        # Shielded: a request cancelled again meanwhile still gets its record finished.
        task = asyncio.create_task(_finish_read(pool, fields))
        _finishing.add(task)
        task.add_done_callback(_finishing.discard)
        await asyncio.shield(task)


async def _finish_read(pool: asyncpg.Pool, fields: dict[str, Any]) -> None:
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                _FINISH_READ,
                fields["audit_id"],
                fields["rows"],
                fields["status"],
                fields["completed"],
            )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("auditor read not finished in the audit trail", error=repr(exc), **fields)
        return
    log.info("auditor read", **fields)


def _served(request: web.Request, count: int) -> None:
    read = request.get(AUDITED)
    if read is not None:
        read.served(count)


# -- parsing the query -----------------------------------------------------------------------


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(reason=reason)


def _check_names(
    request: web.Request, allowed: tuple[str, ...], repeatable: tuple[str, ...]
) -> None:
    for name in request.query:
        if name not in allowed:
            raise _bad(f"unknown query parameter {name!r}; expected one of " + ", ".join(allowed))
    for name in allowed:
        if name not in repeatable and len(request.query.getall(name, [])) > 1:
            raise _bad(f"{name} may be given once")


def _int(request: web.Request, name: str, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _bad(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low} and {high}")
    return value


def _moment(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    text = raw.strip()
    if " " in text[11:] and not _RFC3339.fullmatch(text):
        # A '+' of the offset that was not percent-encoded arrives as a space.
        head, _, tail = text.rpartition(" ")
        text = f"{head}+{tail}"
    if not _RFC3339.fullmatch(text):
        raise _bad(
            f"{name} must be an RFC 3339 date-time with a time zone, such as "
            "2026-03-01T12:00:00Z or 2026-03-01T13:00:00%2B01:00"
        )
    try:
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"{name} is not a valid date-time: {raw!r}") from None


def _values(request: web.Request, name: str) -> list[str]:
    values = request.query.getall(name, [])
    if len(values) > MAX_VALUES:
        raise _bad(f"{name} may be given at most {MAX_VALUES} times")
    for value in values:
        if not 0 < len(value) <= MAX_TEXT:
            raise _bad(f"{name} must be 1 to {MAX_TEXT} characters")
    return values


def reads_everything(principal: Principal) -> bool:
    """Auditors and services read every project; so does a token naming `*`."""
    return (
        principal.is_auditor or "service" in principal.roles or ALL_PROJECTS in principal.projects
    )


def event_query(request: web.Request, principal: Principal) -> EventQuery:
    """The filters of a history query; 400 or 422 naming the parameter, 403 for a project the
    token does not cover."""
    projects = _values(request, "project")
    for project in projects:
        if not PROJECT_ID.fullmatch(project):
            raise _bad(
                "project must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
            )
    jobs = []
    for raw in _values(request, "job"):
        try:
            jobs.append(uuid.UUID(raw))
        except ValueError:
            raise _bad(f"job must be a UUID, not {raw!r}") from None
    types = _values(request, "type")
    for value in types:
        if ":" not in value:
            raise _bad(f"type must be an event type such as export:failed, not {value!r}")
    actors = _values(request, "actor")
    occurred_from = _moment(request, "occurredFrom")
    occurred_to = _moment(request, "occurredTo")
    if occurred_from and occurred_to and occurred_from > occurred_to:
        raise web.HTTPUnprocessableEntity(reason="occurredFrom must not be after occurredTo")
    from_position = _int(request, "fromPosition", 1, MAX_POSITION)
    to_position = _int(request, "toPosition", 0, MAX_POSITION)
    if from_position is not None and to_position is not None and from_position > to_position:
        raise web.HTTPUnprocessableEntity(reason="fromPosition must not be above toPosition")

    within: frozenset[str] | None = None
    if not reads_everything(principal):
        within = frozenset(principal.projects)
        for project in projects:
            if project not in within:
                raise web.HTTPForbidden(reason=f"this token may not read project {project!r}")
    return EventQuery(
        projects=tuple(projects),
        jobs=tuple(jobs),
        types=tuple(types),
        actors=tuple(actors),
        occurred_from=occurred_from,
        occurred_to=occurred_to,
        from_position=from_position,
        to_position=to_position,
        within=within,
    )


def _format(request: web.Request) -> str:
    """json, ndjson or csv: the `format` parameter, else the first of them `Accept` names."""
    chosen = request.query.get("format")
    if chosen is not None:
        if chosen not in FORMATS:
            raise _bad("format must be one of " + ", ".join(FORMATS))
        return chosen
    ranked: list[tuple[float, int, str]] = []
    for index, item in enumerate(request.headers.get("Accept", "").split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        name = _ACCEPTED.get(media.lower())
        if name is not None and quality > 0:
            ranked.append((-quality, index, name))
    return min(ranked)[2] if ranked else "json"


# -- handlers --------------------------------------------------------------------------------


async def audit_events(request: web.Request) -> web.StreamResponse:
    """Events across jobs: a JSON page after `after`, or the whole result as NDJSON or CSV."""
    _check_names(request, REPEATABLE + SINGLE, REPEATABLE)
    principal = request[PRINCIPAL]
    query = event_query(request, principal)
    after = _int(request, "after", 0, MAX_POSITION) or 0
    limit = _int(request, "limit", 1, MAX_PAGE) or MAX_PAGE
    chosen = _format(request)
    pool = request.app[POOL]
    if chosen == "json":
        async with pool.acquire() as conn:
            rows = await audit.fetch_page(conn, query, after, limit + 1)
        page = [audit.audit_event(row) for row in rows[:limit]]
        _served(request, len(page))
        return json_response(
            AuditEventPage(
                events=page,
                next_cursor=page[-1].position if page else after,
                has_more=len(rows) > limit,
            )
        )
    async with pool.acquire() as conn:
        head = await audit.head_position(conn)
    response = web.StreamResponse(
        headers={
            "Content-Type": NDJSON if chosen == "ndjson" else f"{CSV}; charset=utf-8",
            "X-Log-Head": str(head),
            "Cache-Control": "no-store",
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    read = request.get(AUDITED)
    if read is not None:
        read.status = response.status
    if chosen == "csv":
        await response.write(audit.csv_header().encode())
    sent = 0
    try:
        async for rows in audit.pages(
            pool, query, after=after, upto=head, page_size=request.app[CONFIG].audit_page_size
        ):
            if chosen == "ndjson":
                await response.write(audit.ndjson_lines(rows))
            else:
                await response.write(audit.csv_lines(rows).encode())
            sent += len(rows)
            _served(request, len(rows))
        await response.write_eof()
    except ConnectionError:
        # The client hung up; what it got is recorded, and there is nobody left to tell.
        _cut_short(request)
        log.info("history stream ended by the client", sent=sent)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        # The status has been sent: all that is left is to end the answer without its last
        # chunk, so that the client knows it is incomplete.
        _cut_short(request)
        log.error("history stream failed", sent=sent, error=repr(exc))
        if request.transport is not None:
            request.transport.abort()
    return response


def _cut_short(request: web.Request) -> None:
    read = request.get(AUDITED)
    if read is not None:
        read.completed = False


_JOB = "SELECT project_id, owner_id, status FROM jobs WHERE job_id = $1 AND status <> 'new'"
_TIMELINE = """
SELECT position, job_id, project_id, seq, event_id, type, occurred_at, actor, data
  FROM events
 WHERE job_id = $1 AND (seq = 1 OR seq >= $2)
 ORDER BY seq
 LIMIT $3
"""


async def job_timeline(request: web.Request) -> web.Response:
    """A job's events in seq order, each with the time since the one before and the first."""
    _check_names(request, ("afterSeq", "limit"), ())
    project_id = request.match_info["project_id"]
    if not PROJECT_ID.fullmatch(project_id):
        raise _bad(
            "a project id is 1 to 128 letters, digits, '.', '_' or '-', and does not start with '.'"
        )
    try:
        job_id = uuid.UUID(request.match_info["job_id"])
    except ValueError:
        raise _bad("job id must be a UUID") from None
    after = _int(request, "afterSeq", 0, 2**31 - 1) or 0
    limit = _int(request, "limit", 1, MAX_TIMELINE_PAGE) or MAX_TIMELINE_PAGE
    principal = request[PRINCIPAL]
    async with request.app[POOL].acquire() as conn:
        job = await conn.fetchrow(_JOB, job_id)
        in_project = job is not None and job["project_id"] == project_id
        # The job's owner reads its timeline even when the token no longer names the project.
        owner = in_project and job is not None and job["owner_id"] == principal.user_id
        if not (principal.can_read(project_id) or owner):
            raise web.HTTPForbidden(reason=f"this token may not read project {project_id!r}")
        if job is None or not in_project:
            raise web.HTTPNotFound(reason=f"no export {job_id} in project {project_id!r}")
        # Event 1 (for sinceFirst), the one before the page (for its first sincePrevious), the
        # page, and one more to tell whether there is more.
        rows = await conn.fetch(_TIMELINE, job_id, max(after, 1), limit + 3)
    if not rows:
        raise web.HTTPNotFound(reason=f"export {job_id} has no events")
    first = rows[0]["occurred_at"]
    previous = None
    entries: list[TimelineEntry] = []
    more = False
    for row in rows:
        if row["seq"] <= after:
            previous = row["occurred_at"]
            continue
        if len(entries) == limit:
            more = True
            break
        moment: datetime = row["occurred_at"]
        entries.append(
            TimelineEntry(
                event=event_from_row(row),
                since_previous=None if previous is None else _seconds(moment - previous),
                since_first=_seconds(moment - first),
            )
        )
        previous = moment
    _served(request, len(entries))
    return json_response(
        JobTimeline(
            job_id=job_id,
            project_id=project_id,
            owner_id=job["owner_id"],
            status=job["status"],
            first_occurred_at=first,
            entries=entries,
            next_cursor=entries[-1].event.seq if entries else after,
            has_more=more,
        )
    )


def _seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 6)


async def verify_range(request: web.Request) -> web.Response:
    """Recompute the hash chains of a range of the log; name the first broken link."""
    _check_names(request, ("from", "to"), ())
    principal = request[PRINCIPAL]
    if not principal.roles & VERIFY_ROLES:
        raise web.HTTPForbidden(reason="verifying the log needs the auditor or service role")
    first = _int(request, "from", 1, MAX_POSITION) or 1
    last = _int(request, "to", 1, MAX_POSITION)
    if last is None:
        async with request.app[POOL].acquire() as conn:
            last = max(await audit.head_position(conn), first)
    if first > last:
        raise web.HTTPUnprocessableEntity(reason="from must not be above to")
    if last - first + 1 > MAX_VERIFY_SPAN:
        raise web.HTTPUnprocessableEntity(
            reason=f"to - from + 1 must be at most {MAX_VERIFY_SPAN} positions: verify a long "
            "log in consecutive ranges"
        )
    report: RangeVerifyReport = await request.app[EVENTLOG].verify_range(
        first, last, page_size=request.app[CONFIG].audit_page_size
    )
    _served(request, report.events_checked)
    if not report.ok:
        log.warning(
            "hash chain broken",
            from_position=first,
            to_position=report.to_position,
            broken=msgspec.to_builtins(report.broken),
        )
    return json_response(report)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/audit/events", audit_events),
        web.get("/projects/{project_id}/export/{job_id}/timeline", job_timeline),
        web.get("/v1/verify", verify_range),
    ]
