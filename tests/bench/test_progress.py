"""The progress display of `python -m bench`: what it prints, with a clock the test moves."""

from __future__ import annotations

import io

import pytest

from bench.common import (
    Planned,
    ProgressDisplay,
    format_duration,
    parse_step,
    step_message,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (0.4, "0:00"), (59.6, "1:00"), (65, "1:05"), (3725, "1:02:05"), (None, "?")],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        (
            "[ 3/15] EventLog.append 1 event/tx, 1 writer …",
            (3, 15, "EventLog.append 1 event/tx, 1 writer"),
        ),
        ("[1/3] memory ...", (1, 3, "memory")),
        (step_message(7, 17, "storm: gateway"), (7, 17, "storm: gateway")),
        ("        4,128 events/s", None),
        ("[0/3] nothing", None),
        ("[4/3] beyond", None),
        ("== fanout ==", None),
    ],
)
def test_step_lines(message: str, parsed: tuple[int, int, str] | None) -> None:
    assert parse_step(message) == parsed


def _display(
    tty: bool, **options: object
) -> tuple[ProgressDisplay, Clock, io.StringIO, io.StringIO]:
    clock, err, out = Clock(), io.StringIO(), io.StringIO()
    plan = [Planned("appends", budget=100.0), Planned("fanout", budget=50.0)]
    display = ProgressDisplay(plan, err, tty=tty, clock=clock, stdout=out, **options)  # type: ignore[arg-type]
    return display, clock, err, out


def test_plain_lines_when_not_a_terminal() -> None:
    display, clock, err, out = _display(tty=False)

    display.begin("appends")
    clock.now = 10
    display(step_message(1, 4, "first"))
    display("        720 events/s")
    clock.now = 40
    # 10 s of set-up leave 90 of the 100 expected for the measurements; a quarter of them took
    # 30 s, a pace of 4/3: the other three quarters are expected to take 90 s.
    display("[2/4] second …")
    display.echo("| a | table |")
    clock.now = 130
    assert display.end("appends") == 130
    display.begin("fanout")

    lines = err.getvalue().splitlines()
    assert lines == [
        "== appends (1/2): budget 1:40 ==",
        "[appends 1/2 · 1/4 · 0:10 elapsed · ~2:20 left] first",
        "        720 events/s",
        "[appends 1/2 · 2/4 · 0:40 elapsed · ~2:20 left] second",
        "== appends done in 2:10 (budget 1:40)  OVER BUDGET; run so far 2:10 ==",
        "== fanout (2/2): budget 0:50 ==",
    ]
    assert "\r" not in err.getvalue()
    assert out.getvalue() == "| a | table |\n"
    assert display.left() == 50


def test_the_estimate_comes_from_the_last_run_when_known() -> None:
    clock = Clock()
    plan = [Planned("export", budget=90.0, estimate=55.0), Planned("socketio", budget=75.0)]
    display = ProgressDisplay(plan, io.StringIO(), tty=False, clock=clock)
    assert display.left() == 55 + 75
    display.begin("export")
    clock.now = 20
    assert display.left() == 35 + 75
    clock.now = 70  # over its estimate: nothing negative
    assert display.left() == 75
    display.end("export", failed=True)
    assert plan[0].failed
    assert display.left() == 75


def test_one_updating_line_on_a_terminal() -> None:
    display, clock, err, out = _display(tty=True, width=200)

    display.begin("appends")
    clock.now = 5
    display(step_message(1, 2, "first"))
    display.echo("table")
    display.close()

    text = err.getvalue()
    # Every printed line first clears the status line, which is redrawn after it, in place.
    assert "== appends (1/2): budget 1:40 ==\n" in text
    assert "[1/2] first\n" in text
    status = text.split("\n")[-1]
    assert status.startswith("\r\x1b[K")
    assert status.endswith("\r\x1b[K")  # cleared by close()
    assert "\r\x1b[Kappends 1/2 · 1/2 first · 0:05 elapsed · ~2:25 left" in text
    assert out.getvalue() == "table\n"


def test_the_status_line_fits_the_terminal() -> None:
    display, _clock, err, _ = _display(tty=True, width=60)
    display.begin("appends")
    display(step_message(1, 2, "a very long label " * 5))
    last = err.getvalue().split("\n")[-1].removeprefix("\r\x1b[K")
    # The label gives way; the times stay.
    assert last.startswith("appends 1/2 · 1/2 a very ")
    assert last.endswith("… · 0:00 elapsed · ~2:30 left")
    assert len(last) == 59
    assert display.status(width=40) == "appends 1/2 · 1/2 · 0:00 elapsed · ~2:3…"


def test_status_without_a_benchmark_running() -> None:
    display, clock, _, _ = _display(tty=False)
    clock.now = 3
    assert display.status() == "0:03 elapsed · ~2:30 left"
    display("[1/2] not inside a benchmark")  # passed through unchanged
