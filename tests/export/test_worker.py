"""Export workers against the real database and real sockets: races, sharing, takeover, failure.

Guarantee 2 (one outcome, cancel versus complete resolved by the log) and guarantee 8 (durable
jobs: a dead worker's job is resumed or failed by another one, with an event saying why).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import uuid
import zipfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from schemas.events import Event, Progress, Queued, Resumed, Started, decode_event
from schemas.state import JobState, replay
from services.common.eventlog import AppendRequest, AppendResult, EventLog, NewEvent
from services.export.config import ExportConfig
from services.export.demo import create_demo_project
from services.export.keys import EVENTLOG, POOL, WORKER
from services.export.pipeline import STAGES
from services.export.worker import LeaseLost, RunningJob, Worker
from tests.export.conftest import SECRET, Client, ClientFactory, auth
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
PROJECTS = ("demo", "big", "tiny")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
OUTCOMES = frozenset({"export:completed", "export:failed", "export:cancelled"})


@pytest.fixture(scope="session")
def tiny_project(demo_projects: Path) -> str:
    """A three-image project next to the session's others: an export of it takes tens of ms."""
    create_demo_project(demo_projects, "tiny", images=3, seed=11)
    return "tiny"


# -- helpers ---------------------------------------------------------------------------------


def _headers(user: str = "alice", projects: tuple[str, ...] = PROJECTS) -> dict[str, str]:
    return auth(user, projects)


async def start(
    client: Client, project: str, *, user: str = "alice", projects: tuple[str, ...] = PROJECTS
) -> str:
    response = await client.post(f"/projects/{project}/export", headers=_headers(user, projects))
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["jobId"]
    return job_id


async def status(
    client: Client, project: str, job_id: str, projects: tuple[str, ...] = PROJECTS
) -> dict[str, Any]:
    response = await client.get(
        f"/projects/{project}/export/{job_id}/status", headers=_headers(projects=projects)
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def cancel(
    client: Client, project: str, job_id: str, *, user: str = "alice"
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        f"/projects/{project}/export/{job_id}/cancel", headers=_headers(user)
    )
    body: dict[str, Any] = await response.json()
    return response.status, body


async def events(
    client: Client, project: str, job_id: str, projects: tuple[str, ...] = PROJECTS
) -> list[Event]:
    found: list[Event] = []
    after = 0
    while True:
        response = await client.get(
            f"/projects/{project}/export/{job_id}/events?afterSeq={after}",
            headers=_headers(projects=projects),
        )
        assert response.status == 200, await response.text()
        page = msgspec.json.decode(await response.read())
        found += [decode_event(msgspec.json.encode(e)) for e in page["events"]]
        after = page["nextCursor"]
        if not page["hasMore"]:
            return found


async def wait_status(
    client: Client,
    project: str,
    job_id: str,
    wanted: frozenset[str] = TERMINAL,
    *,
    timeout: float = 30,
    projects: tuple[str, ...] = PROJECTS,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await status(client, project, job_id, projects))
        return bool(seen["state"]["status"] in wanted)

    await wait_for(reached, timeout=timeout, interval=0.05)
    return seen


async def wait_all_ended(client: Client, job_ids: list[str], *, timeout: float) -> None:
    """Wait, from the projection, until every one of the jobs has its outcome."""
    ids = [uuid.UUID(j) for j in job_ids]

    async def ended() -> bool:
        async with client.app[POOL].acquire() as conn:
            open_jobs = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE job_id = ANY ($1::uuid[]) "
                "AND status NOT IN ('completed', 'failed', 'cancelled')",
                ids,
            )
        return bool(open_jobs == 0)

    await wait_for(ended, timeout=timeout, interval=0.1)


def outcomes(log: list[Event]) -> list[Event]:
    return [e for e in log if e.type in OUTCOMES]


def assert_state_is_the_fold(body: dict[str, Any], log: list[Event]) -> None:
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert msgspec.convert(body["state"], JobState) == replay(log)


