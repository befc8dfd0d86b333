"""The Python SDK against a real gateway and export service: order, resume, checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import Cancelled, Event
from services.common.auth import issue_token
from services.common.eventlog import AppendRequest, NewEvent
from services.sdk import (
    AuthenticationFailed,
    CheckpointUnavailable,
    FileCheckpoint,
    MemoryCheckpoint,
    SubscriptionRefused,
    backoff,
    subscribe,
)
from tests.clients.conftest import SECRET, Stack, token
from tests.support import new_job, progress, wait_for

ROOT = Path(__file__).resolve().parents[2]


async def demo_positions(stack: Stack) -> list[int]:
    return [e.position for e in await stack.eventlog.tail(0, 1_000_000) if e.project_id == "demo"]


async def test_a_project_is_followed_in_order_across_gateway_restarts(stack: Stack) -> None:
    received: list[Event] = []

    async def consume() -> None:
        async for event in subscribe(
            stack.gateway_url, token(), project_id="demo", after=0, max_backoff=0.2
        ):
            received.append(event)

    consumer = asyncio.create_task(consume())
    try:
        jobs = [await new_job(stack.eventlog, project="demo") for _ in range(3)]
        await new_job(stack.eventlog, project="big")  # not this stream's
        seqs = dict.fromkeys(jobs, 2)
        for round_ in range(6):
            for job in jobs:
                await stack.eventlog.append(
                    job, seqs[job], [progress(round_ * 10 + i) for i in range(5)]
                )
                seqs[job] += 5
            if round_ in (1, 3):
                await stack.restart_gateway()
        expected = await demo_positions(stack)
        await wait_for(lambda: len(received) >= len(expected), timeout=30)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert [e.position for e in received] == expected
    assert all(e.project_id == "demo" for e in received)


async def test_a_job_stream_ends_after_its_outcome(stack: Stack) -> None:
    job = await new_job(stack.eventlog, project="demo")
    await stack.eventlog.append(
        job, 2, [progress(5), NewEvent(data=Cancelled(cancelled_by="user"), actor="user:alice")]
    )
    seqs = [e.seq async for e in subscribe(stack.gateway_url, token(), job_id=job)]
    assert seqs == [1, 2, 3, 4]


async def test_a_checkpoint_acknowledges_only_what_the_loop_finished(stack: Stack) -> None:
    job = await new_job(stack.eventlog, project="demo")
    await stack.eventlog.append(job, 2, [progress(i) for i in range(4)])
    positions = await demo_positions(stack)
    checkpoint = MemoryCheckpoint()
    seen = 0
    async for event in subscribe(
        stack.gateway_url, token(), project_id="demo", checkpoint=checkpoint, checkpoint_every=1
    ):
        seen += 1
        if seen == 3:
            assert event.position == positions[2]
            break  # handling the third failed: it must come again
    assert checkpoint.position == positions[1]
    again = []
    async for event in subscribe(
        stack.gateway_url, token(), project_id="demo", checkpoint=checkpoint
    ):
        again.append(event.position)
        if len(again) == len(positions) - 2:
            break
    assert again == positions[2:]


async def test_a_file_checkpoint_survives_the_process(tmp_path: Path) -> None:
    checkpoint = FileCheckpoint(tmp_path / "cursor")
    assert await checkpoint.load() is None
    await checkpoint.save(41)
    await checkpoint.save(42)
    assert await FileCheckpoint(tmp_path / "cursor").load() == 42


async def test_a_refused_subscription_or_token_raises(stack: Stack) -> None:
    with pytest.raises(SubscriptionRefused, match="forbidden"):
        async for _ in subscribe(stack.gateway_url, token(), project_id="elsewhere"):
            pass
    with pytest.raises(AuthenticationFailed):
        async for _ in subscribe(stack.gateway_url, "not-a-token", project_id="demo"):
            pass
    with pytest.raises(ValueError, match="exactly one"):
        async for _ in subscribe(stack.gateway_url, token(), project_id="demo", log_stream=True):
            pass


async def test_an_expired_token_is_refreshed_from_a_callable(stack: Stack) -> None:
    job = await new_job(stack.eventlog, project="demo")
    issued: list[str] = []

    def fresh() -> str:
        # The first token expires at once; the gateway closes 4003 and the SDK asks again.
        ttl = 1 if not issued else 3600
        issued.append(issue_token(SECRET, "alice", projects=["demo"], ttl=ttl))
        return issued[-1]

    seen: list[int] = []

    async def consume() -> None:
        async for event in subscribe(stack.gateway_url, fresh, job_id=job, max_backoff=0.1):
            seen.append(event.seq)

    task = asyncio.create_task(consume())
    try:
        await wait_for(lambda: len(issued) >= 2, timeout=15)
        await stack.eventlog.append(job, 2, [progress(1)])
        await wait_for(lambda: seen == [1, 2, 3], timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@given(attempt=st.integers(0, 100), base=st.floats(0.001, 1.0), cap=st.floats(0.01, 60.0))
def test_backoff_is_full_jitter_under_the_cap(attempt: int, base: float, cap: float) -> None:
    delay = backoff(attempt, base=base, cap=cap)
    assert 0.0 <= delay <= min(cap, base * 2.0**attempt)


# -- the issue's "done when": a consumer killed at random points never skips an event ----------


def _runs(outputs: list[Path]) -> list[list[int]]:
    """Positions each run of the consumer printed (a line cut short by the kill is dropped)."""
    runs = []
    for path in outputs:
        positions = []
        for line in path.read_text().split("\n"):
            try:
                positions.append(json.loads(line)["position"])
            except (json.JSONDecodeError, KeyError):
                continue
        runs.append(positions)
    return runs


@pytest.mark.timeout(240)
async def test_a_consumer_killed_at_random_points_processes_every_event_and_never_skips(
    stack: Stack, tmp_path: Path
) -> None:
    rng = random.Random(10_000)
    env = {
        **os.environ,
        "EXPORTLOG_URL": stack.export_url,
        "EXPORTLOG_GATEWAY_URL": stack.gateway_url,
        "EXPORTLOG_TOKEN": token(),
    }
    command = [sys.executable, "-m", "services.cli", "follow", "--project", "demo"]
    command += ["--consumer", "killed-at-random", "--json"]
    outputs: list[Path] = []

    async def spawn() -> asyncio.subprocess.Process:
        outputs.append(tmp_path / f"run-{len(outputs)}.ndjson")
        with outputs[-1].open("wb") as sink:
            return await asyncio.create_subprocess_exec(
                *command, env=env, cwd=ROOT, stdout=sink, stderr=asyncio.subprocess.DEVNULL
            )

    jobs = [uuid.uuid4() for _ in range(50)]
    for job in jobs:
        await stack.eventlog.append(job, 0, [progress(0)], project_id="demo", owner_id="alice")
    total = 10_000
    written = len(jobs)
    seqs = dict.fromkeys(jobs, 1)

    async def append_all() -> None:
        nonlocal written
        while written < total:
            batch: list[AppendRequest] = []
            for job in rng.sample(jobs, 10):
                count = min(10, total - written - sum(len(r.events) for r in batch))
                if count <= 0:
                    break
                batch.append(
                    AppendRequest(
                        job_id=job,
                        expected_seq=seqs[job],
                        events=[progress(i / 100) for i in range(count)],
                    )
                )
                seqs[job] += count
            await stack.eventlog.append_many(batch)
            written += sum(len(r.events) for r in batch)

    consumer = await spawn()
    appender = asyncio.create_task(append_all())
    try:
        for _ in range(8):
            # Let it work a while, then kill it without warning and start it again.
            await wait_for(lambda: outputs[-1].stat().st_size > rng.randint(1, 400_000), 30, 0.005)
            consumer.send_signal(signal.SIGKILL)
            await consumer.wait()
            consumer = await spawn()
        await appender
        expected = await demo_positions(stack)
        assert len(expected) == total
        await wait_for(lambda: expected[-1] in _runs(outputs[-1:])[0], timeout=60)
    finally:
        if consumer.returncode is None:
            consumer.send_signal(signal.SIGKILL)
            await consumer.wait()
        appender.cancel()
        await asyncio.gather(appender, return_exceptions=True)

    runs = _runs(outputs)
    assert len(runs) == 9
    index = {position: i for i, position in enumerate(expected)}
    processed: set[int] = set()
    redelivered = 0
    for run in runs:
        if not run:
            continue
        # Each run is an unbroken stretch of the stream, in order...
        start = index[run[0]]
        assert run == expected[start : start + len(run)]
        # ...that starts no later than the first event not processed before: nothing skipped.
        first_missing = next(i for i, p in enumerate(expected) if p not in processed)
        assert start <= first_missing, (start, first_missing)
        redelivered += len(processed.intersection(run))
        processed.update(run)
    assert processed == set(expected)  # every event processed at least once
    assert redelivered < total  # and checkpoints kept the repeats to the unacknowledged tail


async def test_live_only_starts_with_what_happens_next(stack: Stack) -> None:
    job = await new_job(stack.eventlog, project="demo")
    seen: list[int] = []

    async def consume() -> None:
        async for event in subscribe(stack.gateway_url, token(), project_id="demo", live_only=True):
            seen.append(event.seq)

    def live() -> bool:
        return any(
            sub.phase == "live"
            for client in stack.gateway._clients
            for sub in client.subscriptions.values()
        )

    task = asyncio.create_task(consume())
    try:
        await wait_for(live)
        await stack.eventlog.append(job, 2, [progress(10)])
        await wait_for(lambda: seen == [3])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_backoff_stays_bounded_after_any_number_of_failures() -> None:
    assert 0.0 <= backoff(5_000, cap=10.0) <= 10.0


class FlakyCheckpoint(MemoryCheckpoint):
    """Fails every other save, as a checkpoint store that comes and goes would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.saves: list[int] = []

    async def save(self, position: int) -> None:
        self.calls += 1
        if self.calls % 2:
            raise CheckpointUnavailable("down for a moment")
        self.saves.append(position)
        await super().save(position)


async def test_checkpoints_count_events_and_survive_a_store_that_fails(stack: Stack) -> None:
    mine = await new_job(stack.eventlog, project="demo")
    other = await new_job(stack.eventlog, project="big")
    for i in range(10):  # interleaved: the project's positions have gaps
        await stack.eventlog.append(mine, 2 + i, [progress(i)])
        await stack.eventlog.append(other, 2 + i, [progress(i)])
    positions = await demo_positions(stack)
    checkpoint = FlakyCheckpoint()
    seen = []
    async for event in subscribe(
        stack.gateway_url,
        token(),
        project_id="demo",
        checkpoint=checkpoint,
        checkpoint_every=4,
        checkpoint_interval=3600,
    ):
        seen.append(event.position)
        if len(seen) == len(positions):
            break
    assert seen == positions
    # Every 4 events a save is due; each failed one is tried again at the next event.
    assert checkpoint.saves == [positions[4], positions[9]]
    assert checkpoint.calls == 4
