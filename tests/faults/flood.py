"""A flood of progress events into one job, from a process of its own.

    python -m tests.faults.flood DSN JOB_ID EVENTS BATCH RATE

Appends EVENTS progress events (about 1.2 KB each on the wire) to a job that is at seq 2, in
batches of BATCH, at RATE events per second at most, then `export:cancelled`, and exits. Run as
its own process so that building and appending the events never holds up the event loop of the
test, whose clients must read at full speed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from schemas.events import Cancelled, Message, Progress, StageProgress
from services.common.db import create_pool
from services.common.eventlog import EventLog, NewEvent

WRITER = "user:fault-writer"


def progress_event(n: int, total: int) -> NewEvent:
    """A progress event as a worker writes them."""
    # A deep path, as some projects have: about 1.2 KB an event on the wire.
    item = "images/" + "/".join(f"site-{n % 7}-plate-{k:02d}" for k in range(14)) + f"/{n:06d}.png"
    value = min(n / total * 90, 90.0)
    return NewEvent(
        data=Progress(
            phase="processing",
            stage="visualizations",
            progress=value,
            phase_progress=value / 0.9,
            stage_progress=StageProgress(current=n % 300, total=300, current_item=item),
            message=Message(
                key="export.progress.visualizations",
                params={"current": n % 300, "total": 300, "item": item},
                text=f"Rendering visualizations ({n % 300}/300): {item}",
            ),
            estimated_time_remaining=12.5,
        ),
        actor=WRITER,
    )


async def flood(dsn: str, job_id: uuid.UUID, events: int, batch: int, rate: float) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        log = EventLog(pool, notify=True)
        seq = 2
        started = time.monotonic()
        for start in range(0, events, batch):
            chunk = [progress_event(n, events) for n in range(start, min(start + batch, events))]
            seq = (await log.append(job_id, seq, chunk)).last_seq
            ahead = started + (start + len(chunk)) / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)  # keep to the rate asked for
        outcome = NewEvent(data=Cancelled(cancelled_by="system"), actor=WRITER)
        await log.append(job_id, seq, [outcome])
    finally:
        await pool.close()


def main() -> None:
    dsn, job_id, events, batch, rate = sys.argv[1:6]
    asyncio.run(flood(dsn, uuid.UUID(job_id), int(events), int(batch), float(rate)))


if __name__ == "__main__":
    main()
