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
from bench.common import machine_info, parse_step, server_info, write_results

TINY = fanout.Settings(
    seconds=0.3,
    warmup=0.1,
    memory_clients=(5, 10, 20),
    fanout_clients=(10, 20),
    backlog_events=8,
    latency_clients=20,
    latency_clients_per_job=(1, 10),
    latency_rate=100.0,
    fanout_latency_rate=20.0,
    fanout_latency_seconds=0.3,
    writers=2,
    storm_jobs=2,
    storm_clients_per_job=10,
    storm_behind=10,
    storm_deadline=20.0,
    replay_gaps=(5, 50),
    replay_repeats=2,
    warm_clients=2,
    drain_timeout=10.0,
)


async def test_every_step_runs_and_writes_its_results(database_url: str, tmp_path: Path) -> None:
    messages: list[str] = []
    report = await fanout.measure_all(database_url, TINY, progress=messages.append)

    # Every measurement announced itself, in order, as n of the planned N.
    steps = [step for step in map(parse_step, messages) if step is not None]
    labels = TINY.steps()
    assert [(n, total) for n, total, _ in steps] == [
        (n, len(labels)) for n in range(1, len(labels) + 1)
    ]
    assert [label for _, _, label in steps] == labels

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
    assert [gateway.total for _, gateway in report.memory] == [5, 10, 20]
    for memory_pair in report.memory:
        for memory in memory_pair:
            assert memory.rss_after_kib, memory.server
            assert not memory.traffic_before
    assert [gateway.clients for _, gateway in report.fanout_latency] == [10, 20]
    for pair in report.fanout_latency:
        for timed in pair:
            assert timed.latencies_ms, timed.server
            assert timed.missing == 0, timed.server
    assert [replay.events for replay in report.replay] == [5, 50]
    for replay in report.replay:
        assert replay.complete, replay.replayed
        assert len(replay.seconds) == len(replay.raw_seconds) == 2
        assert replay.median is not None
        assert replay.median > 0
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
    assert payload["memory"][-1]["gateway"]["bytes_per_connection_total"] is not None
    assert payload["fanout_latency"][0]["gateway"]["latency_ms"]["p99"] is not None
    assert payload["replay"][-1]["events"] == 50
    assert payload["replay"][-1]["all_replayed"] is True
    markdown = md_path.read_text()
    for title in (
        "## Fan-out",
        "## Commit-to-client latency by clients",
        "## Commit-to-client latency",
        "## Reconnect storm",
        "## Memory",
        "## Replay after a gap",
    ):
        assert title in markdown


def test_quick_settings_say_they_are_reduced() -> None:
    quick = fanout.Settings.for_run(seconds=1.5, warmup=0.3, quick=True)
    full = fanout.Settings.for_run(seconds=5.0, warmup=1.0, quick=False)
    assert quick.reduced
    assert not full.reduced
    assert max(quick.fanout_clients) < max(full.fanout_clients)
    assert full.fanout_clients == (1000, 5000)
    assert full.connect_steps == (100, 1000, 5000)
    assert full.replay_gaps == (10, 100, 1000, 10000)
    assert full.storm_clients == 5000
    assert set(quick.fanout_clients) <= set(quick.connect_steps)
