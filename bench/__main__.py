"""``python -m bench [--quick] [--only NAME] [--seconds N] [--out DIR]``.

Provisions the server once (see `bench.common.provision_server`), runs the chosen benchmarks one
after the other on uvloop when it is installed (the service runs on it, so its figures are the
ones that matter), and checks after each one that no task is left running. A benchmark that
fails is reported and the others still run (the exit status is then 1).

Each benchmark has a time budget (`PLAN`): the whole default run is meant to take under ten
minutes on a 2-core machine, ``--quick`` about a third of that. Progress goes to stderr (see
`bench.common.ProgressDisplay`), with an estimate of the time left from the budgets, or from the
last run's times with the same settings (kept in ``timings.json`` in the results folder). The
tables go to stdout; at the end the figures are drawn (`bench.plots`) and one table of the
headline figures is printed and written to ``summary.md`` and ``summary.json`` (`bench.summary`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from . import appends, export, fanout, plots, socketio_compare, summary
from .common import (
    DEFAULT_RESULTS_DIR,
    Context,
    Planned,
    ProgressDisplay,
    format_duration,
    provision_server,
    server_info,
    utc_timestamp,
)

BENCHMARKS: dict[str, Callable[[Context], Awaitable[None]]] = {
    appends.NAME: appends.main,
    export.NAME: export.main,
    fanout.NAME: fanout.main,
    socketio_compare.NAME: socketio_compare.main,
}


@dataclass(frozen=True)
class Budget:
    """How long a benchmark measures and may take."""

    seconds: float
    """Seconds per measurement of a default run (export runs a fixed number of exports)."""
    full: float
    """Seconds the whole benchmark may take in a default run."""
    quick: float
    """… and with --quick."""


PLAN: dict[str, Budget] = {
    # 15 measurements and the group-commit sweep; 4 s windows keep each above 2,000 commits.
    appends.NAME: Budget(seconds=4.0, full=240.0, quick=90.0),
    # 300 images, 6 rounds of 3 whole exports and 5 of compression against zip: about 55 s.
    export.NAME: Budget(seconds=5.0, full=90.0, quick=35.0),
    # 17 measurements (5,000 clients, 3 servers, the storm, the sweeps): about 130 s at 3 s.
    fanout.NAME: Budget(seconds=3.0, full=180.0, quick=75.0),
    # 3 servers × 1,000 clients and the disconnect test: about 45 s at 5 s.
    socketio_compare.NAME: Budget(seconds=5.0, full=75.0, quick=35.0),
}
TOTAL_BUDGET_SECONDS = 600.0
"""What a default run of every benchmark must stay under."""
QUICK_SECONDS = 1.5
TIMINGS_FILE = "timings.json"

T = TypeVar("T")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the export service, each figure next to a raw baseline "
        "measured in the same run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: {QUICK_SECONDS:g} s per measurement unless --seconds says otherwise, "
        "and fewer clients",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(sorted(BENCHMARKS))}",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="N",
        help="seconds per measurement, after a warm-up (default: "
        + ", ".join(f"{name} {budget.seconds:g}" for name, budget in PLAN.items())
        + ")",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        metavar="DIR",
        help="where to write <name>.json and <name>.md, the plots and the summary "
        "(default bench/results)",
    )
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def warmup_for(seconds: float) -> float:
    """A fifth of the measurement, between 0.2 s and 1 s: long enough for connections, plan
    caches and the job state cache to settle, short enough to keep `--quick` quick."""
    return min(1.0, max(0.2, seconds / 5))


def seconds_for(name: str, *, quick: bool, seconds: float | None) -> float:
    if seconds is not None:
        return seconds
    return QUICK_SECONDS if quick else PLAN[name].seconds


def budget_for(name: str, *, quick: bool, seconds: float) -> float:
    """The benchmark's budget, stretched when --seconds asks for longer measurements."""
    budget = PLAN[name]
    nominal = QUICK_SECONDS if quick else budget.seconds
    return (budget.quick if quick else budget.full) * max(1.0, seconds / nominal)


def timing_key(name: str, *, quick: bool, seconds: float) -> str:
    return f"{name} {'quick' if quick else 'full'} {seconds:g}s"


