"""`python -m bench`: its plan, and the end of a run (plots, summary, timings), without a
benchmark running."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench.common import Planned

from . import sample_results


def test_every_benchmark_has_a_budget_and_the_suite_fits_in_ten_minutes() -> None:
    assert set(cli.PLAN) == set(cli.BENCHMARKS)
    assert sum(budget.full for budget in cli.PLAN.values()) <= cli.TOTAL_BUDGET_SECONDS
    for name, budget in cli.PLAN.items():
        assert budget.quick < budget.full, name


def test_seconds_and_budgets() -> None:
    assert cli.seconds_for("fanout", quick=False, seconds=None) == cli.PLAN["fanout"].seconds
    assert cli.seconds_for("fanout", quick=True, seconds=None) == cli.QUICK_SECONDS
    assert cli.seconds_for("fanout", quick=True, seconds=7.0) == 7.0
    full = cli.PLAN["appends"].full
    assert cli.budget_for("appends", quick=False, seconds=cli.PLAN["appends"].seconds) == full
    assert cli.budget_for("appends", quick=False, seconds=1.0) == full
    assert cli.budget_for("appends", quick=False, seconds=8.0) == full * 2
    args = cli.parse_args(["--quick", "--only", "fanout", "--only", "export", "--seconds", "2"])
    assert (args.quick, args.only, args.seconds) == (True, ["fanout", "export"], 2.0)
    with pytest.raises(SystemExit):
        cli.parse_args(["--seconds", "0"])


def test_timings_are_merged_across_runs(tmp_path: Path) -> None:
    assert cli.load_timings(tmp_path) == {}
    key = cli.timing_key("fanout", quick=False, seconds=3.0)
    assert key == "fanout full 3s"
    cli.save_timings(tmp_path, {key: {"elapsed": 120.0}})
    cli.save_timings(tmp_path, {"export full 5s": {"elapsed": 50.0}})
    assert cli.load_timings(tmp_path) == {
        key: {"elapsed": 120.0},
        "export full 5s": {"elapsed": 50.0},
    }


def test_the_end_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["appends", "export", "fanout", "socketio"]
    sample_results.write_all(tmp_path)
    plan = [Planned(name, budget=cli.PLAN[name].full, started=0.0, finished=10.0) for name in names]
    plan[-1].failed = True
    outcome = cli.Outcome(server={"server_version": "16.9"}, failed=["socketio"])
    seconds = {name: cli.PLAN[name].seconds for name in names}

    cli._finish(names, tmp_path, plan, outcome, seconds, quick=False, began=time.monotonic())

    out = capsys.readouterr().out
    assert out.count("| benchmark | figure |") == 1
    assert "PostgreSQL 16.9" in out
    assert "socketio 0:10 of 1:15 (FAILED)" in out
    # A failed benchmark's old results file is not used.
    assert "| socketio | (no results" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machine"]["postgresql"] == "16.9"
    assert len(summary["plots"]) == 4
    for name in summary["plots"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmark summary")
    timings = cli.load_timings(tmp_path)
    assert set(timings) == {cli.timing_key(n, quick=False, seconds=seconds[n]) for n in names[:3]}
