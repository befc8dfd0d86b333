"""``python -m bench [--quick] [--only NAME] [--seconds N] [--out DIR]``.

Provisions the server once (see `bench.common.provision_server`), runs the chosen benchmarks one
after the other on uvloop when it is installed (the service runs on it, so its figures are the
ones that matter), and checks on the way out that no task is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog

from . import appends, export, fanout, socketio_compare
from .common import DEFAULT_RESULTS_DIR, Context, provision_server

BENCHMARKS: dict[str, Callable[[Context], Awaitable[None]]] = {
    appends.NAME: appends.main,
    export.NAME: export.main,
    fanout.NAME: fanout.main,
    socketio_compare.NAME: socketio_compare.main,
}

DEFAULT_SECONDS = 5.0
QUICK_SECONDS = 1.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the export service, each figure next to a raw baseline "
        "measured in the same run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: {QUICK_SECONDS:g} s per measurement unless --seconds says otherwise",
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
        help=f"seconds per measurement, after a warm-up (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        metavar="DIR",
        help="where to write <name>.json and <name>.md (default bench/results)",
    )
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def warmup_for(seconds: float) -> float:
    """A fifth of the measurement, between 0.2 s and 1 s: long enough for connections, plan
    caches and the job state cache to settle, short enough to keep `--quick` quick."""
    return min(1.0, max(0.2, seconds / 5))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_logging() -> None:
    """Only warnings from the service's structlog loggers: their info lines (migrations, the
    embedded server) would interleave with the tables."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def _run(names: Sequence[str], ctx: Context) -> None:
    try:
        for name in names:
            ctx.progress(f"== {name} ==")
            await BENCHMARKS[name](ctx)
    finally:
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        if leftovers:
            ctx.progress(f"warning: {len(leftovers)} task(s) left running; cancelling them")
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logging()
    seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    names = list(dict.fromkeys(args.only)) if args.only else list(BENCHMARKS)
    with provision_server() as server:
        ctx = Context(
            server=server,
            seconds=seconds,
            warmup=warmup_for(seconds),
            quick=args.quick,
            out_dir=args.out,
            progress=_progress,
        )
        _progress(f"server: {server.source}; {seconds:g} s per measurement")
        _run_loop(_run(names, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
