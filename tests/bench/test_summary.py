"""The summary table renders from hand-made result documents (no benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import summary

from . import sample_results


def _rows(table: summary.Summary, benchmark: str) -> list[summary.Row]:
    return [row for row in table.rows if row.benchmark == benchmark]


def _figure(rows: list[summary.Row], start: str) -> summary.Row:
    """The one row whose figure is `start`, or failing that starts with it."""
    exact = [row for row in rows if row.figure == start]
    (row,) = exact or [row for row in rows if row.figure.startswith(start)]
    return row


def test_one_table_of_every_headline_figure(tmp_path: Path) -> None:
    sample_results.write_all(tmp_path)
    results = summary.load_results(tmp_path, ["appends", "export", "fanout", "socketio"])
    timings = [
        {"name": "appends", "budget": 240.0, "elapsed": 150.2, "failed": False},
        {"name": "fanout", "budget": 180.0, "elapsed": 190.0, "failed": True},
    ]
    table = summary.build(results, timings=timings, plots=[tmp_path / "fanout_memory.png"])

    markdown = table.markdown()
    assert markdown.count("| benchmark | figure |") == 1
    assert [line for line in markdown.splitlines() if line.startswith("| ")][1].startswith("| :---")
    for benchmark in ("appends", "export", "fanout", "socketio"):
        assert _rows(table, benchmark), benchmark
    assert "PostgreSQL 16.4" in markdown
    assert f"{table.machine['cores']} cores" in markdown
    assert "appends 2:30 of 4:00" in markdown
    assert "fanout 3:10 of 3:00 (FAILED)" in markdown
    assert "![fanout_memory](fanout_memory.png)" in markdown

    fanout = {row.figure: row for row in _rows(table, "fanout")}
    big = fanout["fan-out to 5,000 clients of one job: deliveries"]
    assert big.measured == "30,000/s"
    assert big.baseline == "raw websockets broadcast: 48,000/s"
    assert big.ratio == "0.62×"
    assert big.goal == "≥ 0.7× raw"
    assert big.met is False
    assert fanout["fan-out to 1,000 clients of one job: deliveries"].met is True
    latency = [row for row in fanout.values() if row.figure.startswith("commit-to-client p99")]
    assert [row.met for row in latency] == [True, False, None]
    storm = next(row for row in fanout.values() if row.figure.startswith("reconnect storm"))
    assert (storm.measured, storm.met) == ("3.90 s", True)
    assert "2.67 s" in storm.baseline  # the raw server with the gateway's listen backlog
    memory = next(row for row in fanout.values() if row.figure.startswith("memory"))
    assert (memory.measured, memory.baseline, memory.met) == (
        "18.9 kB",
        "raw websockets: 15.1 kB",
        True,
    )
    replay = next(r for r in fanout.values() if "replay" in r.figure)
    assert "10,000 events behind" in replay.figure
    # The first reconnection reads from the log; the ratio is the honest one, against the query.
    assert (replay.measured, replay.ratio) == (
        "202 ms from the log; again: 101 ms (cached)",
        "8.00×",
    )

    socketio = _rows(table, "socketio")
    assert socketio[0].ratio == "3.99×"
    assert socketio[0].met is False
    full_speed = _figure(socketio, "latency p99 at full speed")
    assert (full_speed.measured, full_speed.baseline, full_speed.ratio) == (
        "58.6 ms",
        "python-socketio: 85.2 ms",
        "0.69×",
    )
    memory = _figure(socketio, "memory per idle connection")
    assert (memory.measured, memory.baseline) == ("14.5 kB", "python-socketio: 31.4 kB")
    assert _figure(socketio, "events lost").measured == "0 of 800"

    export = _rows(table, "export")
    assert export[0].met is True
    # Judged on the rounds' paired ratios, not on the ratio of the medians (+6.0 %).
    assert "overhead +2.0 % by rounds, +6.0 % between medians" in export[0].measured
    assert export[0].ratio == "1.020×"
    assert export[1].ratio == "0.69×"

    group = _figure(_rows(table, "appends"), "group commit")
    assert group.measured == "21,000/s, p99 18.5 ms"
    assert group.met is True
    assert group.ratio == "2.59×"

    md_path, json_path = summary.write(tmp_path, table)
    assert md_path.read_text() == markdown
    payload = json.loads(json_path.read_text())
    assert payload["machine"]["postgresql"] == "16.4"
    assert payload["machine"]["cores"]
    assert payload["machine"]["date"]
    assert len(payload["rows"]) == len(table.rows)
    assert payload["plots"] == ["fanout_memory.png"]


def test_group_commit_not_measured_without_its_keys() -> None:
    table = summary.build({"appends": sample_results.appends(group_commit=False)})
    group = table.rows[-1]
    assert group.figure == "group commit"
    assert group.measured == summary.NOT_MEASURED
    assert group.met is None
    assert "≥ 20,000 events/s from 1,000 jobs, p99 < 20 ms" in group.goal
    assert "| not measured |" in table.markdown()


def test_a_failed_benchmark_has_one_row_saying_so() -> None:
    table = summary.build({"fanout": None, "export": sample_results.export()})
    assert table.rows[0].benchmark == "fanout"
    assert table.rows[0].measured == summary.NOT_MEASURED
    assert [row.benchmark for row in table.rows[1:]] == ["export", "export"]


def test_results_without_the_paired_overhead_are_judged_on_the_medians() -> None:
    """Result files written before the paired figure existed still get a verdict."""
    document = sample_results.export()
    del document["reporting"]["paired_overhead_percent"]
    row = summary.build({"export": document}).rows[0]
    assert "overhead +6.0 %" in row.measured
    assert "by rounds" not in row.measured
    assert row.met is False


def test_missing_figures_show_as_dashes() -> None:
    table = summary.build({"fanout": {"fanout": [{"gateway": {"clients": 10}}]}})
    (row,) = table.rows
    assert (row.measured, row.ratio, row.met) == ("—", "—", None)
    assert table.table().text()


def test_the_rate_group_commit_sustains_has_a_row_of_its_own() -> None:
    data = sample_results.appends()
    data["group_sustained"] = {
        "offered_events_per_s": 10_000.0,
        "events_per_s": 9_950.0,
        "p99_ms": 14.2,
        "jobs": 1000,
    }
    kept = "group commit: the highest offered rate kept"
    row = _figure(summary.appends_rows(data), kept)
    assert row.measured == "10,000/s offered, 9,950/s delivered, p99 14.2 ms"
    data["group_sustained"] = None
    assert _figure(summary.appends_rows(data), kept).measured == "none of the rates tried"
    del data["group_sustained"]
    assert not [row for row in summary.appends_rows(data) if row.figure.startswith(kept)]


def test_the_cpu_an_append_costs_has_a_row_against_the_goals_budget() -> None:
    data = sample_results.appends()
    data["cpu_budget"] = {
        "jobs": 1000,
        "cpus": 2,
        "machine_cpu_us_per_append": 200.0,
        "client_cpu_us_per_append": 95.0,
        "elsewhere_cpu_us_per_append": 105.0,
        "ceiling_events_per_s": 10000,
        "goal_events_per_s": 20000.0,
        "goal_cpu_us_per_append": 100.0,
    }
    row = summary.appends_rows(data)[-1]
    assert row.figure == "group commit: CPU per append, 1,000 jobs closed loop"
    assert row.measured == "200 µs (95 µs in the writer's process): at most 10,000/s on 2 CPUs"
    assert (row.baseline, row.ratio) == ("the goal's budget: 100 µs", "2.00×")
    data["cpu_budget"] = None
    assert not [row for row in summary.appends_rows(data) if "CPU" in row.figure]


def test_the_closed_loop_stands_against_raw_inserts() -> None:
    """The open loop delivers what is offered; the closed loop's ratio is the log's capacity."""
    data = sample_results.appends()
    data["group_commit"] = {"events_per_s": 20000.0, "p99_ms": 5.4, "raw_events_per_s": 25000.0}
    data["sweep"][-1].update(events_per_s=35000.0, p99_ms=73.2, raw_events_per_s=25000.0)
    rows = summary.appends_rows(data)
    assert _figure(rows, "group commit").ratio == "0.80×"
    row = _figure(rows, "group commit, closed loop of 1,000 jobs")
    assert row.measured == "35,000/s, p99 73.2 ms"
    assert (row.baseline, row.ratio, row.met) == ("raw INSERTs: 25,000/s", "1.40×", None)
    del data["sweep"]
    assert not [row for row in summary.appends_rows(data) if "closed loop of" in row.figure]


def test_the_goal_is_met_by_an_open_loop_that_kept_up_with_what_it_was_offered() -> None:
    """The timed window's edges cut appends in flight: a log that keeps up with 20,000 offered
    delivers a few more or a few less, and the summary judges it as the appends note does."""
    data = sample_results.appends()
    data["group_commit"] = {"events_per_s": 19_989.0, "p99_ms": 6.7, "raw_events_per_s": 2e4}
    assert _figure(summary.appends_rows(data), "group commit").met is True
    data["group_commit"]["events_per_s"] = 19_000.0
    assert _figure(summary.appends_rows(data), "group commit").met is False
    data["group_commit"].update(events_per_s=20_003.0, p99_ms=20.5)
    assert _figure(summary.appends_rows(data), "group commit").met is False
