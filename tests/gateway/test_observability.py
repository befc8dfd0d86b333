"""What an operator sees of the gateway: subscriptions, replays and the lag of live events on
/metrics, and a connection id on every log line of a connection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from services.common.eventlog import EventLog
from services.gateway.config import GatewayConfig
from services.gateway.server import Gateway
from tests.export.test_replicas import free_port, process
from tests.gateway.conftest import SECRET, connect, receive_until, token
from tests.support import new_job, progress, wait_for


def sample(gateway: Gateway, name: str) -> float:
    return gateway.registry.get_sample_value(name) or 0.0


async def test_metrics_follow_subscriptions_replays_and_live_events(
    gateway: Gateway, eventlog: EventLog
) -> None:
    job_id = await new_job(eventlog)
    await eventlog.append(job_id, 2, [progress(float(i)) for i in range(1, 31)])
    replays_before = sample(gateway, "gateway_replay_seconds_count")
    ws = await connect(gateway)
    try:
        await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
        await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        assert sample(gateway, "gateway_subscriptions") == 1.0
        assert sample(gateway, "gateway_replay_seconds_count") == replays_before + 1
        assert sample(gateway, "gateway_replay_events_sum") >= 32
        assert sample(gateway, "gateway_replay_cache_events") >= 32  # what the replay read

        lag_before = sample(gateway, "gateway_event_lag_seconds_count")
        await eventlog.append(job_id, 32, [progress(99.0)])
        await receive_until(ws, lambda m: m.get("seq") == 33)
        assert sample(gateway, "gateway_event_lag_seconds_count") >= lag_before + 1

        await ws.send(json.dumps({"type": "unsubscribe", "jobId": str(job_id)}))
        await wait_for(lambda: sample(gateway, "gateway_subscriptions") == 0.0)
        # The event loop's own lag, a tick every 0.1 s.
        await wait_for(lambda: sample(gateway, "gateway_event_loop_lag_seconds_count") >= 1)
    finally:
        await ws.close()


@pytest.mark.timeout(60)
async def test_log_lines_of_a_connection_carry_its_id(database_url: str, tmp_path: Path) -> None:
    """The JSON lines of a real gateway process: a connection's lines name it and its user."""
    port = free_port()
    output = tmp_path / "gateway.log"
    env = {
        "DATABASE_URL": database_url,
        "JWT_SECRET": SECRET,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_LOG_JSON": "true",
    }
    async with process("services.gateway", env, f"http://127.0.0.1:{port}/readyz", output):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(json.dumps({"type": "auth", "token": token(roles=("auditor",))}))
            await ws.send(json.dumps({"type": "subscribe", "log": True}))
            await receive_until(ws, lambda m: m["type"] == "export:caught-up")

        def reads() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in output.read_text().splitlines() if line]
            return [line for line in lines if line.get("event") == "auditor read"]

        await wait_for(lambda: bool(reads()))
    (read,) = reads()
    assert len(read["connection_id"]) == 16
    assert read["user"] == "alice"


async def test_a_client_that_keeps_up_is_never_too_slow(
    database_url: str, eventlog: EventLog
) -> None:
    """One turn of the loop may send a client more than GATEWAY_MAX_QUEUE_BYTES (a replay frame
    of a page of events); a client whose socket takes it is not closed as too slow."""
    config = GatewayConfig(
        database_url=database_url, port=0, jwt_secret=SECRET, max_queue_bytes=4096, page_size=200
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        job_id = await new_job(eventlog)
        await eventlog.append(job_id, 2, [progress(float(i)) for i in range(1, 101)])
        ws = await connect(gateway)
        try:
            await ws.send(json.dumps({"type": "subscribe", "jobId": str(job_id), "afterSeq": 0}))
            seen = await receive_until(ws, lambda m: m["type"] == "export:caught-up")
        finally:
            await ws.close()
        assert [m["seq"] for m in seen if "eventId" in m] == list(range(1, 103))
        assert sample(gateway, "gateway_slow_clients_closed_total") == 0.0
    finally:
        await gateway.close()
