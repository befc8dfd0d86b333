"""How late the event loop runs what is due: the figure that shows a process out of CPU.

Each service runs one asyncio event loop. When it has more ready work than it can run, nothing
fails: every callback, every append waiting for its group commit and every frame for a client
just waits its turn, and the wait shows up as latency somewhere else. With 1,000 jobs appending
17,500 events/s on 2 cores, the writer's loop ran a timer due every millisecond 8 to 20 ms late
at times, and that is what held the appends' p99 up. A timer due every `interval` seconds records
how late it fired; `<prefix>_event_loop_lag_seconds` on `/metrics` is that histogram.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopLag:
    """Measures the lag of the running event loop while `run` runs."""

    def __init__(self, registry: CollectorRegistry, prefix: str, *, interval: float = 0.1) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.histogram = Histogram(
            f"{prefix}_event_loop_lag_seconds",
            f"How late a timer due every {interval:g} s fired: how long ready work waited for "
            "the event loop",
            buckets=BUCKETS,
            registry=registry,
        )

    async def run(self) -> None:
        """Record the lag of each tick until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.histogram.observe(max(0.0, loop.time() - due))
