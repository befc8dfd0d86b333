"""An export process killed with SIGKILL mid-job: another process takes the job over (guarantee 8).

Two export services run as OS processes with one worker each and a lease of 2 s. One of them
claims an export of 300 images; once its progress is in the log it is killed with SIGKILL (no
hand-back, no clean-up: its lease simply stops being renewed). The other process takes the job
over when the lease has run out, says so in the log (`export:resumed`, naming the dead worker
and why), and completes it.

The job's log is then checked as an auditor would: seq 1..n without a gap, no event twice, one
`started`, one `resumed`, exactly one outcome, every event up to the takeover from the dead
worker and every event after it from the new one, progress that never goes back and that is
never reported twice for the same item by one worker (only the stage in hand at the takeover
may be redone, by the new worker), the projection equal to the fold of the log, and a hash chain
that verifies.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from schemas.events import OUTCOME_TYPES, Event, Progress, Resumed, decode_event, encode_event
from schemas.state import replay
from services.common.db import create_pool
from services.common.eventlog import EventLog
from services.export.config import ExportConfig
from services.export.pipeline import STAGES
from tests.faults.stack import export_env, free_port, process, token, wait_until

LEASE_SECONDS = 2.0


async def read_log(log: EventLog, job_id: uuid.UUID) -> list[Event]:
    """The job's events with typed payloads (the log hands them out as raw JSON)."""
    return [decode_event(encode_event(e)) for e in await log.read_stream(job_id)]


def tenures(log: list[Event]) -> list[tuple[str, list[Event]]]:
    """The log cut where a worker starts or resumes the job: (its actor, its events)."""
    spans: list[tuple[str, list[Event]]] = []
    for event in log:
        if event.type in ("export:started", "export:resumed"):
            spans.append((event.actor, []))
        if spans:
            spans[-1][1].append(event)
    return spans


def items(events: list[Event]) -> list[tuple[int, int]]:
    """(stage index, items done) of each progress report with stage progress, in order."""
    found = []
    for event in events:
        data = event.data
        if isinstance(data, Progress) and data.stage is not None and data.stage_progress:
            found.append((STAGES.index(data.stage), data.stage_progress.current))
    return found


def assert_no_item_reported_twice(log: list[Event]) -> None:
    """Within one worker's tenure, progress moves through the items only forwards: a repeat is
    a heartbeat of the same item at most, never an item done again. Across a takeover the new
    worker may redo only the stage the dead one was in (its outputs were not finished)."""
    spans = tenures(log)
    for actor, events in spans:
        reported = items(events)
        assert reported == sorted(reported), f"{actor} went back over items: {reported}"
    for (_, before), (actor, after) in itertools.pairwise(spans):
        done = items(before)
        redone = [item for item in items(after) if done and item <= done[-1]]
        in_hand = done[-1][0] if done else None
        assert all(stage == in_hand for stage, _ in redone), (
            f"{actor} redid items of stages the dead worker had finished: {redone}"
        )


@pytest.mark.timeout(60)
async def test_a_job_of_a_killed_export_process_is_taken_over_by_another(
    export_config: ExportConfig, tmp_path: Path
) -> None:
    url = export_config.database_url
    ports = {name: free_port() for name in ("export-a", "export-b")}
    pool = await create_pool(url, min_size=1, max_size=2)
    log = EventLog(pool)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        children = dict(
            zip(
                ports,
                await asyncio.gather(
                    *(
                        stack.enter_async_context(
                            process(
                                "services.export",
                                export_env(
                                    export_config,
                                    url,
                                    port,
                                    name,
                                    WORKERS="1",
                                    LEASE_SECONDS=str(LEASE_SECONDS),
                                ),
                                f"http://127.0.0.1:{port}/readyz",
                                tmp_path / f"{name}.log",
                            )
                        )
                        for name, port in ports.items()
                    )
                ),
                strict=True,
            )
        )
        headers = {"Authorization": f"Bearer {token()}"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.post(f"http://127.0.0.1:{ports['export-a']}/projects/big/export") as response,
        ):
            assert response.status == 202, await response.text()
            job_id = uuid.UUID((await response.json())["jobId"])

        owner: list[str] = []

        async def mid_job() -> bool:
            events = await read_log(log, job_id)
            assert not any(e.type in OUTCOME_TYPES for e in events), "ended before the kill"
            started = [e for e in events if e.type == "export:started"]
            progress = [e for e in events if isinstance(e.data, Progress)]
            if started and len(progress) >= 3:
                owner.append(started[0].actor.removeprefix("worker:"))
                return True
            return False

        await wait_until(mid_job, 30, "the export to be under way")
        doomed, rescuer = owner[0], next(name for name in ports if name != owner[0])
        victim = children[doomed]
        os.kill(victim.pid, signal.SIGKILL)
        assert await asyncio.wait_for(victim.wait(), 10) == -signal.SIGKILL
        killed_at = asyncio.get_running_loop().time()
        before = await read_log(log, job_id)

        async def ended() -> bool:
            state = await log.job_state(job_id)
            return state is not None and state.is_terminal

        await wait_until(ended, 30, "the job to be taken over and finished", interval=0.05)
        took = asyncio.get_running_loop().time() - killed_at
        events = await read_log(log, job_id)
        report = await log.verify(job_id)
        state = await log.job_state(job_id)

    # What the dead worker wrote is all still there, unchanged.
    assert [e.event_id for e in events[: len(before)]] == [e.event_id for e in before]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.event_id for e in events}) == len(events)
    assert report.ok, report
    assert report.events_checked == len(events) == report.last_seq, report
    assert state == replay(events)
    types = [e.type for e in events]
    outcomes = [e for e in events if e.type in OUTCOME_TYPES]
    assert [e.type for e in outcomes] == ["export:completed"], types
    assert outcomes[0].actor == f"worker:{rescuer}"
    assert types.count("export:started") == 1
    assert types.count("export:queued") == 1

    # Why the job moved, in the log: the new worker resumed it after the dead one's lease ran out.
    resumed = [e for e in events if isinstance(e.data, Resumed)]
    assert len(resumed) == 1, types
    takeover = resumed[0]
    assert isinstance(takeover.data, Resumed)
    assert takeover.actor == f"worker:{rescuer}"
    assert takeover.data.worker_id == rescuer
    assert takeover.data.previous_worker == doomed
    assert takeover.data.reason == "lease expired"
    assert takeover.data.attempt == 2
    assert takeover.seq > before[-1].seq
    assert {e.actor for e in events[1 : takeover.seq - 1]} == {f"worker:{doomed}"}
    assert {e.actor for e in events[takeover.seq - 1 :]} == {f"worker:{rescuer}"}

    reported = [e.data.progress for e in events if isinstance(e.data, Progress)]
    assert reported == sorted(reported), f"progress went backwards: {reported}"
    assert_no_item_reported_twice(events)
    print(f"taken over and finished {took:.2f} s after the kill (lease {LEASE_SECONDS} s)")
