"""Replicas: two gateways and two export services, each its own OS process, on one database.

A client of gateway A follows a job that export process B runs (A's export service only takes
requests: it has no workers); a client of gateway B follows the same project by position; a
cancel sent through gateway A reaches the export service behind it and stops B's worker. Nothing
is shared between the processes but PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from schemas.events import decode_event
from schemas.state import replay
from services.export.config import ExportConfig
from tests.export.conftest import SECRET, token
from tests.support import unpack, wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def process(
    module: str, env: dict[str, str], ready_url: str, output: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `python -m module` until the block ends (SIGTERM, then SIGKILL after 15 s); the block
    gets the child process (a test may kill it itself)."""
    with output.open("wb") as sink:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            env={**os.environ, **env},
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        async with aiohttp.ClientSession() as http:

            def died() -> str:
                return f"{module} exited {child.returncode}:\n{output.read_text()}"

            async def ready() -> bool:
                assert child.returncode is None, died()
                try:
                    async with http.get(ready_url) as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=30, interval=0.05)
        yield child
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), 15)
            except TimeoutError:
                child.kill()
                await child.wait()


async def follow(
    url: str, subscribe: dict[str, Any], until: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Every message of one subscription, replay frames unpacked, until `until` holds."""
    seen: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token()}))
        await ws.send(json.dumps(subscribe))
        async with asyncio.timeout(60):
            while True:
                for message in unpack(json.loads(await ws.recv())):
                    seen.append(message)
                    if until(message):
                        return seen


@pytest.mark.timeout(180)
async def test_a_client_of_one_gateway_sees_the_jobs_another_process_runs(
    export_config: ExportConfig, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("export-a", "export-b", "gateway-a", "gateway-b")}
    common = {
        "DATABASE_URL": export_config.database_url,
        "JWT_SECRET": SECRET,
        "EXPORT_HOST": "127.0.0.1",
        "EXPORT_DATA_ROOT": export_config.data_root,
        "EXPORT_WORK_ROOT": export_config.work_root,
        "EXPORT_ARCHIVE_ROOT": export_config.archive_root,
        "EXPORT_MIGRATE": "false",
        "EXPORT_LOG_JSON": "true",
        "EXPORT_POOL_MIN": "1",
        "EXPORT_POOL_MAX": "4",
        "EXPORT_POLL_INTERVAL": "0.5",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_LOG_JSON": "true",
        "GATEWAY_POLL_INTERVAL": "0.5",
    }

    def export(name: str, workers: int) -> dict[str, str]:
        return {
            **common,
            "EXPORT_PORT": str(ports[name]),
            "EXPORT_WORKERS": str(workers),
            "EXPORT_WORKER_ID": name,
        }

    def gateway(name: str, export_name: str) -> dict[str, str]:
        return {
            **common,
            "GATEWAY_PORT": str(ports[name]),
            "GATEWAY_EXPORT_URL": f"http://127.0.0.1:{ports[export_name]}",
        }

    def http(name: str) -> str:
        return f"http://127.0.0.1:{ports[name]}"

    async with AsyncExitStack() as stack:
        await asyncio.gather(
            stack.enter_async_context(
                process(
                    "services.export",
                    export("export-a", 0),
                    f"{http('export-a')}/readyz",
                    tmp_path / "export-a.log",
                )
            ),
            stack.enter_async_context(
                process(
                    "services.export",
                    export("export-b", 2),
                    f"{http('export-b')}/readyz",
                    tmp_path / "export-b.log",
                )
            ),
            stack.enter_async_context(
                process(
                    "services.gateway",
                    gateway("gateway-a", "export-a"),
                    f"{http('gateway-a')}/readyz",
                    tmp_path / "gateway-a.log",
                )
            ),
            stack.enter_async_context(
                process(
                    "services.gateway",
                    gateway("gateway-b", "export-b"),
                    f"{http('gateway-b')}/readyz",
                    tmp_path / "gateway-b.log",
                )
            ),
        )
        headers = {"Authorization": f"Bearer {token()}"}
        ws_a = f"ws://127.0.0.1:{ports['gateway-a']}/ws"
        ws_b = f"ws://127.0.0.1:{ports['gateway-b']}/ws"
        async with aiohttp.ClientSession(headers=headers) as api:
            # Asked of export A, which has no workers: only B can run it.
            async with api.post(f"{http('export-a')}/projects/demo/export") as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["jobId"]

            def completed(message: dict[str, Any]) -> bool:
                return message.get("type") == "export:completed" and message["jobId"] == job_id

            on_a, on_b = await asyncio.gather(
                follow(ws_a, {"type": "subscribe", "jobId": job_id, "afterSeq": 0}, completed),
                follow(
                    ws_b,
                    {"type": "subscribe", "projectId": "demo", "afterPosition": 0},
                    completed,
                ),
            )
            async with api.get(f"{http('export-b')}/projects/demo/export/{job_id}/events") as r:
                log = [decode_event(json.dumps(e)) for e in (await r.json())["events"]]

        events_a = [m for m in on_a if "eventId" in m]
        assert [e["seq"] for e in events_a] == list(range(1, len(events_a) + 1))
        assert [e["eventId"] for e in events_a] == [str(e.event_id) for e in log]
        assert replay([decode_event(json.dumps(e)) for e in events_a]) == replay(log)
        assert {e["actor"] for e in events_a if e["type"] == "export:started"} == {
            "worker:export-b"
        }
        events_b = [m for m in on_b if "eventId" in m and m["jobId"] == job_id]
        assert [e["eventId"] for e in events_b] == [e["eventId"] for e in events_a]

        # A cancel through gateway A reaches B's worker; the outcome reaches both gateways.
        async with (
            aiohttp.ClientSession(headers=headers) as api,
            api.post(f"{http('export-b')}/projects/big/export") as response,
        ):
            assert response.status == 202, await response.text()
            big = (await response.json())["jobId"]

        async with websockets.connect(ws_a) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token()}))
            await ws.send(json.dumps({"type": "subscribe", "jobId": big, "afterSeq": 0}))
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(60):
                while not any(m.get("type") == "export:progress" for m in seen):
                    seen += unpack(json.loads(await ws.recv()))
                await ws.send(json.dumps({"type": "export:cancel", "jobId": big}))
                while seen[-1].get("type") != "export:end-of-stream":
                    seen += unpack(json.loads(await ws.recv()))
        ack = next(m for m in seen if m["type"] == "export:cancel-ack")
        assert ack["accepted"] is True
        types = [m["type"] for m in seen if "eventId" in m]
        assert types[-2:] == ["export:cancel-requested", "export:cancelled"] or (
            "export:cancel-requested" in types and types[-1] == "export:cancelled"
        )
        cancelled = next(m for m in seen if m.get("type") == "export:cancelled")
        assert cancelled["actor"] == "worker:export-b"
