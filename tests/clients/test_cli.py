"""`exportlog` commands for people, run as a person would: a process against a running stack."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from pathlib import Path

import pytest

from schemas.events import Cancelled
from schemas.state import JobState
from services.common.eventlog import NewEvent
from services.usercli import progress_line
from tests.clients.conftest import Stack, StackFactory, token
from tests.support import new_job, progress, wait_for

ROOT = Path(__file__).resolve().parents[2]


async def exportlog(stack: Stack, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run `python -m services.cli ARGS` with the stack's URLs and a token, as the README says."""
    env = {
        **os.environ,
        "EXPORTLOG_URL": stack.export_url,
        "EXPORTLOG_GATEWAY_URL": stack.gateway_url,
        "TOKEN": token(),
    }
    env.pop("EXPORTLOG_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def working(make_stack: StackFactory) -> Stack:
    return await make_stack(workers=2)


async def test_start_shows_progress_until_the_archive_is_ready(working: Stack) -> None:
    code, out, err = await exportlog(working, "start", "demo")
    assert code == 0, err
    lines = out.splitlines()
    assert re.match(r"export [0-9a-f-]{36} queued", lines[0])
    shown = [float(m.group(1)) for m in re.finditer(r"\]\s+([\d.]+)%", out)]
    assert shown, out
    assert shown == sorted(shown), "progress went backwards"
    assert lines[-1].startswith("completed (")
    job_id = lines[0].split()[1]
    assert lines[-1].endswith(f"/projects/demo/export/{job_id}/download")


async def test_cancel_stops_a_running_export_and_says_who(working: Stack) -> None:
    started = await working.api.post(
        "/projects/big/export", headers={"Authorization": f"Bearer {token()}"}
    )
    job_id = (await started.json())["jobId"]

    async def running() -> bool:
        state = await working.eventlog.job_state(uuid.UUID(job_id))
        return state is not None and state.status == "running"

    await wait_for(running, timeout=30)
    code, out, err = await exportlog(working, "cancel", "big", job_id)
    assert code == 3, err
    assert "cancel requested" in out
    assert out.splitlines()[-1] == "cancelled (by user)"
    again, out, _ = await exportlog(working, "cancel", "big", job_id)
    assert again == 1
    assert "already ended" in out


async def test_follow_prints_events_and_history_shows_the_timeline(stack: Stack) -> None:
    job = await new_job(stack.eventlog, project="demo")
    await stack.eventlog.append(job, 2, [progress(25)])

    async def follow() -> str:
        _, out, _ = await exportlog(stack, "follow", "--job", str(job), "--json", timeout=30)
        return out

    # A job's stream ends after its outcome: follow returns by itself.
    follower = asyncio.create_task(follow())
    await stack.eventlog.append(job, 3, [progress(50)])
    await stack.eventlog.append(
        job, 4, [NewEvent(data=Cancelled(cancelled_by="user"), actor="user:alice")]
    )
    out = await follower
    assert [line.count('"seq"') for line in out.splitlines()] == [1] * 5
    assert '"type":"export:cancelled"' in out.splitlines()[-1]

    code, history, err = await exportlog(stack, "history", "demo")
    assert code == 0, err
    assert str(job) in history
    assert "cancelled" in history
    code, timeline, err = await exportlog(stack, "history", "demo", "--job", str(job))
    assert code == 0, err
    rows = timeline.splitlines()
    assert len(rows) == 5
    assert "export:queued" in rows[0]
    assert re.match(r"\s+\+\d+\.\d{3}s", rows[1])


async def test_commands_without_a_token_or_service_say_what_is_missing(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKEN", "EXPORTLOG_TOKEN")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "history",
        "demo",
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 2
    assert b"EXPORTLOG_TOKEN" in err
    code, _, err_text = await exportlog(stack, "history", "nowhere")
    assert code == 1
    assert "exportlog: no history (403" in err_text


def test_the_progress_line_fits_the_terminal() -> None:
    state = JobState(job_id=uuid.uuid4(), project_id="demo", status="running", progress=45.0)
    for width in (20, 60, 200):
        assert len(progress_line(state, width)) <= width
    assert "45.0%" in progress_line(state, 200)


async def test_verify_checks_a_range_of_the_log(stack: Stack, database_url: str) -> None:
    await new_job(stack.eventlog, project="demo")
    await new_job(stack.eventlog, project="big")
    env = {**os.environ, "DATABASE_URL": database_url}
    for args, expected in ((["--from", "1"], 0), (["--from", "5", "--to", "2"], 2), ([], 2)):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            "verify",
            *args,
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == expected, (args, err)
        if expected == 0:
            report = json.loads(out)
            assert report["ok"] is True
            assert report["eventsChecked"] == 4
            assert report["jobsChecked"] == 2


async def test_events_exports_the_history_as_ndjson_and_csv(stack: Stack) -> None:
    job = await new_job(stack.eventlog, project="demo")
    await new_job(stack.eventlog, project="big")
    code, ndjson, err = await exportlog(stack, "events", "--project", "demo")
    assert code == 0, err
    lines = [json.loads(line) for line in ndjson.splitlines()]
    assert [(e["jobId"], e["seq"]) for e in lines] == [(str(job), 1), (str(job), 2)]
    assert "up to log position" in err
    code, csv_text, err = await exportlog(
        stack, "events", "--project", "demo", "--type", "export:started", "--format", "csv"
    )
    assert code == 0, err
    rows = csv_text.splitlines()
    assert rows[0].startswith("position,jobId")
    assert len(rows) == 2
    assert "export:started" in rows[1]
    code, _, err = await exportlog(stack, "events", "--project", "elsewhere")
    assert code == 1
    assert "403" in err
