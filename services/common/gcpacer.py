"""Full garbage collections on the service's schedule instead of CPython's.

CPython (before 3.14) runs a full, generation-2 collection each time the objects that outlived
the young collections have grown by a quarter since the last full one, and a full collection
walks every tracked object. Both services suffer from it, each in its own way.

* The gateway. Its heap is mostly its connections, which are long-lived: while thousands of
  clients connect at once (a reconnect storm) the heap grows by a quarter again and again, and
  each time every connection's objects are walked, while nothing is garbage. Measured on 2
  cores, a storm of 5,000 clients took 6 to 8 s with CPython's schedule and 3.5 s with
  collections off: about half of the gateway's CPU went to those collections. What full
  collections are needed for there is the reference cycles that closed connections leave in the
  old generation (a websockets connection, its protocol and its reader refer to each other;
  reference counting alone never frees them), so the gateway tells the pacer of every
  connection that ends.
* The export service. Under a steady load of appends, the requests and events waiting for a
  group commit outlive the young collections, so the old generation keeps growing by a quarter
  and CPython ran a full collection every 3 s at 15,000 appends/s, 10 to 34 ms each (they grow
  with the heap, the modules included). While one ran, appends piled up behind the event loop,
  and each pause came back as a burst of 40 to 70 ms latencies that made the p99. Nothing it
  keeps ends in cycles the way connections do, so its pacer runs on the period alone.

The pacer runs one when connections have closed, as many as `churn` of those still open, or at
the latest every `max_period` seconds; never more than a `duty` share of the time (after a
collection that took d seconds, none for d / duty seconds). Young generations are still
collected by CPython, as before (after `young` new objects where that is given). What the process
made while starting (modules, classes, the settings) lives as long as it does: `install`
freezes it, so no full collection walks it again.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

NEVER = 2**31 - 1
"""A generation-2 threshold CPython never reaches (it counts young collections in a C int)."""


class GcPacer:
    """When to run a full collection, and running it. One per process."""

    __slots__ = (
        "_clock",
        "_saved",
        "check_every",
        "churn",
        "closed",
        "collections",
        "duty",
        "last",
        "last_seconds",
        "max_period",
        "seconds",
        "young",
    )

    def __init__(
        self,
        *,
        churn: float = 0.25,
        duty: float = 0.02,
        max_period: float = 600.0,
        check_every: float = 1.0,
        young: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < duty <= 1:
            raise ValueError("duty must be in (0, 1]")
        if young is not None and young < 1:
            raise ValueError("young must be at least 1")
        self.young = young
        """Tracked objects allocated (net) between two young collections while installed; None
        keeps CPython's threshold (700)."""
        self.churn = churn
        self.duty = duty
        self.max_period = max_period
        self.check_every = check_every
        self._clock = clock
        self._saved: tuple[int, int, int] | None = None
        self.closed = 0
        """Connections ended since the last full collection."""
        self.last = clock()
        self.last_seconds = 0.0
        self.collections = 0
        self.seconds = 0.0

    def install(self) -> None:
        """Take full collections over from CPython, for the whole process."""
        if self._saved is not None:
            return
        gc.collect()
        gc.freeze()
        self._saved = gc.get_threshold()
        young, middle, _ = self._saved
        gc.set_threshold(self.young or young, middle, NEVER)
        self.last = self._clock()

    def uninstall(self) -> None:
        """Give full collections back to CPython (what was frozen is walked again too)."""
        if self._saved is None:
            return
        gc.set_threshold(*self._saved)
        gc.unfreeze()
        self._saved = None

    def connection_closed(self) -> None:
        self.closed += 1

    def due(self, open_connections: int) -> bool:
        """Whether a full collection should run now."""
        since = self._clock() - self.last
        if since < self.last_seconds / self.duty:
            return False
        if self.closed > 0 and self.closed >= self.churn * open_connections:
            return True
        return since >= self.max_period

    def collect(self) -> int:
        """Run a full collection now; the number of unreachable objects it found."""
        began = self._clock()
        found = gc.collect()
        self.last = self._clock()
        self.last_seconds = self.last - began
        self.collections += 1
        self.seconds += self.last_seconds
        self.closed = 0
        return found

    def expose(self, registry: CollectorRegistry, prefix: str, when: str) -> None:
        """Put the count and the time of its collections on `registry`, as
        `<prefix>_gc_full_collections` and `<prefix>_gc_full_seconds`; `when` says when they run."""
        Gauge(
            f"{prefix}_gc_full_collections",
            f"Full garbage collections run by the process's pacer ({when})",
            registry=registry,
        ).set_function(lambda: self.collections)
        Gauge(
            f"{prefix}_gc_full_seconds",
            "Seconds spent in those collections, in all",
            registry=registry,
        ).set_function(lambda: self.seconds)

    async def run(self, open_connections: Callable[[], int]) -> None:
        """Check every `check_every` seconds, and collect when due, until cancelled."""
        while True:
            await asyncio.sleep(self.check_every)
            if self.due(open_connections()):
                self.collect()
