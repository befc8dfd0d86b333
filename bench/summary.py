"""One table of a run's headline figures, from the result files its benchmarks wrote.

``python -m bench`` ends with this table: every headline figure of every benchmark run, next to
its raw baseline from the same run, the ratio of the two (always figure ÷ baseline) and the goal
it is held to, if any. It is printed as Markdown and written to ``summary.md`` and
``summary.json`` in the results folder, with a description of the machine. Only what is in the
JSON files is used, so the table can be rebuilt from them (``python -m bench.summary [DIR]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_RESULTS_DIR,
    Table,
    cpu_model,
    format_duration,
    kept_up,
    utc_timestamp,
)

__all__ = [
    "GOALS",
    "Row",
    "Summary",
    "build",
    "describe_machine",
    "load_results",
    "rows_for",
    "write",
]

GOALS = {
    "fanout_ratio": 0.7,
    "latency_p99_ms": 50.0,
    "storm_seconds": 5.0,
    "bytes_per_connection": 20_000,
    "socketio_ratio": 4.0,
    "progress_overhead_percent": 5.0,
    "group_commit_events_per_s": 20_000,
    "group_commit_jobs": 1_000,
    "group_commit_p99_ms": 20.0,
}
"""The goals of the issue; the benchmarks hold their own copies, this is what the table says."""

NOT_MEASURED = "not measured"
HEADERS = (
    "benchmark",
    "figure",
    "measured",
    "raw baseline (same run)",
    "ratio",
    "goal",
    "met",
)


@dataclass
class Row:
    """One headline figure. `values` holds the numbers behind the cells (None when missing)."""

    benchmark: str
    figure: str
    measured: str
    baseline: str = "—"
    ratio: str = "—"
    goal: str = "—"
    met: bool | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> tuple[str, ...]:
        met = "—" if self.met is None else ("yes" if self.met else "NO")
        return (
            self.benchmark,
            self.figure,
            self.measured,
            self.baseline,
            self.ratio,
            self.goal,
            met,
        )


# --------------------------------------------------------------------------- helpers


def _get(data: Any, *path: str | int) -> Any:
    """data[path[0]][path[1]]…, or None where any step is missing."""
    for key in path:
        if isinstance(data, Mapping) and isinstance(key, str):
            data = data.get(key)
        elif isinstance(data, Sequence) and not isinstance(data, str) and isinstance(key, int):
            data = data[key] if -len(data) <= key < len(data) else None
        else:
            return None
        if data is None:
            return None
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _times(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}×"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}/s"


def _ms(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f} ms"


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f} s"


def _kb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1000:.1f} kB"


def _both(test: Callable[[float], bool], value: float | None) -> bool | None:
    return None if value is None else test(value)


# --------------------------------------------------------------------------- each benchmark


def _capacity_rows(data: Mapping[str, Any]) -> list[Row]:
    """The closed loop at its largest concurrency against raw INSERTs of the same run.

    The goal's figure is an open loop: it delivers what is offered and no more, so its ratio to
    raw INSERTs only says how the offered rate compares with them (below 1 on a machine where
    raw INSERTs pass 20,000/s). The closed loop is the most the log takes; its ratio is the one
    that carries over from one machine to another."""
    sweep = [point for point in data.get("sweep") or [] if isinstance(point, Mapping)]
    if not sweep:
        return []
    point = max(sweep, key=lambda p: p.get("jobs") or 0)
    rate = _number(point.get("events_per_s"))
    raw = _number(point.get("raw_events_per_s"))
    jobs = point.get("jobs")
    if rate is None or not isinstance(jobs, int):
        return []
    return [
        Row(
            "appends",
            f"group commit, closed loop of {jobs:,} jobs (the most it takes)",
            f"{_rate(rate)}, p99 {_ms(_number(point.get('p99_ms')))}",
            f"raw INSERTs: {_rate(raw)}" if raw is not None else "—",
            _times(_ratio(rate, raw)),
            values={"events_per_s": rate, "raw_events_per_s": raw},
        )
    ]


def appends_rows(data: Mapping[str, Any]) -> list[Row]:
    """One-event appends at 1 and at N writers against raw INSERTs, and group commit."""
    rows: list[Row] = []
    measurements = data.get("measurements") or {}

    def writers(key: str) -> int:
        return int(key.rsplit("_", 1)[1])

    keys = sorted(
        (key for key in measurements if re.fullmatch(r"append_one_\d+", key)), key=writers
    )
    for key in keys:
        figure = measurements[key]
        base_key = figure.get("baseline")
        base = measurements.get(base_key) if base_key else None
        rate, base_rate = _number(figure.get("events_per_s")), _number(_get(base, "events_per_s"))
        p99 = _number(_get(figure, "latency_ms", "p99"))
        rows.append(
            Row(
                "appends",
                f"`append`, 1 event per transaction, {writers(key)} "
                + ("writer" if writers(key) == 1 else "writers"),
                f"{_rate(rate)}, p99 {_ms(p99)}",
                f"{_get(base, 'label') or base_key}: {_rate(base_rate)}" if base else "—",
                _times(_ratio(rate, base_rate)),
                values={"events_per_s": rate, "p99_ms": p99, "baseline_events_per_s": base_rate},
            )
        )
    goal = (
        f"≥ {GOALS['group_commit_events_per_s']:,} events/s from "
        f"{GOALS['group_commit_jobs']:,} jobs, p99 < {GOALS['group_commit_p99_ms']:g} ms"
    )
    group = data.get("group_commit")
    if not isinstance(group, Mapping):
        rows.append(Row("appends", "group commit", NOT_MEASURED, goal=goal))
        return rows
    rate = _number(group.get("events_per_s"))
    p99 = _number(group.get("p99_ms"))
    raw = _number(group.get("raw_events_per_s"))
    met = None
    if rate is not None and p99 is not None:
        met = (
            kept_up(rate, GOALS["group_commit_events_per_s"]) and p99 < GOALS["group_commit_p99_ms"]
        )
    jobs = group.get("jobs")
    rows.append(
        Row(
            "appends",
            "group commit" + (f", {jobs:,} jobs" if isinstance(jobs, int) else ""),
            f"{_rate(rate)}, p99 {_ms(p99)}" if rate is not None else NOT_MEASURED,
            f"raw INSERTs: {_rate(raw)}" if raw is not None else "—",
            _times(_ratio(rate, raw)),
            goal,
            met,
            values={"events_per_s": rate, "p99_ms": p99, "raw_events_per_s": raw},
        )
    )
    held = data.get("group_sustained")
    if isinstance(held, Mapping):
        offered = _number(held.get("offered_events_per_s"))
        rate = _number(held.get("events_per_s"))
        p99 = _number(held.get("p99_ms"))
        rows.append(
            Row(
                "appends",
                "group commit: the highest offered rate kept with p99 < 20 ms, "
                f"{held.get('jobs', 0):,} jobs",
                f"{_rate(offered)} offered, {_rate(rate)} delivered, p99 {_ms(p99)}",
                f"raw INSERTs: {_rate(raw)}" if raw is not None else "—",
                _times(_ratio(rate, raw)),
                values={"events_per_s": rate, "p99_ms": p99, "offered_events_per_s": offered},
            )
        )
    elif "group_sustained" in data:
        rows.append(
            Row(
                "appends",
                "group commit: the highest offered rate kept with p99 < 20 ms",
                "none of the rates tried",
            )
        )
    rows.extend(_capacity_rows(data))
    budget = data.get("cpu_budget")
    if isinstance(budget, Mapping):
        total = _number(budget.get("machine_cpu_us_per_append"))
        client = _number(budget.get("client_cpu_us_per_append"))
        ceiling = _number(budget.get("ceiling_events_per_s"))
        allowed = _number(budget.get("goal_cpu_us_per_append"))
        if total is not None and client is not None and ceiling is not None:
            rows.append(
                Row(
                    "appends",
                    f"group commit: CPU per append, {budget.get('jobs', 0):,} jobs closed loop",
                    f"{total:.0f} µs ({client:.0f} µs in the writer's process): at most "
                    f"{_rate(ceiling)} on {budget.get('cpus')} CPUs",
                    f"the goal's budget: {allowed:.0f} µs" if allowed is not None else "—",
                    _times(_ratio(total, allowed)),
                    values={
                        "cpu_us_per_append": total,
                        "client_cpu_us_per_append": client,
                        "ceiling_events_per_s": ceiling,
                    },
                )
            )
    return rows


def _latency_row(pair: dict[str, Any], label: str, goal: float | None) -> Row:
    """A commit-to-client latency figure next to the raw websockets one of the same run."""
    gateway, raw = pair.get("gateway") or {}, pair.get("raw") or {}
    p99 = _number(_get(gateway, "latency_ms", "p99"))
    base = _number(_get(raw, "latency_ms", "p99"))
    extra: dict[str, Any] = {}
    if goal is not None:
        extra = {"goal": f"< {goal:g} ms", "met": _both(lambda v: v < goal, p99)}
    return Row(
        "fanout",
        label,
        _ms(p99),
        f"raw websockets, sent to received: {_ms(base)}",
        _times(_ratio(p99, base)),
        values={"p99_ms": p99, "raw_p99_ms": base},
        **extra,
    )


def fanout_rows(data: Mapping[str, Any]) -> list[Row]:
    rows: list[Row] = []
    ratio_goal = GOALS["fanout_ratio"]
    for step in data.get("fanout") or []:
        gateway, raw = step.get("gateway") or {}, step.get("raw broadcast") or {}
        rate, base = _number(gateway.get("deliveries_per_s")), _number(raw.get("deliveries_per_s"))
        ratio = _ratio(rate, base)
        rows.append(
            Row(
                "fanout",
                f"fan-out to {gateway.get('clients', 0):,} clients of one job: deliveries",
                _rate(rate),
                f"raw websockets broadcast: {_rate(base)}",
                _times(ratio),
                f"≥ {ratio_goal:g}× raw",
                _both(lambda r: r >= ratio_goal, ratio),
                values={"deliveries_per_s": rate, "raw_deliveries_per_s": base, "ratio": ratio},
            )
        )
    p99_goal = GOALS["latency_p99_ms"]
    for pair in data.get("latency") or []:
        gateway = pair.get("gateway") or {}
        rows.append(
            _latency_row(
                pair,
                f"commit-to-client p99: {gateway.get('clients', 0):,} clients, "
                f"{gateway.get('clients_per_job')} per job, "
                f"{_number(gateway.get('target_events_per_s')) or 0:,.0f} events/s",
                p99_goal,
            )
        )
    by_clients = data.get("fanout_latency") or []
    if by_clients:
        gateway = by_clients[-1].get("gateway") or {}
        rows.append(
            _latency_row(
                by_clients[-1],
                f"commit-to-client p99: {gateway.get('clients', 0):,} clients of one job, "
                f"{_number(gateway.get('target_events_per_s')) or 0:g} events/s",
                None,
            )
        )
    storms = data.get("storm") or []
    gateway_storm = next((s for s in storms if s.get("server") == "gateway"), None)
    if gateway_storm is not None:
        backlog = gateway_storm.get("listen_backlog")
        raw_storm = next(
            (s for s in storms if s.get("server") == "raw" and s.get("listen_backlog") == backlog),
            None,
        )
        seconds = _number(gateway_storm.get("seconds_until_all_ready"))
        base = _number(_get(raw_storm, "seconds_until_all_ready"))
        everyone = gateway_storm.get("ready") == gateway_storm.get("clients")
        storm_goal = GOALS["storm_seconds"]
        rows.append(
            Row(
                "fanout",
                f"reconnect storm: {gateway_storm.get('clients', 0):,} clients, "
                f"{gateway_storm.get('events_behind')} events behind, until all caught up"
                + ("" if everyone else f" (only {gateway_storm.get('ready', 0):,} were)"),
                _s(seconds),
                f"raw websockets, until all connected: {_s(base)}",
                _times(_ratio(seconds, base)),
                f"< {storm_goal:g} s",
                _both(lambda v: everyone and v < storm_goal, seconds),
                values={"seconds": seconds, "raw_seconds": base},
            )
        )
    memory = data.get("memory") or []
    if memory:
        step = memory[-1]
        gateway, raw = step.get("gateway") or {}, step.get("raw") or {}
        per = _number(gateway.get("bytes_per_connection_total"))
        if per is None:  # results from before the memory sweep
            per = _number(gateway.get("bytes_per_connection"))
        base = _number(raw.get("bytes_per_connection_total"))
        if base is None:
            base = _number(raw.get("bytes_per_connection"))
        limit = GOALS["bytes_per_connection"]
        rows.append(
            Row(
                "fanout",
                f"memory per idle connection, {gateway.get('connections_total', 0):,} open (RSS)",
                _kb(per),
                f"raw websockets: {_kb(base)}",
                _times(_ratio(per, base)),
                f"< {limit / 1000:g} kB",
                _both(lambda v: v < limit, per),
                values={"bytes_per_connection": per, "raw_bytes_per_connection": base},
            )
        )
    replay = data.get("replay") or []
    if replay:
        largest = replay[-1]
        median = _number(largest.get("median_s"))
        first = _number(largest.get("first_s"))
        again = _number(largest.get("again_median_s"))
        query = _number(largest.get("raw_sql_median_s"))
        measured = (
            f"{_ms(first * 1000, 0)} from the log; again: "
            f"{_ms(None if again is None else again * 1000, 0)} (cached)"
            if first is not None
            else _ms(None if median is None else median * 1000, 0)
        )
        rows.append(
            Row(
                "fanout",
                f"replay: reconnecting {largest.get('events', 0):,} events behind, until caught up",
                measured,
                f"the replay query alone: {_ms(None if query is None else query * 1000, 0)}",
                _times(_ratio(first if first is not None else median, query)),
                values={"seconds": median, "first_seconds": first, "query_seconds": query},
            )
        )
    return rows


def socketio_rows(data: Mapping[str, Any]) -> list[Row]:
    sides = data.get("sides") or {}
    gateway, sio = sides.get("gateway") or {}, sides.get("python-socketio") or {}
    raw = sides.get("raw websockets") or {}
    rate = _number(gateway.get("deliveries_per_s"))
    sio_rate = _number(sio.get("deliveries_per_s"))
    raw_rate = _number(raw.get("deliveries_per_s"))
    ratio = _ratio(rate, sio_rate)
    goal = GOALS["socketio_ratio"]
    clients = gateway.get("clients") or 0
    rows = [
        Row(
            "socketio",
            f"delivered events/s to {clients:,} clients, against python-socketio",
            _rate(rate),
            f"python-socketio: {_rate(sio_rate)}",
            _times(ratio),
            f"≥ {goal:g}× python-socketio",
            _both(lambda r: r >= goal, ratio),
            values={"deliveries_per_s": rate, "socketio_deliveries_per_s": sio_rate},
        ),
        Row(
            "socketio",
            f"delivered events/s to {clients:,} clients, against raw websockets",
            _rate(rate),
            f"raw websockets broadcast: {_rate(raw_rate)}",
            _times(_ratio(rate, raw_rate)),
            values={"deliveries_per_s": rate, "raw_deliveries_per_s": raw_rate},
        ),
    ]
    # The side-by-side also asks for latency and memory, for both servers.
    for figure, value, sio_value, show in (
        (
            f"latency p99 at full speed, {clients:,} clients (mostly queueing)",
            _number(_get(gateway, "latency_ms", "p99")),
            _number(_get(sio, "latency_ms", "p99")),
            _ms,
        ),
        (
            f"memory per idle connection, {clients:,} open (RSS)",
            _number(gateway.get("bytes_per_idle_connection")),
            _number(sio.get("bytes_per_idle_connection")),
            _kb,
        ),
    ):
        if value is not None or sio_value is not None:
            rows.append(
                Row(
                    "socketio",
                    figure,
                    show(value),
                    f"python-socketio: {show(sio_value)}",
                    _times(_ratio(value, sio_value)),
                    values={"gateway": value, "python-socketio": sio_value},
                )
            )
    if gateway.get("missed_after_gap") is not None:
        gap = _number(_get(data, "settings", "gap_seconds"))
        rows.append(
            Row(
                "socketio",
                f"events lost across a {gap or 0:g} s disconnect",
                f"{gateway.get('missed_after_gap')} of {gateway.get('sent_during_gap_test')}",
                f"python-socketio: {sio.get('missed_after_gap')} of "
                f"{sio.get('sent_during_gap_test')}",
                values={
                    "missed": gateway.get("missed_after_gap"),
                    "socketio_missed": sio.get("missed_after_gap"),
                },
            )
        )
    return rows


def export_rows(data: Mapping[str, Any]) -> list[Row]:
    reporting = data.get("reporting") or {}
    # Judged on the rounds' paired ratios (see bench/export.py); results written before that
    # figure existed have only the ratio of the medians.
    between_medians = _number(reporting.get("overhead_percent"))
    paired = _number(reporting.get("paired_overhead_percent"))
    overhead = between_medians if paired is None else paired
    inside = _number(reporting.get("in_reporting_code_percent"))
    on = _number(_get(reporting, "on", "median_seconds"))
    off = _number(_get(reporting, "off", "median_seconds"))
    goal = GOALS["progress_overhead_percent"]
    details = []
    if overhead is not None:
        details.append(f"overhead {overhead:+.1f} %")
    if paired is not None and between_medians is not None:
        details[-1] += f" by rounds, {between_medians:+.1f} % between medians"
    if inside is not None:
        details.append(f"{inside:.1f} % inside the reporting code")
    rows = [
        Row(
            "export",
            "progress reporting: export time with it",
            _s(on) + (f" ({'; '.join(details)})" if details else ""),
            f"reporting off: {_s(off)}",
            # The same judged figure as a ratio: with reporting on ÷ off.
            _times(_ratio(on, off) if paired is None else 1.0 + paired / 100.0, 3),
            f"< {goal:g} % of export time",
            _both(lambda v: v < goal, overhead),
            values={
                "seconds": on,
                "off_seconds": off,
                "overhead_percent": overhead,
                "overhead_between_medians_percent": between_medians,
                "in_reporting_code_percent": inside,
            },
        )
    ]
    compression = _number(_get(data, "compression", "median_seconds"))
    zipped = _number(_get(data, "zip", "median_seconds"))
    files = _get(data, "compression", "files")
    rows.append(
        Row(
            "export",
            "archiving stage alone"
            + (f", {files:,} files" if isinstance(files, int) else "")
            + " (ratio: speed ÷ zip's)",
            _s(compression),
            f"zip on the same files: {_s(zipped)}",
            _times(_ratio(zipped, compression)),
            values={"seconds": compression, "zip_seconds": zipped},
        )
    )
    return rows


ROWS: dict[str, Callable[[Mapping[str, Any]], list[Row]]] = {
    "appends": appends_rows,
    "export": export_rows,
    "fanout": fanout_rows,
    "socketio": socketio_rows,
}


def rows_for(name: str, data: Mapping[str, Any] | None) -> list[Row]:
    """The headline rows of benchmark `name` from its JSON (one "failed" row without it)."""
    if data is None:
        return [Row(name, "(no results: the benchmark failed or did not run)", NOT_MEASURED)]
    builder = ROWS.get(name)
    return builder(data) if builder is not None else []


# --------------------------------------------------------------------------- the summary


def load_results(out_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """Each benchmark's `<name>.json` (None where missing or unreadable)."""
    results: dict[str, dict[str, Any] | None] = {}
    for name in names:
        try:
            results[name] = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results[name] = None
    return results


