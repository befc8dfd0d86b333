"""The fan-out benchmark runs end to end in its smallest configuration, against a real database.

Real processes (the gateway as deployed, the raw websockets server, the load client), a few
clients each and a fraction of a second per figure. Only that every step produces its figures and
the result files are written is checked: speed is never asserted in tests (shared, noisy
machines), but a benchmark that silently stopped measuring would go unnoticed until someone
needed its numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import fanout
from bench.common import machine_info, server_info, write_results

TINY = fanout.Settings(
    seconds=0.3,
    warmup=0.1,
    fanout_clients=(10, 20),
    backlog_events=8,
    latency_clients=20,
    latency_clients_per_job=(1, 10),
    latency_rate=100.0,
    writers=2,
    storm_jobs=2,
    storm_clients_per_job=10,
    storm_behind=10,
    storm_deadline=20.0,
    warm_clients=2,
    drain_timeout=10.0,
)


async def test_every_step_runs_and_writes_its_results(database_url: str, tmp_path: Path) -> None:
    report = await fanout.measure_all(database_url, TINY)

    assert [set(figures) for figures in report.fanout] == [
        {"raw broadcast", "raw batched", "gateway"}
    ] * len(TINY.fanout_clients)
    for figures in report.fanout:
        for name, figure in figures.items():
            assert figure.deliveries > 0, name
            assert figure.received > 0, name
    assert len(report.latency) == len(TINY.latency_clients_per_job)
    for pair in report.latency:
        for timed in pair:
            assert timed.events > 0, timed.server
            assert timed.latencies_ms, timed.server
    assert [(f.server, f.backlog) for f in report.storm] == [
        *(("raw", backlog) for backlog in TINY.storm_raw_backlogs),
        ("gateway", fanout.GATEWAY_BACKLOG),
    ]
    for storm in report.storm:
        assert storm.opened > 0, storm.label
    assert len(report.memory) == len(TINY.fanout_clients)
    assert report.frame_bytes > 0

    rendered = fanout.render(
        report,
        server=await server_info(database_url),
        machine=machine_info(),
        source="test",
        started_at="now",
        duration_seconds=1.0,
    )
    json_path, md_path = write_results(tmp_path, fanout.NAME, rendered.payload, rendered.markdown)
    payload = json.loads(json_path.read_text())
    assert payload["benchmark"] == "fanout"
    assert payload["fanout"][0]["gateway"]["deliveries_per_s"] > 0
    assert payload["storm"][-1]["server"] == "gateway"
    assert payload["server"]["server_version"]
    markdown = md_path.read_text()
    for title in ("## Fan-out", "## Commit-to-client latency", "## Reconnect storm", "## Memory"):
        assert title in markdown


def test_quick_settings_say_they_are_reduced() -> None:
    quick = fanout.Settings.for_run(seconds=1.5, warmup=0.3, quick=True)
    full = fanout.Settings.for_run(seconds=5.0, warmup=1.0, quick=False)
    assert quick.reduced
    assert not full.reduced
    assert max(quick.fanout_clients) < max(full.fanout_clients)
    assert full.fanout_clients == (1000, 5000)
    assert full.storm_clients == 5000
