"""Small builders shared by the event log tests."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.events import ArchiveInfo, Cancelled, Completed, Failed, Progress, Queued, Started
from services.common.eventlog import EventLog, NewEvent


def queued(actor: str = "user:alice") -> NewEvent:
    return NewEvent(data=Queued(requested_by=actor.split(":")[-1]), actor=actor)


def started() -> NewEvent:
    return NewEvent(data=Started(worker_id="w1"), actor="worker:w1")


def progress(value: float, stage: str = "images") -> NewEvent:
    return NewEvent(
        data=Progress(phase="processing", stage=stage, progress=value, phase_progress=value),  # type: ignore[arg-type]
        actor="worker:w1",
    )


def completed() -> NewEvent:
    archive = ArchiveInfo(file_name="export.zip", size_bytes=10, sha256="00" * 32)
    return NewEvent(data=Completed(archive=archive), actor="worker:w1")


def cancelled() -> NewEvent:
    return NewEvent(data=Cancelled(cancelled_by="user", cleanup_completed=True), actor="user:alice")


def failed() -> NewEvent:
    return NewEvent(data=Failed(code="disk_full", retryable=True), actor="worker:w1")


async def new_job(log: EventLog, *, project: str = "p1", owner: str = "alice") -> uuid.UUID:
    """A job with its queued event (seq 1) and started event (seq 2)."""
    job_id = uuid.uuid4()
    await log.append(job_id, 0, [queued(f"user:{owner}")], project_id=project, owner_id=owner)
    await log.append(job_id, 1, [started()])
    return job_id


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll a condition (plain or async) until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def unpack(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A gateway message as a list: the events of an `export:replay` frame, else itself."""
    if message.get("type") == "export:replay":
        events: list[dict[str, Any]] = message["events"]
        return events
    return [message]