def assert_progress_never_decreases(log: list[Event]) -> None:
    """Both what each progress event says and the folded state only ever move forwards."""
    reported = [e.data.progress for e in log if isinstance(e.data, Progress)]
    assert reported == sorted(reported), f"progress went backwards: {reported}"
    folded: list[float] = []
    state: JobState | None = None
    for event in log:
        state = replay([event], state)
        assert state is not None
        folded.append(state.progress)
    assert folded == sorted(folded), f"folded progress went backwards: {folded}"


def assert_finished_stages_not_redone(log: list[Event], resumed: Event) -> None:
    """After a takeover, no stage before the one the job resumed from is worked on again: the
    scratch folder is shared and the stages the log shows as finished are intact in it."""
    assert isinstance(resumed.data, Resumed)
    assert resumed.data.from_stage is not None
    first = STAGES.index(resumed.data.from_stage)
    redone = [
        (e.seq, e.data.stage)
        for e in log[resumed.seq :]
        if isinstance(e.data, Progress) and e.data.stage in STAGES[:first]
    ]
    assert not redone, f"resumed from {resumed.data.from_stage}, but redid {redone}"


def staged_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each staged file's identity (inode, modification time): a file written again differs."""
    if not folder.is_dir():
        return {}
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in folder.iterdir()}


