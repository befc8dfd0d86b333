"""Figures of a run, drawn from the result files its benchmarks wrote (PNG, matplotlib's Agg).

``python -m bench`` draws them at the end of a run into the results folder; ``python -m
bench.plots [DIR]`` draws them again from the JSON files in DIR. Each figure shows the gateway or
the event log next to its raw baseline from the same run:

* ``appends_concurrency.png``: append rate and latency against concurrency (the appends
  benchmark's ``sweep`` of group commit over job counts, and its 1- and N-writer figures next to
  raw INSERTs);
* ``fanout_clients.png``: fan-out rate, and commit-to-client latency, against clients;
* ``fanout_replay.png``: how long a reconnecting client takes to get N missed events;
* ``fanout_memory.png``: memory per connection against connections open.

A figure whose data is missing is skipped with a note saying why; so is every figure when
matplotlib is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import DEFAULT_RESULTS_DIR

__all__ = ["PLOTS", "Drawn", "MissingData", "draw"]

GOAL_COLOR = "#888888"
GATEWAY = {"color": "#1f77b4", "marker": "o"}
RAW = {"color": "#ff7f0e", "marker": "s"}
OTHER = {"color": "#2ca02c", "marker": "^"}
STAR = {"color": "#d62728", "marker": "*"}


class MissingData(Exception):
    """The result file lacks what a figure needs; the message says what."""


@dataclass
class Drawn:
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Figures skipped or drawn in part, and why."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _latency(figure: Mapping[str, Any], key: str) -> float | None:
    latency = figure.get("latency_ms")
    return _number(latency.get(key)) if isinstance(latency, Mapping) else None


def _points(
    pairs: Iterable[tuple[Any, Any]],
) -> tuple[list[float], list[float]]:
    """The (x, y) pairs where both are numbers, sorted by x."""
    kept = sorted(
        (x, y)
        for x, y in ((_number(a), _number(b)) for a, b in pairs)
        if x is not None and y is not None
    )
    return [x for x, _ in kept], [y for _, y in kept]


def _figure(columns: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * columns, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _log_x(ax: Any, values: Sequence[float]) -> None:
    """A log x axis labelled at the values measured."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ticks = sorted({v for v in values if v > 0})
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{v:,.0f}" for v in ticks])


