"""A Python client of the log: follow a job, a project or the whole log through the gateway.

    from services.sdk import ConsumerCheckpoint, subscribe

    async for event in subscribe(
        "ws://127.0.0.1:8081/ws",
        token,
        project_id="demo",
        checkpoint=ConsumerCheckpoint("http://127.0.0.1:8080", token, "billing"),
    ):
        handle(event)  # a schemas.events.Event, its payload typed

`subscribe` reconnects on its own (full-jitter exponential backoff) and resumes from the last
event it yielded, so the events come in order, each once, across any number of disconnects.
With a checkpoint, a restarted consumer resumes after the last position it acknowledged:
delivery is then at least once (what was handled but not yet acknowledged comes again), and
never skips. A position is acknowledged only once the loop asked for the next event, that is
once the event was handled; acknowledgements are batched (`checkpoint_every`,
`checkpoint_interval`).

Errors that retrying cannot fix are raised: `AuthenticationFailed` (the token is refused; pass a
callable as `token` to have a fresh one fetched on 4001/4003) and `SubscriptionRefused` (the
stream may not be followed by this token).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import msgspec
import structlog
import websockets
from websockets.asyncio.client import ClientConnection

from schemas.events import Event, decode_event

log = structlog.get_logger(__name__)

TokenSource = str | Callable[[], str | Awaitable[str]]

# Close codes of the gateway (see the README): what each asks the client to do.
_REFRESH_TOKEN = {4001, 4003}


class SdkError(Exception):
    """Base of the errors the SDK raises."""


class AuthenticationFailed(SdkError):
    """The gateway refused the token and no fresh one could be had."""


class CheckpointUnavailable(SdkError):
    """The checkpoint could not be read or written now (a transient failure: retried)."""


class SubscriptionRefused(SdkError):
    """The gateway refused the subscription (no such job, or not this token's to follow)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Checkpoint(Protocol):
    """Where a consumer's position is kept between runs."""

    async def load(self) -> int | None:
        """The position to resume after, or None to start at the stream's beginning."""

    async def save(self, position: int) -> None:
        """Everything at or below `position` has been handled."""


class MemoryCheckpoint:
    """A checkpoint that lives as long as the object (tests, one-off scripts)."""

    def __init__(self, position: int | None = None) -> None:
        self.position = position

    async def load(self) -> int | None:
        return self.position

    async def save(self, position: int) -> None:
        self.position = position


class FileCheckpoint:
    """A position in a local file, replaced atomically on every save."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def load(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except FileNotFoundError:
            return None

    async def save(self, position: int) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(f"{position}\n")
        partial.replace(self.path)


class ConsumerCheckpoint:
    """A durable consumer of the export service (`/v1/consumers/{name}`), created on first use
    for the subscription's stream."""

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        name: str,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.name = name
        self.project_id: str | None = None
        self._session = session

    async def load(self) -> int | None:
        body = await self._call("PUT", f"/v1/consumers/{self.name}", {"projectId": self.project_id})
        position = body.get("position")
        if not isinstance(position, int):
            raise SdkError(f"consumer {self.name}: the answer has no position")
        return position

    async def save(self, position: int) -> None:
        await self._call("POST", f"/v1/consumers/{self.name}/ack", {"position": position})

    async def _call(self, method: str, path: str, body: object) -> dict[str, object]:
        headers = {"Authorization": f"Bearer {await _token(self.token)}"}
        session = self._session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            async with session.request(
                method, self.base_url + path, json=body, headers=headers
            ) as response:
                answer = await response.json(content_type=None)
                if not isinstance(answer, dict):
                    raise CheckpointUnavailable(f"{method} {path}: not a JSON object")
                if response.status >= 500:
                    raise CheckpointUnavailable(f"{method} {path}: {response.status}")
                if response.status >= 400:
                    error = answer.get("error", {})
                    raise SdkError(f"{method} {path}: {response.status} {error}")
                return answer
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise CheckpointUnavailable(f"{method} {path}: {exc!r}") from exc
        finally:
            if self._session is None:
                await session.close()


class _Frame(msgspec.Struct, kw_only=True, rename="camel"):
    """Any message of the gateway, with only the fields the client acts on."""

    type: str
    event_id: str | None = None
    seq: int | None = None
    position: int | None = None
    events: list[msgspec.Raw] | None = None
    code: str | None = None
    message: str | None = None


_frame_decoder = msgspec.json.Decoder(_Frame)


async def _token(source: TokenSource) -> str:
    if isinstance(source, str):
        return source
    value = source()
    if isinstance(value, str):
        return value
    return await value


def backoff(attempt: int, *, base: float = 0.1, cap: float = 10.0) -> float:
    """Full jitter: a uniform delay between 0 and min(cap, base · 2^attempt)."""
    return random.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 64)))


