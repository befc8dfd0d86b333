"""The figures are drawn from hand-made result documents (no benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import plots

from . import sample_results

PNG = b"\x89PNG\r\n\x1a\n"
FILES = {"appends_concurrency.png", "fanout_clients.png", "fanout_replay.png", "fanout_memory.png"}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_every_figure_from_complete_results(tmp_path: Path) -> None:
    sample_results.write_all(tmp_path)

    drawn = plots.draw(tmp_path)

    assert drawn.notes == []
    assert {path.name for path in drawn.written} == FILES
    for path in drawn.written:
        assert path.parent == tmp_path
        assert _is_png(path), path


def test_only_the_figures_of_the_benchmarks_run(tmp_path: Path) -> None:
    sample_results.write_all(tmp_path)
    drawn = plots.draw(tmp_path, ["appends"])
    assert [path.name for path in drawn.written] == ["appends_concurrency.png"]
    assert plots.draw(tmp_path, ["export", "socketio"]).written == []


def test_appends_without_the_sweep(tmp_path: Path) -> None:
    sample_results.write_all(tmp_path, appends=sample_results.appends(sweep=False))
    drawn = plots.draw(tmp_path, ["appends"])
    assert _is_png(tmp_path / "appends_concurrency.png")
    assert any("no 'sweep'" in note for note in drawn.notes)


def test_a_figure_without_its_data_is_skipped_with_a_note(tmp_path: Path) -> None:
    empty_appends = {"benchmark": "appends", "measurements": {}}
    sample_results.write_all(
        tmp_path, appends=empty_appends, fanout=sample_results.fanout(replay=False)
    )
    drawn = plots.draw(tmp_path)
    assert {path.name for path in drawn.written} == FILES - {
        "appends_concurrency.png",
        "fanout_replay.png",
    }
    assert not (tmp_path / "appends_concurrency.png").exists()
    assert not (tmp_path / "fanout_replay.png").exists()
    assert any(note.startswith("appends_concurrency.png skipped") for note in drawn.notes)
    assert any(note.startswith("fanout_replay.png skipped") for note in drawn.notes)


def test_a_missing_results_file_is_a_note(tmp_path: Path) -> None:
    drawn = plots.draw(tmp_path, ["fanout"])
    assert drawn.written == []
    assert drawn.notes == ["fanout: no readable fanout.json (FileNotFoundError)"]


@pytest.mark.parametrize("name", ["fanout_clients.png", "fanout_memory.png"])
def test_results_from_before_the_sweeps(tmp_path: Path, name: str) -> None:
    """A fanout.json written before the latency-by-clients and memory sweeps still draws."""
    old = sample_results.fanout()
    del old["fanout_latency"]
    for step in old["memory"]:
        for server in ("raw", "gateway"):
            del step[server]["bytes_per_connection_total"]
    (tmp_path / "fanout.json").write_text(json.dumps(old))
    drawn = plots.draw(tmp_path, ["fanout"])
    assert _is_png(tmp_path / name)
    assert drawn.notes
