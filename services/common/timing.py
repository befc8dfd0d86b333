"""Waiting with a time limit, without losing a cancellation.

On Python 3.11, `asyncio.wait_for` can swallow a cancellation that arrives as the awaited
thing completes: the caller's loop then carries on, and a TaskGroup (or a shutdown) waiting
for it waits forever. `asyncio.timeout` counts cancellations and does not, so every wait with
a limit in the services goes through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; whether it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """Await with a time limit (TimeoutError beyond it)."""
    async with asyncio.timeout(timeout):
        return await awaitable
