"""The commands of `exportlog` for people at a terminal, talking to running services.

    exportlog start PROJECT            queue an export and show its progress until it ends
    exportlog cancel PROJECT JOB       ask for a cancel; the outcome arrives as an event
    exportlog follow --job J | --project P | --log    print events as they happen
    exportlog history PROJECT [--job J]               a project's exports, or a job's timeline
    exportlog events [filters] --format ndjson|csv    events across jobs, streamed to stdout

They read `EXPORTLOG_URL` (the export service), `EXPORTLOG_GATEWAY_URL` and `EXPORTLOG_TOKEN`
(or `TOKEN`, as `make run` prints it). State shown is always the fold of the job's events, read
through the gateway like any other client.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import shutil
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import aiohttp
import msgspec

from schemas.events import Event, decode_event, encode_event
from schemas.state import JobState, fold
from services.sdk import ConsumerCheckpoint, SdkError, subscribe

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3


@dataclass(frozen=True, slots=True)
class Endpoints:
    export_url: str
    gateway_url: str
    token: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class CliError(Exception):
    """A failure to report in one line, without a traceback."""


async def _request(
    endpoints: Endpoints, method: str, path: str, body: object | None = None
) -> tuple[int, Any]:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.request(
                method,
                endpoints.export_url.rstrip("/") + path,
                json=body,
                headers=endpoints.headers(),
            ) as response,
        ):
            answer = await response.json(content_type=None)
            return response.status, answer
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise CliError(
            f"the export service at {endpoints.export_url} did not answer: {exc}"
        ) from exc


def _error_text(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = answer["error"]
        return f"{error.get('code')}: {error.get('message')}"
    return str(answer)


# -- progress --------------------------------------------------------------------------------


def progress_line(state: JobState, width: int) -> str:
    """One line that says where the job is: a bar, the percentage, phase, stage, message, ETA."""
    bar_width = max(10, min(30, width // 4))
    done = round(bar_width * min(max(state.progress, 0.0), 100.0) / 100)
    bar = "#" * done + "." * (bar_width - done)
    parts = [f"[{bar}] {state.progress:5.1f}%", state.status]
    if state.status in ("running", "queued") or state.phase == "downloading":
        parts.append(state.phase + (f"/{state.stage}" if state.stage else ""))
    if state.message is not None and state.message.text:
        parts.append(state.message.text)
    if state.estimated_time_remaining is not None and state.status == "running":
        parts.append(f"~{state.estimated_time_remaining:.0f}s left")
    line = "  ".join(parts)
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


class ProgressView:
    """Redraws one line on a terminal; elsewhere prints a line when the status or stage moves."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last: tuple[str, str | None, int] | None = None

    def show(self, state: JobState) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        if self.tty:
            self.out.write("\r\033[K" + progress_line(state, width))
            self.out.flush()
            return
        # A log, not an animation: one line per status, stage or tenth of the way.
        key = (state.status, state.stage, int(state.progress // 10))
        if key != self._last:
            self._last = key
            print(progress_line(state, 1000), file=self.out, flush=True)

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


async def watch_job(
    endpoints: Endpoints, job_id: uuid.UUID, out: TextIO, *, until_downloaded: bool = False
) -> JobState | None:
    """Follow the job's events from its first one, show its progress, and return its state when
    it has ended (completed, failed or cancelled)."""
    view = ProgressView(out)
    state: JobState | None = None
    try:
        async for event in subscribe(endpoints.gateway_url, endpoints.token, job_id=job_id):
            state = fold(state, event)
            view.show(state)
            if state.status in ("failed", "cancelled"):
                break
            if state.status == "completed" and not until_downloaded:
                break
    finally:
        view.done()
    return state


# -- commands --------------------------------------------------------------------------------


async def start(endpoints: Endpoints, project: str, options: dict[str, Any], out: TextIO) -> int:
    status, answer = await _request(endpoints, "POST", f"/projects/{project}/export", options)
    if status != 202:
        raise CliError(f"the export was not started ({status} {_error_text(answer)})")
    job_id = uuid.UUID(answer["jobId"])
    print(f"export {job_id} queued; Ctrl-C stops watching (the export goes on)", file=out)
    state = await watch_job(endpoints, job_id, out)
    return _report(endpoints, project, job_id, state, out)


def _report(
    endpoints: Endpoints, project: str, job_id: uuid.UUID, state: JobState | None, out: TextIO
) -> int:
    if state is None:
        return EXIT_FAILED
    if state.status == "completed":
        url = f"{endpoints.export_url.rstrip('/')}/projects/{project}/export/{job_id}/download"
        size = f" ({state.archive.size_bytes:,} bytes)" if state.archive else ""
        print(f"completed{size}: {url}", file=out)
        return EXIT_OK
    if state.status == "cancelled":
        who = state.cancellation.cancelled_by if state.cancellation else "?"
        print(f"cancelled (by {who})", file=out)
        return EXIT_CANCELLED
    failure = state.failure
    reason = f"{failure.code}: {failure.message}" if failure else "unknown"
    print(f"failed: {reason}", file=out)
    return EXIT_FAILED


async def cancel(endpoints: Endpoints, project: str, job_id: uuid.UUID, out: TextIO) -> int:
    status, answer = await _request(
        endpoints, "POST", f"/projects/{project}/export/{job_id}/cancel"
    )
    if status == 202:
        print(f"cancel requested (seq {answer['seq']}); waiting for the export to stop", file=out)
        state = await watch_job(endpoints, job_id, out)
        return _report(endpoints, project, job_id, state, out)
    if status == 409:
        print(f"the export had already ended: {_error_text(answer)}", file=out)
        return EXIT_FAILED
    raise CliError(f"the cancel was refused ({status} {_error_text(answer)})")


def describe(event: Event) -> str:
    """One human line for an event."""
    data = msgspec.to_builtins(event.data) if not isinstance(event.data, msgspec.Raw) else {}
    detail = ""
    if isinstance(data, dict):
        text = (
            (data.get("message") or {}).get("text")
            if isinstance(data.get("message"), dict)
            else None
        )
        if text:
            detail = text
        elif "progress" in data:
            detail = f"{data['progress']:.1f}%"
        elif "code" in data:
            detail = f"{data['code']}: {data.get('message', '')}"
    when = event.occurred_at.astimezone().strftime("%H:%M:%S")
    where = f"{event.project_id}/{event.job_id} seq {event.seq:<4}"
    return f"{when}  #{event.position:<8} {where} {event.type:<28} {detail}".rstrip()


async def follow(
    endpoints: Endpoints,
    out: TextIO,
    *,
    job_id: uuid.UUID | None,
    project_id: str | None,
    whole_log: bool,
    after: int | None,
    consumer: str | None,
    as_json: bool,
) -> int:
    checkpoint = (
        ConsumerCheckpoint(endpoints.export_url, endpoints.token, consumer) if consumer else None
    )
    async for event in subscribe(
        endpoints.gateway_url,
        endpoints.token,
        job_id=job_id,
        project_id=project_id,
        log_stream=whole_log,
        after=after,
        # A person following a project or the log wants what happens next, like `tail -f`.
        live_only=job_id is None and consumer is None,
        checkpoint=checkpoint,
    ):
        if as_json:
            out.write(encode_event(event).decode() + "\n")
        else:
            out.write(describe(event) + "\n")
        out.flush()
    return EXIT_OK


async def history(endpoints: Endpoints, project: str, job_id: uuid.UUID | None, out: TextIO) -> int:
    if job_id is None:
        status, answer = await _request(endpoints, "GET", f"/projects/{project}/export/history")
        if status != 200:
            raise CliError(f"no history ({status} {_error_text(answer)})")
        for job in answer["jobs"]:
            state = job["state"]
            print(
                f"{job['createdAt'][:19]}  {job['jobId']}  {job['status']:<10} "
                f"{state.get('progress', 0):5.1f}%  seq {job['seq']}",
                file=out,
            )
        if not answer["jobs"]:
            print("no exports yet", file=out)
        return EXIT_OK
    after = 0
    previous: datetime | None = None
    while True:
        status, answer = await _request(
            endpoints, "GET", f"/projects/{project}/export/{job_id}/events?afterSeq={after}"
        )
        if status != 200:
            raise CliError(f"no such export ({status} {_error_text(answer)})")
        for raw in answer["events"]:
            event = decode_event(json.dumps(raw))
            gap = (
                ""
                if previous is None
                else f"+{(event.occurred_at - previous).total_seconds():.3f}s"
            )
            previous = event.occurred_at
            print(f"{gap:>10}  {describe(event)}", file=out)
        if not answer["hasMore"]:
            return EXIT_OK
        after = answer["nextCursor"]


async def export_events(
    endpoints: Endpoints, filters: list[tuple[str, str]], fmt: str, out: TextIO
) -> int:
    """Stream the events the filters select (`/v1/audit/events`) to `out` as NDJSON or CSV,
    without holding them: the service streams them a page at a time, and so does this."""
    url = endpoints.export_url.rstrip("/") + "/v1/audit/events"
    params = [*filters, ("format", fmt)]
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=60)) as session,
            session.get(url, params=params, headers=endpoints.headers()) as response,
        ):
            if response.status != 200:
                answer = await response.json(content_type=None)
                raise CliError(f"no events ({response.status} {_error_text(answer)})")
            # Chunks may split a character: decode incrementally.
            decoder = codecs.getincrementaldecoder("utf-8")()
            async for chunk in response.content.iter_chunked(64 * 1024):
                out.write(decoder.decode(chunk))
            out.write(decoder.decode(b"", final=True))
            out.flush()
            head = response.headers.get("X-Log-Head")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"the export service at {endpoints.export_url} failed: {exc}") from exc
    if head is not None:
        print(f"exportlog: up to log position {head}", file=sys.stderr)
    return EXIT_OK


def run(coroutine: Any) -> int:
    """Run a command; report a CliError or an SDK error in one line; Ctrl-C exits quietly."""
    try:
        code: int = asyncio.run(coroutine)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except (CliError, SdkError) as exc:
        print(f"exportlog: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code
