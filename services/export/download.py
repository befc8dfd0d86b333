"""Serving a finished archive: the second phase of an export.

Range requests let a broken download resume where it stopped, the ETag is the archive's sha256,
and every tab and device of the user sees the download move: the handler appends
download-started, throttled download-progress by bytes sent, and download-completed.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import asyncpg
import structlog
from aiohttp import web

from schemas.events import DownloadCompleted, DownloadStarted, EventData
from services.common.eventlog import ConflictError, EventLog, JobClosedError, NewEvent

from .api import _job_in_project, _principal, _project
from .keys import CONFIG, EVENTLOG, NOTIFIER
from .progress import DownloadTracker

log = structlog.get_logger(__name__)

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, None for the whole file.

    Raises HTTPRequestRangeNotSatisfiable for a range outside the file and HTTPBadRequest for
    one that is not a single byte range.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise web.HTTPBadRequest(reason="Range must be a single 'bytes=first-last' range")
    first_text, last_text = match.groups()
    if first_text == "":
        length = int(last_text)  # the last `length` bytes
        if length == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        raise _unsatisfiable(size)
    return first, min(last, size - 1)


def _unsatisfiable(size: int) -> web.HTTPRequestRangeNotSatisfiable:
    return web.HTTPRequestRangeNotSatisfiable(
        headers={"Content-Range": f"bytes */{size}"},
        reason=f"the archive has {size} bytes",
    )


async def _append_download_event(
    eventlog: EventLog, job_id: uuid.UUID, data: EventData, actor: str | None
) -> None:
    """Download events report; they never decide anything, so they are best effort: a conflict
    is retried at the new seq, and a database hiccup never breaks the download itself.
    `actor=None` (a reader that may not change the job, such as an auditor) writes nothing."""
    if actor is None:
        return
    for _ in range(5):
        try:
            state = await eventlog.job_state(job_id)
            if state is None:
                return
            await eventlog.append(job_id, state.seq, [NewEvent(data=data, actor=actor)])
            return
        except ConflictError:
            continue
        except JobClosedError:
            return  # the archive expired meanwhile
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("download event not recorded", job_id=str(job_id), error=repr(exc))
            return


async def download_export(request: web.Request) -> web.StreamResponse:
    """The archive, whole or a byte range; 409 before completion, 410 once gone."""
    project_id = _project(request)
    job_id, state = await _job_in_project(request, project_id)
    if state.status != "completed" or state.archive is None:
        raise web.HTTPConflict(
            reason=f"export {job_id} is {state.status}: there is no archive to download"
        )
    path = Path(request.app[CONFIG].archive_root) / str(job_id) / state.archive.file_name
    if state.archive_expired or not path.is_file():
        raise web.HTTPGone(
            reason=f"the archive of export {job_id} has expired; start a new export to "
            "download it again"
        )
    archive = state.archive
    size = archive.size_bytes
    etag = f'"{archive.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/zip",
        "Content-Disposition": f'attachment; filename="{archive.file_name}"',
        "Cache-Control": "private, no-transform",
    }
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    byte_range = parse_range(request.headers.get("Range"), size)
    if_range = request.headers.get("If-Range")
    if byte_range is not None and if_range is not None and if_range != etag:
        byte_range = None  # the client's partial copy is of another archive: send it whole
    first, last = byte_range if byte_range is not None else (0, size - 1)
    if byte_range is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    headers["Content-Length"] = str(last - first + 1)
    response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
    if request.method == "HEAD":
        await response.prepare(request)
        return response

    eventlog = request.app[EVENTLOG]
    notifier = request.app[NOTIFIER]
    principal = _principal(request)
    # Downloads by a read-only caller (an auditor) leave the job as it is.
    actor = principal.actor if principal.can_write(project_id) else None
    download_id = uuid.uuid4().hex[:12]
    await _append_download_event(
        eventlog,
        job_id,
        DownloadStarted(download_id=download_id, total_bytes=size, range_start=first),
        actor,
    )
    notifier.poke()
    tracker = DownloadTracker(size, download_id=download_id)
    loop = asyncio.get_running_loop()
    await response.prepare(request)
    sent = first
    with path.open("rb") as archive_file:
        archive_file.seek(first)
        while sent <= last:
            chunk = await asyncio.to_thread(archive_file.read, min(CHUNK, last - sent + 1))
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
            progress = tracker.update(sent, loop.time())
            if progress is not None:
                await _append_download_event(eventlog, job_id, progress, actor)
                notifier.poke()
    await response.write_eof()
    if sent == size:
        await _append_download_event(
            eventlog,
            job_id,
            DownloadCompleted(download_id=download_id, bytes_sent=size, total_bytes=size),
            actor,
        )
        notifier.poke()
    log.info("archive sent", job_id=str(job_id), first=first, last=last, download_id=download_id)
    return response