def describe_machine(
    results: Mapping[str, Mapping[str, Any] | None], server: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Cores, CPU model, PostgreSQL version and the date: from `server` (a `server_info`) and
    this machine, else from what the result files recorded."""
    recorded = [data for data in results.values() if data]
    version = _get(server, "server_version")
    full = _get(server, "version")
    for data in recorded:
        version = version or _get(data, "server", "server_version")
        full = full or _get(data, "server", "version")
    return {
        "date": utc_timestamp(),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "postgresql": version,
        "postgresql_full": full,
        "settings": _get(server, "settings")
        or next(
            (_get(data, "server", "settings") for data in recorded if data.get("server")), None
        ),
    }


@dataclass
class Summary:
    rows: list[Row]
    machine: dict[str, Any]
    timings: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        table = Table(headers=HEADERS, left=frozenset(range(len(HEADERS))))
        for row in self.rows:
            table.add(*row.cells())
        return table

    def machine_line(self) -> str:
        m = self.machine
        settings = m.get("settings") or {}
        commit = ", ".join(
            f"{key}={settings[key]}" for key in ("fsync", "synchronous_commit") if key in settings
        )
        return (
            f"{m.get('date')} · {m.get('cores')} cores ({m.get('cpu_model') or 'CPU unknown'}) · "
            f"PostgreSQL {m.get('postgresql') or '?'}" + (f" ({commit})" if commit else "")
        ) + f" · Python {m.get('python')} · {m.get('platform')}"

    def timing_line(self) -> str:
        if not self.timings:
            return ""
        parts = [
            f"{t['name']} {format_duration(t.get('elapsed'))} of "
            f"{format_duration(t.get('budget'))}" + (" (FAILED)" if t.get("failed") else "")
            for t in self.timings
        ]
        total = sum(t.get("elapsed") or 0.0 for t in self.timings)
        budget = sum(t.get("budget") or 0.0 for t in self.timings)
        return (
            f"Time (elapsed of budget): {', '.join(parts)}; "
            f"in all {format_duration(total)} of {format_duration(budget)}."
        )

    def markdown(self) -> str:
        parts = [
            "# Benchmark summary",
            "",
            self.machine_line(),
            "",
            "Every figure next to its raw baseline measured in the same run; the ratio is "
            "figure ÷ baseline.",
            "",
            self.table().markdown(),
        ]
        extra = [line for line in (self.timing_line(), *self.notes) if line]
        if extra:
            parts += ["", *(f"- {line}" for line in extra)]
        if self.plots:
            parts += ["", "## Plots", ""]
            parts += [f"![{Path(name).stem}]({Path(name).name})" for name in self.plots]
        return "\n".join(parts) + "\n"

    def payload(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "goals": GOALS,
            "rows": [asdict(row) for row in self.rows],
            "timings": self.timings,
            "plots": [Path(name).name for name in self.plots],
            "notes": self.notes,
        }


def build(
    results: Mapping[str, Mapping[str, Any] | None],
    *,
    server: Mapping[str, Any] | None = None,
    timings: Sequence[Mapping[str, Any]] = (),
    plots: Sequence[Path | str] = (),
    notes: Sequence[str] = (),
) -> Summary:
    """The summary of the benchmarks in `results` (name → its JSON, None when it failed), in
    that order."""
    rows = [row for name, data in results.items() for row in rows_for(name, data)]
    return Summary(
        rows=rows,
        machine=describe_machine(results, server),
        timings=[dict(t) for t in timings],
        plots=[str(p) for p in plots],
        notes=list(notes),
    )


def write(out_dir: Path, summary: Summary) -> tuple[Path, Path]:
    """`summary.md` and `summary.json` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "summary.md", out_dir / "summary.json"
    md_path.write_text(summary.markdown(), encoding="utf-8")
    json_path.write_text(
        json.dumps(summary.payload(), indent=2, default=str) + "\n", encoding="utf-8"
    )
    return md_path, json_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.summary",
        description="Rebuild the summary table from the result files of a run.",
    )
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    results = {
        name: data for name, data in load_results(args.out, ROWS).items() if data is not None
    }
    if not results:
        print(f"no result files in {args.out}", file=sys.stderr)
        return 1
    summary = build(results)
    print(summary.table().markdown())
    write(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
