"""The export benchmark runs end to end in its smallest configuration.

A demo project of a few images, one round of whole runs and one compression run against `zip`
(when installed). Only that every step produces its figures and the result files are written is
checked: speed is never asserted in tests (shared, noisy machines).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import export
from bench.common import machine_info, server_info, write_results
from services.export.pipeline import STAGES

TINY = export.Settings(images=4, pairs=1, compression_runs=1, reduced=True)


async def test_every_step_runs_and_writes_its_results(database_url: str, tmp_path: Path) -> None:
    report = await export.measure_all(TINY)

    assert report.entries > 4
    assert report.project_bytes > 0
    for timed in (report.pipeline, report.compression):
        assert len(timed.seconds) == 1, timed.label
        assert timed.archive_bytes > 0, timed.label
        assert timed.input_bytes > 0, timed.label
        assert timed.files > 0, timed.label
    reporting = report.reporting
    for timed in (reporting.off, reporting.on, reporting.direct):
        assert len(timed.seconds) == 1, timed.label
    assert reporting.reports >= report.entries
    assert reporting.emitted
    assert reporting.emitted[0] >= 1
    assert reporting.overhead_percent is not None
    assert reporting.accounted_percent is not None
    assert set(report.stage_seconds) == set(STAGES)
    if shutil.which("zip"):
        assert report.zip is not None
        assert report.zip.seconds
        assert report.zip.files == report.compression.files
        assert report.zip_ratio is not None
        assert report.zip_note is None
    else:
        assert report.zip is None
        assert report.zip_note

    rendered = export.render(
        report,
        server=await server_info(database_url),
        machine=machine_info(),
        source="test",
        started_at="now",
        duration_seconds=1.0,
    )
    json_path, md_path = write_results(tmp_path, export.NAME, rendered.payload, rendered.markdown)
    payload = json.loads(json_path.read_text())
    assert payload["benchmark"] == "export"
    assert payload["pipeline"]["archive_mb_per_s"] > 0
    assert payload["compression"]["files_per_s"] > 0
    assert payload["reporting"]["overhead_percent"] is not None
    markdown = md_path.read_text()
    for title in ("## Archive throughput", "## Progress reporting cost"):
        assert title in markdown


def test_quick_settings_say_they_are_reduced() -> None:
    quick = export.Settings.for_run(quick=True)
    full = export.Settings.for_run(quick=False)
    assert quick.reduced
    assert not full.reduced
    assert quick.images < full.images
