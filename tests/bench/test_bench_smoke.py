"""The appends benchmark's moving parts run end to end against a real database.

Only that every figure is produced and positive is checked: speed is never asserted in tests
(shared, noisy machines), but a benchmark that silently stopped measuring would go unnoticed
until someone needed its numbers.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import asyncpg

from bench import appends
from bench.common import Sample, machine_info, server_info, write_results
from services.common.gcpacer import NEVER

# A fraction of a second per figure, two writers instead of sixteen, a small group commit.
TINY = appends.Settings(
    seconds=0.15,
    warmup=0.03,
    many=2,
    batch_events=5,
    jobs_per_writer=2,
    group_jobs=20,
    group_rate=400.0,
    group_lower_rates=(200.0,),
    group_max_batch=8,
    group_seconds=0.3,
    group_sweep=(1, 5),
    tail_page=50,
    long_job_events=600,
    tail_budget=1.0,
)


async def test_every_figure_is_produced_and_positive(database_url: str, tmp_path: Path) -> None:
    report = await appends.measure_all(database_url, TINY)

    assert set(report.samples) == {spec.key for spec in appends.plan(TINY)}
    for key, sample in report.samples.items():
        assert sample.events > 0, key
        assert sample.transactions > 0, key
        assert sample.events_per_s > 0, key
        assert sample.transactions_per_s > 0, key
        assert sample.p50_ms > 0, key
        assert sample.p99_ms >= sample.p50_ms, key
    for spec in report.specs:
        if spec.baseline is not None:
            ratio = report.ratio(spec.key, spec.baseline)
            assert ratio is not None
            assert ratio > 0, spec.key
    assert report.samples["tail"].extra["complete"] is True
    assert report.log_stats["events"] > 0

    # The run switched the commit-order lock off for one figure: it must be back on.
    conn = await asyncpg.connect(database_url)
    try:
        state = await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = $1",
            appends.APPEND_LOCK_TRIGGER,
        )
        superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = user")
    finally:
        await conn.close()
    assert state == "O"

    rendered = appends.render(
        report,
        server=await server_info(database_url),
        machine=machine_info(),
        source="test",
        started_at="now",
        duration_seconds=1.0,
    )
    json_path, md_path = write_results(tmp_path, appends.NAME, rendered.payload, rendered.markdown)
    payload = json.loads(json_path.read_text())
    assert payload["measurements"]["append_one_2"]["events_per_s"] > 0
    assert payload["group_commit"]["events_per_s"] > 0
    assert payload["group_commit"]["raw_events_per_s"] > 0
    assert [point["jobs"] for point in payload["sweep"]] == [1, 5]
    budget = payload["cpu_budget"]
    assert budget["jobs"] == 5
    assert budget["machine_cpu_us_per_append"] > 0
    assert budget["ceiling_events_per_s"] > 0
    assert budget["wal_bytes_per_event"] > 0
    assert any(note.startswith("Group commit, CPU per append") for note in payload["notes"])
    assert payload["server"]["server_version"]
    # A superuser may checkpoint: then every figure started from one, and the method says so.
    if superuser:
        assert payload["checkpoint_before_each_figure"] is True
        assert "and a CHECKPOINT" in md_path.read_text()
    assert "| measurement |" in md_path.read_text()
    # The run collected garbage on the export service's schedule, and gave the process back.
    assert payload["gc_pacing"]["period_seconds"] == 60
    assert "Garbage collected as the export service does" in md_path.read_text()
    assert gc.get_threshold()[2] != NEVER
    assert gc.get_freeze_count() == 0


def test_the_cpu_budget_is_the_machine_time_of_one_append() -> None:
    """1.5 busy cores for 2 s over 10,000 appends is 300 us an append, 120 us of it in this
    process; 2 CPUs then allow 6,667 appends/s, and 20,000/s leaves 100 us for each."""
    report = appends.Report(settings=appends.Settings(), specs=[])
    report.samples["group_closed_1000"] = Sample(
        events=10_000,
        transactions=50,
        seconds=2.0,
        latencies_ms=[1.0],
        client_cpu_seconds=1.2,
        machine_busy_cores=1.5,
    )
    budget = appends.cpu_budget(report, 2)
    assert budget == {
        "jobs": 1000,
        "cpus": 2,
        "machine_cpu_us_per_append": 300.0,
        "client_cpu_us_per_append": 120.0,
        "elsewhere_cpu_us_per_append": 180.0,
        "ceiling_events_per_s": 6667,
        "goal_events_per_s": 20_000.0,
        "goal_cpu_us_per_append": 100.0,
    }
    report.samples["group_closed_1000"].extra.update(
        wal_bytes_per_event=2300, full_page_images_per_1000_events=12.5
    )
    budget = appends.cpu_budget(report, 2)
    assert budget is not None
    assert (budget["wal_bytes_per_event"], budget["full_page_images_per_1000_events"]) == (
        2300,
        12.5,
    )
    assert "2,300 bytes of WAL (12.5 full-page images per 1,000)" in appends._budget_note(budget)
    assert appends.cpu_budget(report, None) is None
    del report.samples["group_closed_1000"]
    assert appends.cpu_budget(report, 2) is None


async def test_a_checkpoint_during_a_figure_is_marked(database_url: str) -> None:
    """A checkpoint that completes while a figure runs is found from the server's control data
    and marked beside that figure's p99, with a note saying what it does to latency."""
    before = await appends._server_mark(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    after = await appends._server_mark(database_url)
    assert appends._server_figures(before, after)["checkpoint_completed"] is True
    assert appends._server_figures(after, after)["checkpoint_completed"] is False

    report = appends.Report(settings=TINY, specs=appends.plan(TINY))
    spec = report.specs[0]
    report.samples[spec.key] = Sample(
        events=10,
        transactions=10,
        seconds=1.0,
        latencies_ms=[1.0, 250.0],
        client_cpu_seconds=0.1,
        extra={"checkpoint_completed": True},
    )
    assert appends.CHECKPOINT_MARK in appends.figures_table(report).text()
    assert any(
        "checkpoint of the server completed during 1 of" in n for n in appends._notes(report)
    )
