"""What an operator sees of the export service: request ids on responses and on every log line
of a request, job ids on every log line of a job, and the figures on /metrics."""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common.gcpacer import NEVER, GcPacer
from services.export.app import GC_PERIOD, GC_YOUNG, create_app, gc_pacer
from services.export.config import ExportConfig
from tests.export.conftest import SECRET, Client, ClientFactory, auth
from tests.export.test_api import start
from tests.export.test_replicas import free_port, process
from tests.support import wait_for


async def test_every_response_names_its_request(client: Client) -> None:
    fresh = await client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-ID"])
    again = await client.get("/healthz")
    assert again.headers["X-Request-ID"] != fresh.headers["X-Request-ID"]
    # A caller's own id is kept (one id across services), unless it is not a sane token.
    given = await client.get("/healthz", headers={"X-Request-ID": "lb-1234:abc"})
    assert given.headers["X-Request-ID"] == "lb-1234:abc"
    odd = await client.get("/healthz", headers={"X-Request-ID": "x" * 200})
    assert odd.headers["X-Request-ID"] != "x" * 200
    refused = await client.get("/projects/demo/export/not-a-uuid/status", headers=auth())
    assert refused.status >= 400
    assert "X-Request-ID" in refused.headers


@pytest.mark.timeout(120)
async def test_log_lines_carry_the_request_and_the_job(
    export_config: ExportConfig, tmp_path: Path
) -> None:
    """The JSON lines of a real export process: the request's id on the lines of a request, the
    job's id on every line its worker writes for it, whichever module writes them."""
    port = free_port()
    output = tmp_path / "export.log"
    env = {
        "DATABASE_URL": export_config.database_url,
        "JWT_SECRET": SECRET,
        "EXPORT_HOST": "127.0.0.1",
        "EXPORT_PORT": str(port),
        "EXPORT_DATA_ROOT": export_config.data_root,
        "EXPORT_WORK_ROOT": export_config.work_root,
        "EXPORT_ARCHIVE_ROOT": export_config.archive_root,
        "EXPORT_MIGRATE": "false",
        "EXPORT_LOG_JSON": "true",
        "EXPORT_POLL_INTERVAL": "0.2",
    }
    base = f"http://127.0.0.1:{port}"
    async with (
        process("services.export", env, f"{base}/readyz", output),
        aiohttp.ClientSession() as http,
    ):
        async with http.post(
            f"{base}/projects/demo/export", headers={**auth(), "X-Request-ID": "req-42"}
        ) as response:
            assert response.status == 202
            job_id = (await response.json())["jobId"]

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in output.read_text().splitlines() if line]

        def left() -> list[dict[str, Any]]:
            return [line for line in lines() if line.get("event") == "export job left"]

        await wait_for(lambda: bool(left()), timeout=60, interval=0.05)
        # The process runs its full collections on its own schedule (EXPORT_GC_PACING).
        async with http.get(f"{base}/metrics") as response:
            assert _sample(await response.text(), "export_gc_full_collections") is not None
    queued = [line for line in lines() if line.get("event") == "export queued"]
    assert [(line["request_id"], line["job_id"]) for line in queued] == [("req-42", job_id)]
    (ended,) = left()
    assert (ended["job_id"], ended["status"]) == (job_id, "completed")
    assert ended["seq"] > 2
    assert ended["worker"]
    assert "request_id" not in ended
    claimed = [line for line in lines() if line.get("event") == "export job claimed"]
    assert [line["job_id"] for line in claimed] == [job_id]


async def test_the_service_runs_full_collections_on_its_own_schedule(
    export_config: ExportConfig,
) -> None:
    """With a pacer installed, CPython never starts a full collection by itself; the service
    runs them on the pacer's period, and says so on /metrics."""
    saved = gc.get_threshold()
    pacer = GcPacer(max_period=0.05, check_every=0.02)
    client = TestClient(TestServer(create_app(export_config, gc_pacer=pacer)))
    pacer.install()
    try:
        assert gc.get_threshold()[2] == NEVER
        await client.start_server()
        await wait_for(lambda: pacer.collections >= 2, timeout=10)
        text = await (await client.get("/metrics")).text()
        assert (_sample(text, "export_gc_full_collections") or 0) >= 2
        assert (_sample(text, "export_gc_full_seconds") or 0) > 0
    finally:
        await client.close()
        pacer.uninstall()
        gc.set_threshold(*saved)
    assert gc.get_freeze_count() == 0


def test_the_service_collects_once_a_minute() -> None:
    pacer = gc_pacer()
    assert (pacer.max_period, pacer.duty, pacer.young) == (GC_PERIOD, 0.02, GC_YOUNG)
    assert (GC_PERIOD, GC_YOUNG) == (60.0, 10_000)
    assert ExportConfig().gc_pacing


def _sample(text: str, name: str, labels: str = "") -> float | None:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


async def test_metrics_count_appends_and_unfinished_jobs(make_client: ClientFactory) -> None:
    client = await make_client(metrics_interval=0.05, workers=0)
    before = await (await client.get("/metrics")).text()
    assert _sample(before, "export_jobs", 'status="queued"') == 0.0
    job_id = (await start(client))["jobId"]

    async def counted() -> bool:
        text = await (await client.get("/metrics")).text()
        return _sample(text, "export_jobs", 'status="queued"') == 1.0

    # No worker runs here: the job stays queued, and the count finds it.
    await wait_for(counted, timeout=10)
    text = await (await client.get("/metrics")).text()
    assert _sample(text, "export_events_appended_total", 'type="export:queued"') == 1.0
    assert (_sample(text, "export_append_seconds_count") or 0) >= 1
    assert _sample(text, "export_group_commit_waiting") == 0.0
    assert _sample(text, "export_group_commit_appends_count") is not None
    assert job_id

    async def lag_measured() -> bool:
        text = await (await client.get("/metrics")).text()
        return (_sample(text, "export_event_loop_lag_seconds_count") or 0) >= 1

    # The event loop's own lag, a tick every 0.1 s.
    await wait_for(lag_measured, timeout=10)