async def subscribe(
    url: str,
    token: TokenSource,
    *,
    job_id: uuid.UUID | str | None = None,
    project_id: str | None = None,
    log_stream: bool = False,
    after: int | None = None,
    live_only: bool = False,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 100,
    checkpoint_interval: float = 1.0,
    max_backoff: float = 10.0,
) -> AsyncIterator[Event]:
    """Yield the events of a job (`job_id`), a project (`project_id`) or the whole log
    (`log_stream=True`) after `after` (a seq for a job, a log position otherwise; None: from
    the checkpoint, else from the beginning, or with `live_only` from what happens next), then
    live ones, until the loop stops (or a failed or cancelled job's stream ends)."""
    if (job_id is not None) + (project_id is not None) + log_stream != 1:
        raise ValueError("follow exactly one of job_id, project_id or log_stream")
    if checkpoint is not None and job_id is not None:
        raise ValueError("checkpoints hold log positions: use them with a project or the log")
    if isinstance(checkpoint, ConsumerCheckpoint):
        checkpoint.project_id = project_id
    loaded = await _load(checkpoint, max_backoff) if checkpoint is not None else None
    # None until the first caught-up marker when only what happens next is wanted.
    cursor: int | None = after if after is not None else loaded
    if cursor is None and not live_only:
        cursor = 0
    target: dict[str, object]
    if job_id is not None:
        target = {"jobId": str(job_id)}
    elif project_id is not None:
        target = {"projectId": project_id}
    else:
        target = {"log": True}
    by_seq = job_id is not None

    handled = cursor or 0  # every event at or below this has been handled by the loop
    saved = handled
    unsaved = 0  # events handled since the last save
    last_save = time.monotonic()
    attempt = 0
    fresh_token = False
    while True:
        try:
            async with websockets.connect(url, max_size=None, open_timeout=10) as ws:
                await ws.send(json.dumps({"type": "auth", "token": await _token(token)}).encode())
                cursor_key = "afterSeq" if by_seq else "afterPosition"
                subscription = {"type": "subscribe", **target}
                if cursor is not None:
                    subscription[cursor_key] = cursor
                await ws.send(json.dumps(subscription).encode())
                async for frame, raw_frame in _frames(ws):
                    kind = frame.type
                    if kind == "error":
                        raise SubscriptionRefused(frame.code or "error", frame.message or "")
                    if kind == "export:caught-up":
                        attempt = 0
                        fresh_token = False
                        mark = frame.seq if by_seq else frame.position
                        if mark is not None and (cursor is None or mark > cursor):
                            cursor = handled = mark
                        continue
                    if kind == "export:end-of-stream":
                        return
                    raws: list[msgspec.Raw]
                    if kind == "export:replay":
                        raws = frame.events or []
                    elif frame.event_id is not None:
                        raws = [msgspec.Raw(raw_frame)]
                    else:
                        continue  # status-sync, heartbeat, authenticated, pong, cancel-ack
                    for raw in raws:
                        event = decode_event(raw)
                        mark = event.seq if by_seq else event.position
                        if cursor is not None and mark <= cursor:
                            continue  # never twice, even if the server repeated itself
                        cursor = mark
                        yield event
                        handled = mark
                        unsaved += 1
                        if checkpoint is not None and (
                            unsaved >= checkpoint_every
                            or time.monotonic() - last_save >= checkpoint_interval
                        ):
                            if await _save(checkpoint, handled):
                                saved, unsaved = handled, 0
                            last_save = time.monotonic()
                    if (
                        checkpoint is not None
                        and handled > saved
                        and (time.monotonic() - last_save >= checkpoint_interval)
                    ):
                        if await _save(checkpoint, handled):
                            saved, unsaved = handled, 0
                        last_save = time.monotonic()
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else None
            if code in _REFRESH_TOKEN:
                if isinstance(token, str) or fresh_token:
                    raise AuthenticationFailed(closed.rcvd.reason if closed.rcvd else "") from None
                fresh_token = True  # the callable is asked again on the next connect
            log.info("subscription interrupted; resuming", code=code, cursor=cursor)
        except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
            log.info("gateway unreachable; retrying", error=repr(exc), cursor=cursor)
        if checkpoint is not None and handled > saved and await _save(checkpoint, handled):
            saved, unsaved, last_save = handled, 0, time.monotonic()
        await asyncio.sleep(backoff(attempt, cap=max_backoff))
        attempt += 1


async def _load(checkpoint: Checkpoint, max_backoff: float) -> int | None:
    """The checkpoint's position, retried (with backoff) while it is unavailable."""
    attempt = 0
    while True:
        try:
            return await checkpoint.load()
        except CheckpointUnavailable as exc:
            log.warning("checkpoint unavailable; retrying", error=str(exc))
        await asyncio.sleep(backoff(attempt, cap=max_backoff))
        attempt += 1


async def _save(checkpoint: Checkpoint, position: int) -> bool:
    """Save a position; a failure is logged and the position saved later (nothing is lost: an
    unsaved position only means more events come again after a restart)."""
    try:
        await checkpoint.save(position)
    except CheckpointUnavailable as exc:
        log.warning("checkpoint not saved; will retry", position=position, error=str(exc))
        return False
    return True


async def _frames(ws: ClientConnection) -> AsyncIterator[tuple[_Frame, bytes]]:
    async for message in ws:
        raw = message.encode() if isinstance(message, str) else message
        yield _frame_decoder.decode(raw), raw
