"""The event loop's lag on /metrics: a loop held up is seen, by how long."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from services.common.looplag import LoopLag
from tests.support import wait_for

NAME = "test_event_loop_lag_seconds"


def _count(registry: CollectorRegistry, le: str | None = None) -> float:
    if le is None:
        return registry.get_sample_value(f"{NAME}_count") or 0.0
    return registry.get_sample_value(f"{NAME}_bucket", {"le": le}) or 0.0


async def test_a_loop_held_up_shows_as_lag_of_that_length() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, "test", interval=0.02)
    task = asyncio.create_task(lag.run())
    try:
        await wait_for(lambda: _count(registry) >= 3)
        assert _count(registry, "+Inf") == _count(registry)
        longer = _count(registry) - _count(registry, "0.25")
        # Work that holds the loop for 0.3 s: the tick due in its middle fires when it ends,
        # about 0.28 s late.
        _busy(0.3)
        await wait_for(lambda: _count(registry) - _count(registry, "0.25") >= longer + 1)
        assert (registry.get_sample_value(f"{NAME}_sum") or 0.0) >= 0.25
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _busy(seconds: float) -> None:
    """Keep the CPU (and the event loop) busy, as a callback doing too much work at once does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        LoopLag(CollectorRegistry(), "test", interval=0)