def _log_y(ax: Any) -> None:
    """A log y axis with plain numbers (1, 20, 300), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    plain = FuncFormatter(lambda value, _position: f"{value:,.10g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _position: ""))


def _thousands_y(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:,.0f}"))


def _goal(ax: Any, y: float, label: str) -> None:
    ax.axhline(y, color=GOAL_COLOR, linestyle=":", linewidth=1.2, label=label)


def _save(figure: Any, path: Path, title: str, subtitle: str | None) -> None:
    figure.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _subtitle(data: Mapping[str, Any]) -> str | None:
    started = data.get("started_at")
    machine = data.get("machine") if isinstance(data.get("machine"), Mapping) else {}
    cores = machine.get("cpu_count") if machine else None
    parts = [str(started)] if started else []
    if cores:
        parts.append(f"{cores} cores")
    return ", ".join(parts) or None


# --------------------------------------------------------------------------- (a) appends


def plot_appends(data: Mapping[str, Any], path: Path) -> list[str]:
    """Append rate and latency against concurrency: the group-commit sweep over job counts and
    the 1- and N-writer `append` figures, each next to raw INSERTs at the same concurrency."""
    notes: list[str] = []
    sweep = [p for p in data.get("sweep") or [] if isinstance(p, Mapping)]
    measurements = data.get("measurements") or {}
    writers = sorted(
        int(key.rsplit("_", 1)[1]) for key in measurements if re.fullmatch(r"append_one_\d+", key)
    )
    if not sweep and not writers:
        raise MissingData("no 'sweep' and no per-writer figures in appends.json")
    if not sweep:
        notes.append("appends: no 'sweep' in appends.json yet; drew the per-writer figures only")

    figure, (rate_ax, latency_ax) = _figure(2)
    xs: list[float] = []
    if sweep:
        x, y = _points((p.get("jobs"), p.get("events_per_s")) for p in sweep)
        rate_ax.plot(x, y, label="group commit: 1 event per job per call", **GATEWAY)
        xs += x
        x, y = _points((p.get("jobs"), p.get("raw_events_per_s")) for p in sweep)
        if x:
            rate_ax.plot(x, y, linestyle="--", label="raw INSERTs (the sweep's baseline)", **RAW)
        for key, style, name in (("p50_ms", "-", "p50"), ("p99_ms", "--", "p99")):
            x, y = _points((p.get("jobs"), p.get(key)) for p in sweep)
            latency_ax.plot(x, y, linestyle=style, label=f"group commit {name}", **GATEWAY)
    group = data.get("group_commit")
    if isinstance(group, Mapping) and _number(group.get("jobs")) is not None:
        jobs = _number(group.get("jobs"))
        target = _number(group.get("target_events_per_s"))
        label = "group commit, open loop" + (f" at {target:,.0f}/s offered" if target else "")
        rate = _number(group.get("events_per_s"))
        if rate is not None:
            rate_ax.plot([jobs], [rate], linestyle="", markersize=10, label=label, **STAR)
            xs.append(jobs or 0)
        p99 = _number(group.get("p99_ms"))
        if p99 is not None:
            latency_ax.plot(
                [jobs], [p99], linestyle="", markersize=10, label=f"{label}: p99", **STAR
            )
    if writers:
        appended = [measurements[f"append_one_{n}"] for n in writers]
        raw = [measurements.get(f"raw_insert_{n}") or {} for n in writers]
        x, y = _points(zip(writers, (m.get("events_per_s") for m in appended), strict=True))
        rate_ax.plot(
            x, y, linestyle="", markersize=8, label="append, 1 event/tx (writers)", **OTHER
        )
        x2, y2 = _points(zip(writers, (m.get("events_per_s") for m in raw), strict=True))
        if x2:
            rate_ax.plot(
                x2,
                y2,
                linestyle="",
                markersize=8,
                fillstyle="none",
                label="raw INSERT autocommit (connections)",
                **RAW,
            )
        xs += x + x2
        for key, fill, name in (("p50", "full", "p50"), ("p99", "none", "p99")):
            x, y = _points(zip(writers, (_latency(m, key) for m in appended), strict=True))
            latency_ax.plot(
                x,
                y,
                linestyle="",
                markersize=8,
                fillstyle=fill,
                label=f"append 1 event/tx {name}",
                **OTHER,
            )
    _goal(rate_ax, 20_000, "goal: 20,000 events/s (1,000 jobs)")
    _goal(latency_ax, 20.0, "goal: p99 < 20 ms")
    for ax in (rate_ax, latency_ax):
        _log_x(ax, xs)
        ax.set_xlabel("concurrency (jobs or writers)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    rate_ax.set_ylabel("events/s")
    _log_y(rate_ax)
    latency_ax.set_ylabel("latency per append, ms")
    _log_y(latency_ax)
    _save(figure, path, "Appends against concurrency", _subtitle(data))
    return notes


# --------------------------------------------------------------------------- (b) fan-out


def plot_fanout(data: Mapping[str, Any], path: Path) -> list[str]:
    """Deliveries/s against clients (gateway, raw broadcast, raw batched), and commit-to-client
    latency against clients (gateway and raw, one job)."""
    steps = [s for s in data.get("fanout") or [] if isinstance(s, Mapping)]
    if not steps:
        raise MissingData("no 'fanout' figures in fanout.json")
    notes: list[str] = []
    figure, (rate_ax, latency_ax) = _figure(2)
    servers = [key for key in steps[0] if isinstance(steps[0][key], Mapping) and key != "ratio"]
    styles = {"gateway": GATEWAY, "raw broadcast": RAW}
    xs: list[float] = []
    for server in servers:
        x, y = _points(
            (step[server].get("clients"), step[server].get("deliveries_per_s"))
            for step in steps
            if isinstance(step.get(server), Mapping)
        )
        xs += x
        rate_ax.plot(x, y, label=server, **styles.get(server, OTHER))
    rate_ax.set_ylabel("deliveries/s")
    rate_ax.set_ylim(bottom=0)
    _thousands_y(rate_ax)
    rate_ax.set_title("fan-out rate (flow-controlled, full speed)", fontsize=10)
    pairs = [p for p in data.get("fanout_latency") or [] if isinstance(p, Mapping)]
    if pairs:
        rate = _number((pairs[0].get("gateway") or {}).get("target_events_per_s"))
        for server, style in (("gateway", GATEWAY), ("raw", RAW)):
            for key, line in (("p50", "-"), ("p99", "--")):
                x, y = _points(
                    (p[server].get("clients"), _latency(p[server], key))
                    for p in pairs
                    if isinstance(p.get(server), Mapping)
                )
                xs += x
                latency_ax.plot(x, y, linestyle=line, label=f"{server} {key}", **style)
        _goal(latency_ax, 50.0, "goal: p99 < 50 ms")
        latency_ax.set_ylabel("commit (raw: send) to client, ms")
        _log_y(latency_ax)
        latency_ax.set_title(
            "latency, one job" + (f" at {rate:g} events/s" if rate else ""), fontsize=10
        )
    else:
        notes.append("fanout: no 'fanout_latency' in fanout.json; latency panel left empty")
        latency_ax.text(0.5, 0.5, "latency by clients\nnot measured", ha="center", va="center")
    for ax in (rate_ax, latency_ax):
        _log_x(ax, xs)
        ax.set_xlabel("clients")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(figure, path, "Fan-out against clients: gateway and raw websockets", _subtitle(data))
    return notes


# --------------------------------------------------------------------------- (c) replay


def plot_replay(data: Mapping[str, Any], path: Path) -> list[str]:
    """Time from reconnecting to caught-up against the events missed; the replay query alone
    beside it."""
    figures = [f for f in data.get("replay") or [] if isinstance(f, Mapping)]
    if not figures:
        raise MissingData("no 'replay' sweep in fanout.json")
    figure, (ax,) = _figure(1)
    rows = sorted(
        (
            (
                events,
                median * 1000,
                (_number(f.get("min_s")) or median) * 1000,
                (_number(f.get("max_s")) or median) * 1000,
            )
            for f in figures
            for events, median in [(_number(f.get("events")), _number(f.get("median_s")))]
            if events is not None and median is not None
        )
    )
    x = [row[0] for row in rows]
    ms = [row[1] for row in rows]
    ax.errorbar(
        x,
        ms,
        yerr=[
            [max(0.0, m - low) for _, m, low, _ in rows],
            [max(0.0, high - m) for _, m, _, high in rows],
        ],
        capsize=3,
        label="gateway: reconnect → caught-up (median, min–max)",
        **GATEWAY,
    )
    fx, fy = _points((f.get("events"), f.get("first_s")) for f in figures)
    if fx:
        ax.plot(
            fx,
            [v * 1000 for v in fy],
            marker="s",
            label="gateway: first reconnection (from the log)",
            color="tab:orange",
        )
    rx, ry = _points((f.get("events"), f.get("raw_sql_median_s")) for f in figures)
    if rx:
        ax.plot(rx, [v * 1000 for v in ry], linestyle="--", label="replay query alone", **RAW)
    _log_x(ax, x)
    _log_y(ax)
    ax.set_xlabel("events missed")
    ax.set_ylabel("ms")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, path, "Replay after a gap", _subtitle(data))
    return []


# --------------------------------------------------------------------------- (d) memory


def plot_memory(data: Mapping[str, Any], path: Path) -> list[str]:
    """RSS per idle subscribed connection against connections open, gateway and raw."""
    steps = [s for s in data.get("memory") or [] if isinstance(s, Mapping)]
    if not steps:
        raise MissingData("no 'memory' figures in fanout.json")
    notes: list[str] = []
    figure, (ax,) = _figure(1)
    xs: list[float] = []
    for server, style in (("gateway", GATEWAY), ("raw", RAW)):
        rows = [s[server] for s in steps if isinstance(s.get(server), Mapping)]
        key = "bytes_per_connection_total"
        if not any(_number(r.get(key)) is not None for r in rows):
            key = "bytes_per_connection"
            if server == "gateway":
                notes.append("fanout: memory figures per step only (results without the sweep)")
        x, y = _points((r.get("connections_total"), r.get(key)) for r in rows)
        xs += x
        label = "raw websockets" if server == "raw" else server
        ax.plot(x, [v / 1000 for v in y], label=label, **style)
    _goal(ax, 20.0, "goal: < 20 kB")
    _log_x(ax, xs)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("idle subscribed connections open")
    ax.set_ylabel("RSS per connection, kB")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, path, "Memory per connection", _subtitle(data))
    return notes


# --------------------------------------------------------------------------- drawing them all

PLOTS: list[tuple[str, str, Callable[[Mapping[str, Any], Path], list[str]]]] = [
    ("appends", "appends_concurrency.png", plot_appends),
    ("fanout", "fanout_clients.png", plot_fanout),
    ("fanout", "fanout_replay.png", plot_replay),
    ("fanout", "fanout_memory.png", plot_memory),
]
"""(benchmark whose JSON it reads, file written, how it is drawn)."""


def draw(out_dir: Path, names: Iterable[str] | None = None) -> Drawn:
    """Every figure whose benchmark is in `names` (default: all), from `<name>.json` in
    `out_dir`, written next to it."""
    wanted = None if names is None else set(names)
    drawn = Drawn()
    plots = [plot for plot in PLOTS if wanted is None or plot[0] in wanted]
    if not plots:
        return drawn
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        drawn.notes.append("plots skipped: matplotlib is not installed")
        return drawn
    loaded: dict[str, Mapping[str, Any] | None] = {}
    for name, filename, plot in plots:
        if name not in loaded:
            try:
                loaded[name] = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                loaded[name] = None
                drawn.notes.append(f"{name}: no readable {name}.json ({type(exc).__name__})")
        data = loaded[name]
        if data is None:
            continue
        path = out_dir / filename
        try:
            drawn.notes += plot(data, path)
        except MissingData as missing:
            drawn.notes.append(f"{filename} skipped: {missing}")
            continue
        drawn.written.append(path)
    return drawn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plots", description="Draw the figures of a run from its results."
    )
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    drawn = draw(args.out)
    for note in drawn.notes:
        print(note, file=sys.stderr)
    for path in drawn.written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
