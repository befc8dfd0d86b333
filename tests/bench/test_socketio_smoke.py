"""The python-socketio side-by-side runs end to end in a tiny configuration, against a real
database: every server gets its figures and the result files are written. Speed is never
asserted."""

from __future__ import annotations

import json
from pathlib import Path

from bench import socketio_compare
from bench.common import machine_info, server_info, write_results

TINY = socketio_compare.Settings(
    seconds=0.3, warmup=0.1, clients=10, backlog_events=8, warm_clients=2, gap_seconds=0.3
)


async def test_side_by_side_produces_figures(database_url: str, tmp_path: Path) -> None:
    report = await socketio_compare.measure_all(database_url, TINY)

    assert set(report.sides) == {"raw websockets", "gateway", "python-socketio"}
    for name, side in report.sides.items():
        assert side.figure.deliveries > 0, name
    for name in ("gateway", "python-socketio"):
        assert report.sides[name].latencies_ms, name
        assert report.sides[name].missed_after_gap is not None, name
        assert report.sides[name].sent_during_gap_test, name
    assert report.ratio is not None

    rendered = socketio_compare.render(
        report,
        server=await server_info(database_url),
        machine=machine_info(),
        source="test",
        started_at="now",
        duration_seconds=1.0,
    )
    json_path, _md = write_results(tmp_path, socketio_compare.NAME, rendered.payload, "x")
    payload = json.loads(json_path.read_text())
    assert payload["sides"]["python-socketio"]["deliveries_per_s"] > 0
    assert payload["sides"]["gateway"]["latency_ms"]["p99"] is not None