def load_timings(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / TIMINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_timings(out_dir: Path, timings: Mapping[str, Any]) -> None:
    """Merge this run's times into `timings.json` (the next run's estimates)."""
    merged = {**load_timings(out_dir), **timings}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TIMINGS_FILE).write_text(
        json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _quiet_logging() -> None:
    """Only warnings from the service's structlog loggers: their info lines (migrations, the
    embedded server) would interleave with the tables."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@dataclass
class Outcome:
    server: dict[str, Any] | None = None
    failed: list[str] = dataclasses.field(default_factory=list)


async def _cancel_leftovers(ctx: Context) -> None:
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    if leftovers:
        ctx.progress(f"warning: {len(leftovers)} task(s) left running; cancelling them")
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


async def _run(
    names: Sequence[str], contexts: Mapping[str, Context], display: ProgressDisplay
) -> Outcome:
    outcome = Outcome()
    first = contexts[names[0]]
    try:
        outcome.server = await server_info(first.server.dsn)
    except Exception as exc:  # the summary then takes the version from the result files
        display(f"warning: could not read the server's version: {type(exc).__name__}: {exc}")
    for name in names:
        ctx = contexts[name]
        display.begin(name)
        done = False
        try:
            await BENCHMARKS[name](ctx)
            done = True
        except Exception:
            display(f"{name} failed:\n{traceback.format_exc().rstrip()}")
            outcome.failed.append(name)
        finally:
            display.end(name, failed=not done)
            await _cancel_leftovers(ctx)
    return outcome


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _finish(
    names: Sequence[str],
    out_dir: Path,
    plan: Sequence[Planned],
    outcome: Outcome,
    seconds: Mapping[str, float],
    *,
    quick: bool,
    began: float,
) -> None:
    """Plots, the summary table and its files, and the time the run took."""
    timings: list[dict[str, Any]] = [
        {
            "name": item.name,
            "budget": round(item.budget, 1),
            "elapsed": None if item.elapsed is None else round(item.elapsed, 1),
            "seconds_per_measurement": seconds[item.name],
            "quick": quick,
            "failed": item.failed,
        }
        for item in plan
    ]
    save_timings(
        out_dir,
        {
            timing_key(t["name"], quick=quick, seconds=seconds[t["name"]]): {
                "elapsed": t["elapsed"],
                "at": utc_timestamp(),
            }
            for t in timings
            if t["elapsed"] is not None and not t["failed"]
        },
    )
    drawn = plots.draw(out_dir, names)
    for note in drawn.notes:
        print(f"plots: {note}", file=sys.stderr)
    for path in drawn.written:
        print(f"plots: wrote {path}", file=sys.stderr)

    results = summary.load_results(out_dir, names)
    for name in outcome.failed:
        results[name] = None  # never a stale file from an earlier run
    table = summary.build(
        results, server=outcome.server, timings=timings, plots=drawn.written, notes=drawn.notes
    )
    md_path, json_path = summary.write(out_dir, table)
    total = time.monotonic() - began
    print("\n## Summary\n", flush=True)
    print(table.machine_line() + "\n")
    print(table.table().markdown())
    print("\n" + table.timing_line(), flush=True)
    over = ""
    if not quick and len(names) == len(BENCHMARKS) and total > TOTAL_BUDGET_SECONDS:
        over = f" — over the suite's budget of {format_duration(TOTAL_BUDGET_SECONDS)}"
    print(
        f"wrote {md_path} and {json_path}; the run took {format_duration(total)}{over}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    began = time.monotonic()
    args = parse_args(argv)
    _quiet_logging()
    names = list(dict.fromkeys(args.only)) if args.only else list(BENCHMARKS)
    seconds = {name: seconds_for(name, quick=args.quick, seconds=args.seconds) for name in names}
    history = load_timings(args.out)
    plan = []
    for name in names:
        estimate = history.get(timing_key(name, quick=args.quick, seconds=seconds[name]))
        elapsed = estimate.get("elapsed") if isinstance(estimate, dict) else None
        plan.append(
            Planned(
                name=name,
                budget=budget_for(name, quick=args.quick, seconds=seconds[name]),
                estimate=float(elapsed) if isinstance(elapsed, int | float) else None,
            )
        )
    display = ProgressDisplay(plan)
    display(
        f"benchmarks: {', '.join(f'{p.name} ({format_duration(p.budget)})' for p in plan)}; "
        f"time budget {format_duration(sum(p.budget for p in plan))}"
        + (" (quick)" if args.quick else "")
    )
    with provision_server() as server:
        contexts = {
            name: Context(
                server=server,
                seconds=seconds[name],
                warmup=warmup_for(seconds[name]),
                quick=args.quick,
                out_dir=args.out,
                progress=display,
                echo=display.echo,
            )
            for name in names
        }
        display(
            f"server: {server.source}; seconds per measurement: "
            + ", ".join(f"{name} {seconds[name]:g}" for name in names)
        )
        display.start()
        try:
            outcome = _run_loop(_run(names, contexts, display))
        finally:
            display.close()
    _finish(names, args.out, plan, outcome, seconds, quick=args.quick, began=began)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