def assert_archive_matches(archive_root: Path, job_id: str, state: dict[str, Any]) -> Path:
    archive = state["archive"]
    path: Path = archive_root / job_id / str(archive["fileName"])
    data = path.read_bytes()
    assert len(data) == archive["sizeBytes"]
    assert hashlib.sha256(data).hexdigest() == archive["sha256"]
    return path


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one moment (an interval ending when another starts does not
    overlap it)."""
    points = [(begin, 1) for begin, _ in intervals] + [(end, -1) for _, end in intervals]
    points.sort(key=lambda p: (p[0], p[1]))
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


# -- 1. cancel versus complete, deterministically (seeds/002) -------------------------------


async def test_a_cancel_committed_while_completion_is_held_wins(
    client: Client, export_config: ExportConfig
) -> None:
    archive_root = Path(export_config.archive_root)
    ready = asyncio.Event()
    release = asyncio.Event()

    async def hold(_job_id: uuid.UUID) -> None:
        ready.set()
        await release.wait()

    client.app[WORKER].before_outcome = hold
    try:
        job_id = await start(client, "demo")
        await asyncio.wait_for(ready.wait(), 30)
        # The archive is written and about to be announced ...
        # The archive is built and waits in the job's scratch folder; it is published only
        # together with `completed`.
        work_root = Path(export_config.work_root)
        assert any(p.suffix == ".zip" for p in (work_root / job_id).iterdir())
        # ... when the user's cancel commits.
        code, body = await cancel(client, "demo", job_id)
        assert code == 202, body
        cancel_seq = body["seq"]
    finally:
        release.set()

    final = await wait_status(client, "demo", job_id)
    assert final["state"]["status"] == "cancelled", final
    log = await events(client, "demo", job_id)
    assert_state_is_the_fold(final, log)
    assert [e.type for e in outcomes(log)] == ["export:cancelled"]
    assert "export:completed" not in [e.type for e in log]
    assert log[cancel_seq - 1].type == "export:cancel-requested"
    assert final["state"]["archive"] is None
    assert not (archive_root / job_id).exists()
    again, answer = await cancel(client, "demo", job_id)
    assert again == 409
    assert answer["error"]["outcome"] == "cancelled"


async def test_a_cancel_after_the_held_completion_is_refused(
    client: Client, export_config: ExportConfig
) -> None:
    ready = asyncio.Event()
    release = asyncio.Event()

    async def hold(_job_id: uuid.UUID) -> None:
        ready.set()
        await release.wait()

    client.app[WORKER].before_outcome = hold
    try:
        job_id = await start(client, "demo")
        await asyncio.wait_for(ready.wait(), 30)
    finally:
        release.set()
    done = await wait_status(client, "demo", job_id)
    assert done["state"]["status"] == "completed", done

    code, body = await cancel(client, "demo", job_id)
    assert code == 409, body
    assert body["error"]["outcome"] == "completed"
    assert body["error"]["seq"] == done["seq"]
    final = await status(client, "demo", job_id)
    assert final["state"]["status"] == "completed"
    assert final["seq"] == done["seq"]
    log = await events(client, "demo", job_id)
    assert_state_is_the_fold(final, log)
    assert [e.type for e in outcomes(log)] == ["export:completed"]
    assert "export:cancel-requested" not in [e.type for e in log]
    assert_archive_matches(Path(client.app[WORKER].archive_root), job_id, final["state"])


# -- 2. cancel versus complete at random, across two processes ------------------------------


async def test_random_cancels_through_two_processes_leave_one_consistent_outcome(
    make_client: ClientFactory, export_config: ExportConfig, tiny_project: str
) -> None:
    apps = [
        await make_client(worker_id="race-a", workers=4, per_user_limit=8),
        await make_client(worker_id="race-b", workers=4, per_user_limit=8),
    ]
    archive_root = Path(export_config.archive_root)
    rng = random.Random(2002)
    # Starts are spread over a few seconds so that jobs do not wait in a long queue: each
    # cancel then races its job's completion, not its place in the queue.
    plans = [
        (
            rng.uniform(0.0, 6.0),
            rng.choice(apps),
            rng.uniform(0.0, 0.3),
            rng.choice(apps),
            rng.choice(["alice", "bob"]),
        )
        for _ in range(150)
    ]

    async def start_then_cancel(
        offset: float, starter: Client, delay: float, canceller: Client, user: str
    ) -> tuple[str, int, dict[str, Any]]:
        await asyncio.sleep(offset)
        job_id = await start(starter, tiny_project, user=user)
        await asyncio.sleep(delay)
        code, body = await cancel(canceller, tiny_project, job_id, user=user)
        return job_id, code, body

    answers = await asyncio.gather(*(start_then_cancel(*plan) for plan in plans))
    job_ids = [job_id for job_id, _, _ in answers]
    await wait_all_ended(apps[0], job_ids, timeout=30)

    seen: dict[str, int] = defaultdict(int)
    for (job_id, code, body), (_, _, _, reader, _) in zip(answers, plans, strict=True):
        assert code in (202, 409), (job_id, code, body)
        final = await status(reader, tiny_project, job_id)
        log = await events(reader, tiny_project, job_id)
        assert_state_is_the_fold(final, log)
        ends = outcomes(log)
        assert len(ends) == 1, (job_id, [e.type for e in log])
        outcome = ends[0].type.removeprefix("export:")
        seen[outcome] += 1
        if outcome == "cancelled" and "export:started" in [e.type for e in log]:
            seen["cancelled while running"] += 1
        assert final["state"]["status"] == outcome
        assert [e.type for e in log].count("export:started") <= 1, (job_id, log)
        if code == 202:
            # A confirmed cancel is a cancel: nothing can complete after it.
            assert outcome == "cancelled", (job_id, [e.type for e in log])
            assert log[body["seq"] - 1].type == "export:cancel-requested"
        else:
            assert body["error"]["outcome"] == outcome, (job_id, body)
            assert body["error"]["seq"] <= final["seq"]
        if outcome == "completed":
            assert_archive_matches(archive_root, job_id, final["state"])
        else:
            assert not (archive_root / job_id).exists(), (job_id, outcome)
    # The race ran both ways (and the rare failure would be a bug of its own).
    assert seen["completed"] > 0, seen
    assert seen["cancelled while running"] > 0, seen
    assert seen["failed"] == 0, seen


# -- 3. two processes share one queue --------------------------------------------------------


async def test_two_processes_share_the_queue_and_never_run_a_job_twice(
    make_client: ClientFactory, tiny_project: str
) -> None:
    limit = 2
    apps = [
        await make_client(worker_id="share-a", workers=3, per_user_limit=limit),
        await make_client(worker_id="share-b", workers=3, per_user_limit=limit),
    ]
    users = ("alice", "bob")
    owners = [users[i % 2] for i in range(200)]
    job_ids = await asyncio.gather(
        *(start(apps[i % 2], tiny_project, user=owner) for i, owner in enumerate(owners))
    )
    await wait_all_ended(apps[0], list(job_ids), timeout=60)

    ran_by: dict[str, int] = defaultdict(int)
    running: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for job_id, owner in zip(job_ids, owners, strict=True):
        log = await events(apps[1], tiny_project, job_id)
        types = [e.type for e in log]
        assert types[-1] == "export:completed", (job_id, types)
        assert types.count("export:started") == 1, (job_id, types)
        assert "export:resumed" not in types, (job_id, types)
        workers = {e.actor for e in log if e.actor.startswith("worker:")}
        assert len(workers) == 1, (job_id, workers)
        (worker,) = workers
        started = next(e for e in log if e.type == "export:started")
        assert isinstance(started.data, Started)
        assert f"worker:{started.data.worker_id}" == worker
        ran_by[worker] += 1
        running[owner].append((started.occurred_at, outcomes(log)[0].occurred_at))
    assert set(ran_by) == {"worker:share-a", "worker:share-b"}, ran_by
    # From `started` to the outcome a job certainly runs (its claim spans a little more), so
    # this undercounts running jobs; it never overcounts them.
    peaks = {owner: max_overlap(spans) for owner, spans in running.items()}
    assert all(peak <= limit for peak in peaks.values()), (
        f"a user had more than per_user_limit={limit} exports running at once: {peaks}"
    )


async def test_a_backlog_of_one_user_is_claimed_within_the_per_user_limit(
    make_client: ClientFactory, tiny_project: str
) -> None:
    """Six queued jobs of one user, six free slots, a limit of two: only two may run."""
    limit = 2
    client = await make_client(workers=6, per_user_limit=limit, worker_id="limited")
    held: set[uuid.UUID] = set()
    release = asyncio.Event()

    async def hold(job_id: uuid.UUID) -> None:
        held.add(job_id)
        await release.wait()

    client.app[WORKER].before_outcome = hold
    # The backlog appears at once, as after a restart: one claim could take all of it.
    jobs = [uuid.uuid4() for _ in range(6)]
    queued = Queued(requested_by="alice")
    results = await client.app[EVENTLOG].append_many(
        [
            AppendRequest(
                job_id=job,
                expected_seq=0,
                events=[NewEvent(data=queued, actor="user:alice")],
                project_id=tiny_project,
                owner_id="alice",
            )
            for job in jobs
        ]
    )
    assert all(isinstance(result, AppendResult) for result in results), results
    try:
        await wait_for(lambda: len(held) >= limit, timeout=30, interval=0.02)
        async with client.app[POOL].acquire() as conn:
            claimed = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE owner_id = 'alice' "
                "AND lease_owner IS NOT NULL AND lease_expires_at > now()"
            )
        assert max(claimed, len(held)) <= limit, (
            f"{claimed} of alice's jobs claimed at once, {len(held)} running; limit {limit}"
        )
    finally:
        release.set()
    job_ids = [str(job) for job in jobs]
    await wait_all_ended(client, job_ids, timeout=30)
    spans = []
    for job_id in job_ids:
        log = await events(client, tiny_project, job_id)
        assert [e.type for e in outcomes(log)] == ["export:completed"]
        started = next(e for e in log if e.type == "export:started")
        spans.append((started.occurred_at, outcomes(log)[0].occurred_at))
    assert max_overlap(spans) <= limit


# -- 4. a worker killed mid-job is taken over ------------------------------------------------


async def test_a_worker_killed_mid_job_is_taken_over_and_the_job_completes(
    make_client: ClientFactory, export_config: ExportConfig, tmp_path: Path
) -> None:
    front = await make_client(workers=0, worker_id="front")
    job_id = await start(front, "big")
    env = {
        **os.environ,
        "DATABASE_URL": export_config.database_url,
        "EXPORT_HOST": "127.0.0.1",
        "EXPORT_PORT": "0",
        "EXPORT_JWT_SECRET": SECRET,
        "EXPORT_DATA_ROOT": export_config.data_root,
        "EXPORT_WORK_ROOT": export_config.work_root,
        "EXPORT_ARCHIVE_ROOT": export_config.archive_root,
        "EXPORT_WORKERS": "1",
        "EXPORT_LEASE_SECONDS": "2",
        "EXPORT_POLL_INTERVAL": "0.2",
        "EXPORT_WORKER_ID": "doomed",
        "EXPORT_MIGRATE": "false",
        "EXPORT_LOG_JSON": "true",
        "EXPORT_POOL_MIN": "1",
        "EXPORT_POOL_MAX": "4",
    }
    output = tmp_path / "doomed.log"
    with output.open("wb") as sink:
        doomed = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.export",
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:

        async def doomed_is_mid_job() -> bool:
            assert doomed.returncode is None, output.read_text()
            log = await events(front, "big", job_id)
            # Kill it after the first stage, so that the takeover has finished work to reuse.
            return any(
                e.actor == "worker:doomed"
                and isinstance(e.data, Progress)
                and e.data.stage not in (None, "images")
                for e in log
            )

        await wait_for(doomed_is_mid_job, timeout=30, interval=0.02)
        os.kill(doomed.pid, signal.SIGKILL)
        assert await asyncio.wait_for(doomed.wait(), 10) == -signal.SIGKILL
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await asyncio.wait_for(doomed.wait(), 10)

    before = await events(front, "big", job_id)
    assert not outcomes(before), "the worker finished before it was killed"
    reached = max(e.data.progress for e in before if isinstance(e.data, Progress))

    # The dead worker finished copying the images; its scratch folder is shared and intact.
    staged = staged_files(Path(export_config.work_root) / job_id / "staging" / "images")
    assert len(staged) == 300

    await make_client(workers=1, lease_seconds=2.0, worker_id="rescuer")

    async def rescuer_past_images() -> bool:
        log = await events(front, "big", job_id)
        return bool(outcomes(log)) or any(
            e.actor == "worker:rescuer"
            and isinstance(e.data, Progress)
            and e.data.stage not in (None, "images")
            for e in log
        )

    await wait_for(rescuer_past_images, timeout=45, interval=0.02)
    # The rescuer works on the next stage (staging goes only once the archive is written):
    # the images the dead worker copied were used as they were.
    reused = staged_files(Path(export_config.work_root) / job_id / "staging" / "images")
    assert reused == staged, "the takeover copied the finished images again"
    final = await wait_status(front, "big", job_id, timeout=45)
    assert final["state"]["status"] == "completed", final
    log = await events(front, "big", job_id)
    assert_state_is_the_fold(final, log)
    assert [e.type for e in outcomes(log)] == ["export:completed"]
    assert [e.type for e in log].count("export:started") == 1
    resumed = [e for e in log if e.type == "export:resumed"]
    assert len(resumed) == 1, [e.type for e in log]
    assert resumed[0].actor == "worker:rescuer"
    assert isinstance(resumed[0].data, Resumed)
    assert resumed[0].data.previous_worker == "doomed"
    assert resumed[0].data.worker_id == "rescuer"
    assert resumed[0].data.attempt == 2
    assert resumed[0].data.from_stage not in (None, "images")
    after = log[resumed[0].seq :]
    assert {e.actor for e in after} == {"worker:rescuer"}
    assert all(e.actor == "worker:doomed" for e in log[1 : resumed[0].seq - 1])
    assert outcomes(log)[0].actor == "worker:rescuer"
    assert_finished_stages_not_redone(log, resumed[0])
    first_new = next(e.data.progress for e in after if isinstance(e.data, Progress))
    assert first_new >= reached, (reached, first_new)
    assert_progress_never_decreases(log)

    path = assert_archive_matches(Path(export_config.archive_root), job_id, final["state"])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
    assert len([n for n in names if n.startswith("images/")]) == 300
    assert len([n for n in names if n.startswith("visualizations/")]) == 300
    assert not (Path(export_config.work_root) / job_id).exists()


# -- 5. a job whose workers keep dying fails as worker_lost ---------------------------------


async def test_a_job_that_outlives_its_attempts_fails_as_worker_lost(
    make_client: ClientFactory, export_config: ExportConfig
) -> None:
    front = await make_client(workers=0, worker_id="front")
    job_id = await start(front, "big")
    job = uuid.UUID(job_id)
    # A worker "ghost" claimed the job, started it, and died: its lease has run out.
    started = Started(worker_id="ghost", attempt=1, total_items=1505)
    await front.app[EVENTLOG].append(job, 1, [NewEvent(data=started, actor="worker:ghost")])
    async with front.app[POOL].acquire() as conn:
        claimed = await conn.execute(
            "UPDATE jobs SET lease_owner = 'ghost', attempts = 1, "
            "lease_expires_at = now() - interval '1 second' WHERE job_id = $1",
            job,
        )
    assert claimed == "UPDATE 1"

    await make_client(workers=1, lease_seconds=2.0, max_attempts=1, worker_id="rescuer")
    final = await wait_status(front, "big", job_id)
    state = final["state"]
    assert state["status"] == "failed", final
    assert state["failure"]["code"] == "worker_lost"
    assert state["failure"]["retryable"] is True
    assert state["failure"]["message"]["key"] == "export.failed.worker_lost"
    log = await events(front, "big", job_id)
    assert_state_is_the_fold(final, log)
    assert [e.type for e in log] == ["export:queued", "export:started", "export:failed"]
    assert log[-1].actor == "worker:rescuer"
    assert not (Path(export_config.archive_root) / job_id).exists()


# -- 6. graceful shutdown hands running jobs back --------------------------------------------


async def test_a_graceful_shutdown_hands_the_job_to_another_process(
    make_client: ClientFactory, export_config: ExportConfig
) -> None:
    first = await make_client(workers=1, worker_id="leaving")
    job_id = await start(first, "big")

    async def mid_job() -> bool:
        state = (await status(first, "big", job_id))["state"]
        assert state["status"] in ("queued", "running"), state
        # Past the first stage, so that the next process has finished work to reuse.
        return state["stage"] not in (None, "images")

    await wait_for(mid_job, timeout=30, interval=0.02)
    await asyncio.wait_for(first.close(), 20)
    # Handed back, the job keeps its scratch folder: the first stage's work is there to reuse.
    staged = staged_files(Path(export_config.work_root) / job_id / "staging" / "images")
    assert len(staged) == 300, f"{len(staged)} staged images kept after the hand-back"

    second = await make_client(workers=1, worker_id="staying")
    final = await wait_status(second, "big", job_id, timeout=45)
    assert final["state"]["status"] == "completed", final
    log = await events(second, "big", job_id)
    assert_state_is_the_fold(final, log)
    types = [e.type for e in log]
    assert "export:cancelled" not in types
    assert "export:failed" not in types
    assert types.count("export:started") == 1
    resumed = [e for e in log if e.type == "export:resumed"]
    assert len(resumed) == 1, types
    assert resumed[0].actor == "worker:staying"
    assert isinstance(resumed[0].data, Resumed)
    assert resumed[0].data.previous_worker == "leaving"
    assert resumed[0].data.attempt == 1  # a graceful hand-back is not a failed attempt
    assert outcomes(log)[0].actor == "worker:staying"
    assert resumed[0].data.from_stage is not None
    assert_finished_stages_not_redone(log, resumed[0])
    assert_progress_never_decreases(log)
    assert_archive_matches(Path(export_config.archive_root), job_id, final["state"])


# -- 7. a failing export is reported, and the service keeps serving ---------------------------


@pytest.fixture
def faulty_projects(tmp_path: Path) -> Path:
    root = tmp_path / "faulty-projects"
    broken = root / "broken"
    (broken / "images").mkdir(parents=True)
    document = {
        "categories": [{"id": 1, "name": "circle"}],
        "images": [
            {
                "file": "images/a.png",
                "width": 10,
                "height": 10,
                # A polygon needs at least three points.
                "objects": [{"id": 1, "category": 1, "polygon": [[0, 0], [5, 5]]}],
            }
        ],
    }
    (broken / "annotations.json").write_text(json.dumps(document))
    corrupt = create_demo_project(root, "corrupt", images=3, seed=4)
    (corrupt / "images" / "img_0002.png").write_bytes(b"this is not a PNG at all")
    create_demo_project(root, "good", images=3, seed=4)
    return root


async def test_failing_exports_are_reported_and_the_service_keeps_serving(
    make_client: ClientFactory, faulty_projects: Path, export_config: ExportConfig
) -> None:
    client = await make_client(data_root=str(faulty_projects), worker_id="faulty")
    projects = ("broken", "corrupt", "good")
    archive_root = Path(export_config.archive_root)

    async def run(project: str) -> tuple[str, dict[str, Any], list[Event]]:
        job_id = await start(client, project, projects=projects)
        final = await wait_status(client, project, job_id, projects=projects)
        log = await events(client, project, job_id, projects=projects)
        assert_state_is_the_fold(final, log)
        assert len(outcomes(log)) == 1
        return job_id, final["state"], log

    job_id, state, log = await run("broken")
    assert state["status"] == "failed", state
    assert state["failure"]["code"] == "malformed_annotation"
    assert state["failure"]["retryable"] is False
    assert state["failure"]["message"]["key"] == "export.failed.malformed_annotation"
    assert log[-1].actor == "worker:faulty"
    assert not (archive_root / job_id).exists()

    job_id, state, log = await run("corrupt")
    assert state["status"] == "failed", state
    assert state["failure"]["code"] == "unreadable_file"
    assert state["failure"]["retryable"] is False
    assert state["failure"]["stage"] == "images"
    assert not (archive_root / job_id).exists()
    assert not (Path(export_config.work_root) / job_id).exists()

    job_id, state, _log = await run("good")
    assert state["status"] == "completed", state
    assert_archive_matches(archive_root, job_id, state)


async def test_a_worker_that_lost_its_lease_can_write_nothing(
    export_config: ExportConfig, pool: asyncpg.Pool
) -> None:
    """The fence: once another worker holds the job, the old one's appends are refused."""
    eventlog = EventLog(pool)
    job_id = uuid.uuid4()
    await eventlog.append(
        job_id,
        0,
        [NewEvent(data=Queued(requested_by="alice"), actor="user:alice")],
        project_id="demo",
        owner_id="alice",
    )
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE jobs SET lease_owner = 'new-owner',"
            " lease_expires_at = now() + interval '1 hour' WHERE job_id = $1",
            job_id,
        )
    state = await eventlog.job_state(job_id)
    assert state is not None
    old = Worker(pool, eventlog, export_config, worker_id="old-owner")
    job = RunningJob(job_id=job_id, project_id="demo", state=state, seq=1, attempt=1)
    with pytest.raises(LeaseLost):
        await old._append(job, Started(worker_id="old-owner"))
    assert job.lease_lost
    assert job.cancel.is_set()
    assert [e.type for e in await eventlog.read_stream(job_id)] == ["export:queued"]
