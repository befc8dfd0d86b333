"""The export pipeline on a small generated project: contents, reports, failures, take-over."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from schemas.events import ExportOptions, Stage
from services.export.demo import create_demo_project
from services.export.pipeline import (
    STAGE_COST,
    ExportPipeline,
    PipelineCancelled,
    PipelineError,
    stage_weights,
)

IMAGES = 20
ALL_FORMATS = ExportOptions(annotation_formats=("coco", "yolo"))
SQUARE = [[10, 10], [20, 10], [20, 20], [10, 20]]


class Recorder:
    """A `report` callback that keeps every call, and can ask for a cancel at a given report."""

    def __init__(self, cancel_at: tuple[Stage, int] | None = None) -> None:
        self.calls: list[tuple[Stage, int, int, str | None]] = []
        self.cancel_at = cancel_at
        self.cancelled = False

    def __call__(self, stage: Stage, current: int, total: int, item: str | None) -> None:
        self.calls.append((stage, current, total, item))
        if self.cancel_at == (stage, current):
            self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled

    def stages(self) -> list[Stage]:
        seen: list[Stage] = []
        for stage, *_ in self.calls:
            if not seen or seen[-1] != stage:
                seen.append(stage)
        return seen

    def currents(self, stage: Stage) -> list[int]:
        return [current for s, current, _, _ in self.calls if s == stage]


def pipeline_for(
    project: Path,
    work: Path,
    options: ExportOptions = ALL_FORMATS,
    recorder: Recorder | None = None,
) -> tuple[ExportPipeline, Recorder]:
    recorder = recorder or Recorder()
    pipeline = ExportPipeline(
        project,
        work,
        options,
        report=recorder,
        is_cancelled=recorder.is_cancelled,
        archive_name="export.zip",
    )
    return pipeline, recorder


def read_annotations(project: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((project / "annotations.json").read_text())
    return document


def write_annotations(project: Path, document: dict[str, Any]) -> None:
    (project / "annotations.json").write_text(json.dumps(document))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A 20-image demo project plus a hand-made image holding one 10×10 square."""
    folder = create_demo_project(tmp_path / "data", "p1", images=IMAGES, seed=3)
    Image.new("RGB", (40, 30), "white").save(folder / "images" / "square.png")
    document = read_annotations(folder)
    document["images"].append(
        {
            "file": "images/square.png",
            "width": 40,
            "height": 30,
            "objects": [{"id": 9999, "category": 1, "polygon": SQUARE}],
        }
    )
    write_annotations(folder, document)
    return folder


def test_full_export_has_every_part_right(project: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    pipeline, recorder = pipeline_for(project, work)
    images = IMAGES + 1
    entries = 1 + images + images + 1 + 1 + images + 2
    assert pipeline.plan() == [
        ("images", images),
        ("visualizations", images),
        ("annotations", images + 2),
        ("metrics", images),
        ("compression", entries),
    ]

    result = pipeline.run()

    assert result.path == work / "export.zip"
    assert result.file_name == "export.zip"
    data = result.path.read_bytes()
    assert result.size_bytes == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in work.iterdir()) == ["export.zip"], "staging must be gone"

    document = read_annotations(project)
    stems = [Path(image["file"]).stem for image in document["images"]]
    with zipfile.ZipFile(result.path) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[0] == "README.md"
        assert sorted(names) == sorted(
            [
                "README.md",
                "annotations/coco.json",
                "annotations/yolo/classes.txt",
                "metrics/objects.csv",
                "metrics/images.csv",
                *(f"images/{stem}.png" for stem in stems),
                *(f"visualizations/{stem}.png" for stem in stems),
                *(f"annotations/yolo/labels/{stem}.txt" for stem in stems),
            ]
        )
        assert archive.getinfo("images/square.png").compress_type == zipfile.ZIP_STORED
        assert archive.getinfo("metrics/objects.csv").compress_type == zipfile.ZIP_DEFLATED
        assert archive.read("images/square.png") == (project / "images/square.png").read_bytes()
        with Image.open(io.BytesIO(archive.read("visualizations/square.png"))) as vis:
            assert vis.size == (40, 30)
            assert vis.getpixel((15, 15)) != (255, 255, 255), "the square is drawn over"

        readme = archive.read("README.md").decode()
        assert "annotations/coco.json" in readme
        assert "metrics/objects.csv" in readme

        coco = json.loads(archive.read("annotations/coco.json"))
        objects = sum(len(image["objects"]) for image in document["images"])
        assert len(coco["images"]) == images
        assert len(coco["annotations"]) == objects
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
        assert len({a["id"] for a in coco["annotations"]}) == objects
        (square,) = [a for a in coco["annotations"] if a["object_id"] == 9999]
        assert square["area"] == pytest.approx(100.0)
        assert square["bbox"] == pytest.approx([10, 10, 10, 10])
        assert square["segmentation"] == [[10, 10, 20, 10, 20, 20, 10, 20]]
        (square_image,) = [i for i in coco["images"] if i["id"] == square["image_id"]]
        assert square_image == {"id": images, "file_name": "square.png", "width": 40, "height": 30}

        classes = archive.read("annotations/yolo/classes.txt").decode().splitlines()
        assert classes == ["circle", "triangle", "rectangle"]
        for stem in stems:
            for line in archive.read(f"annotations/yolo/labels/{stem}.txt").decode().splitlines():
                klass, *box = line.split()
                assert 0 <= int(klass) < len(classes)
                assert len(box) == 4
                assert all(0.0 <= float(value) <= 1.0 for value in box), line
        square_label = archive.read("annotations/yolo/labels/square.txt").decode().split()
        assert [float(v) for v in square_label] == pytest.approx([0, 15 / 40, 15 / 30, 0.25, 1 / 3])

        rows = list(csv.DictReader(io.StringIO(archive.read("metrics/objects.csv").decode())))
        assert len(rows) == objects
        (row,) = [r for r in rows if r["object_id"] == "9999"]
        assert row["image"] == "square.png"
        assert row["category"] == "circle"
        assert float(row["area"]) == pytest.approx(100.0)
        assert float(row["perimeter"]) == pytest.approx(40.0)
        per_image = list(csv.DictReader(io.StringIO(archive.read("metrics/images.csv").decode())))
        assert len(per_image) == images
        for entry, counts in zip(document["images"], per_image, strict=True):
            assert int(counts["objects"]) == len(entry["objects"])
            by_category = [int(counts[f"count_{name}"]) for name in classes]
            assert sum(by_category) == len(entry["objects"])

    # Reports: stages in plan order, each counting 0..total without a gap.
    plan = pipeline.plan()
    assert recorder.stages() == [stage for stage, _ in plan]
    for stage, total in plan:
        calls = [c for c in recorder.calls if c[0] == stage]
        assert [c[1] for c in calls] == list(range(total + 1))
        assert all(c[2] == total for c in calls)
        assert calls[0][3] is None
        assert all(c[3] for c in calls[1:]), "every item report names its item"
    assert recorder.calls[1] == ("images", 1, images, document["images"][0]["file"])


def test_cancel_in_visualizations_stops_and_cleans_up(project: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    pipeline, recorder = pipeline_for(project, work, recorder=Recorder(("visualizations", 5)))

    with pytest.raises(PipelineCancelled) as caught:
        pipeline.run()

    assert caught.value.stage == "visualizations"
    assert recorder.currents("visualizations") == [0, 1, 2, 3, 4, 5]
    assert recorder.stages() == ["images", "visualizations"]
    assert (work / "staging").exists()
    pipeline.cleanup()
    assert list(work.iterdir()) == []
    pipeline.cleanup()  # safe twice


@pytest.mark.parametrize(
    ("options", "stage"),
    [
        (ALL_FORMATS, "images"),
        (ExportOptions(include_original_images=False), "visualizations"),
    ],
)
def test_unreadable_image(
    project: Path, tmp_path: Path, options: ExportOptions, stage: Stage
) -> None:
    (project / "images" / "img_0007.png").write_bytes(b"\x00garbage, not a PNG" * 10)
    pipeline, _ = pipeline_for(project, tmp_path / "work", options)

    with pytest.raises(PipelineError) as caught:
        pipeline.run()

    error = caught.value
    assert (error.stage, error.code, error.retryable) == (stage, "unreadable_file", False)
    assert "images/img_0007.png" in error.message
    assert str(tmp_path) not in error.message
    pipeline.cleanup()
    assert list((tmp_path / "work").iterdir()) == []


def test_missing_image_file_is_unreadable(project: Path, tmp_path: Path) -> None:
    (project / "images" / "img_0002.png").unlink()
    pipeline, _ = pipeline_for(project, tmp_path / "work")
    with pytest.raises(PipelineError) as caught:
        pipeline.run()
    assert (caught.value.code, caught.value.retryable) == ("unreadable_file", False)


def _polygon_of(points: Any) -> Any:
    def edit(document: dict[str, Any]) -> None:
        document["images"][0]["objects"][0]["polygon"] = points

    return edit


def _unknown_category(document: dict[str, Any]) -> None:
    document["images"][0]["objects"][0]["category"] = 42


def _escaping_path(document: dict[str, Any]) -> None:
    document["images"][0]["file"] = "../elsewhere.png"


@pytest.mark.parametrize(
    "edit",
    [
        _polygon_of([[0, 0], [5, 5]]),
        _polygon_of([[0, 0], [5, "five"], [9, 0]]),
        _polygon_of([[0, 0], [5, 5, 5], [9, 0]]),
        _unknown_category,
        _escaping_path,
    ],
    ids=["two-points", "non-numeric", "three-coordinates", "unknown-category", "escaping-path"],
)
def test_malformed_annotations_fail_in_plan(project: Path, tmp_path: Path, edit: Any) -> None:
    document = read_annotations(project)
    edit(document)
    write_annotations(project, document)
    pipeline, recorder = pipeline_for(project, tmp_path / "work")

    with pytest.raises(PipelineError) as caught:
        pipeline.plan()

    assert (caught.value.code, caught.value.retryable) == ("malformed_annotation", False)
    assert "annotations.json" in caught.value.message
    assert recorder.calls == []
    assert not (tmp_path / "work").exists()


def test_unparsable_annotations(project: Path, tmp_path: Path) -> None:
    (project / "annotations.json").write_text('{"categories": [')
    pipeline, _ = pipeline_for(project, tmp_path / "work")
    with pytest.raises(PipelineError) as caught:
        pipeline.plan()
    assert caught.value.code == "malformed_annotation"


def test_missing_project_and_unknown_format(project: Path, tmp_path: Path) -> None:
    pipeline, _ = pipeline_for(tmp_path / "data" / "nope", tmp_path / "work")
    with pytest.raises(PipelineError) as caught:
        pipeline.plan()
    assert (caught.value.code, caught.value.retryable) == ("missing_project", False)

    options = ExportOptions(annotation_formats=("coco", "pascal-voc"))  # type: ignore[arg-type]
    pipeline, _ = pipeline_for(project, tmp_path / "work", options)
    with pytest.raises(PipelineError) as caught:
        pipeline.plan()
    error = caught.value
    assert (error.stage, error.code, error.retryable) == (
        "annotations",
        "unsupported_format",
        False,
    )
    assert "pascal-voc" in error.message


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret/scratch/file")


def test_disk_full_while_copying_images(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "copyfileobj", _no_space)
    pipeline, _ = pipeline_for(project, tmp_path / "work")

    with pytest.raises(PipelineError) as caught:
        pipeline.run()

    error = caught.value
    assert (error.stage, error.code, error.retryable) == ("images", "disk_full", True)
    assert "/srv/secret" not in error.message
    pipeline.cleanup()
    assert list((tmp_path / "work").iterdir()) == []


def test_disk_full_while_compressing_leaves_no_partial_archive(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = shutil.copyfileobj
    copies = 0

    def copy_then_fail(*args: Any, **kwargs: Any) -> None:
        nonlocal copies
        copies += 1
        if copies > 10:
            _no_space()
        copy(*args, **kwargs)

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fail)
    options = ExportOptions(
        include_original_images=False,
        include_visualizations=False,
        annotation_formats=("coco", "yolo"),
    )
    work = tmp_path / "work"
    pipeline, recorder = pipeline_for(project, work, options)

    with pytest.raises(PipelineError) as caught:
        pipeline.run()

    assert (caught.value.stage, caught.value.code) == ("compression", "disk_full")
    assert recorder.currents("compression")[-1] == 10
    assert any(path.suffix == ".partial" for path in work.iterdir())
    pipeline.cleanup()
    assert list(work.iterdir()) == []


def test_done_stages_are_skipped_and_unfinished_ones_redone(project: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    # The first worker finishes images, visualizations and annotations, then stops (no cleanup).
    first, _ = pipeline_for(project, work, recorder=Recorder(("metrics", 3)))
    with pytest.raises(PipelineCancelled):
        first.run()

    done: frozenset[Stage] = frozenset({"images", "visualizations", "annotations"})
    second, recorder = pipeline_for(project, work)
    result = second.run(done_stages=done)

    assert recorder.stages() == ["metrics", "compression"]
    assert recorder.currents("metrics") == list(range(IMAGES + 2))
    with zipfile.ZipFile(result.path) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
    assert len(names) == dict(second.plan())["compression"]
    assert "metrics/objects.csv" in names
    assert sum(name.startswith("visualizations/") for name in names) == IMAGES + 1

    # A stage said to be done whose outputs are incomplete is done again.
    work2 = tmp_path / "work2"
    third, _ = pipeline_for(project, work2, recorder=Recorder(("metrics", 1)))
    with pytest.raises(PipelineCancelled):
        third.run()
    (work2 / "staging" / "visualizations" / "img_0004.png").unlink()
    fourth, recorder = pipeline_for(project, work2)
    fourth.run(done_stages=done)
    assert recorder.stages() == ["visualizations", "metrics", "compression"]


def test_done_compression_returns_the_existing_archive(project: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first, _ = pipeline_for(project, work)
    result = first.run()
    again, recorder = pipeline_for(project, work)
    assert again.run(done_stages=frozenset({"compression"})) == result
    assert recorder.calls == []


def test_demo_project_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    one = create_demo_project(tmp_path / "a", images=6, seed=11)
    two = create_demo_project(tmp_path / "b", images=6, seed=11)
    other = create_demo_project(tmp_path / "c", images=6, seed=12)

    def contents(folder: Path) -> dict[str, bytes]:
        return {
            str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }

    assert one == tmp_path / "a" / "demo"
    original = contents(one)
    assert len(original) == 7
    assert original == contents(two)
    assert original != contents(other)
    document = json.loads(original["annotations.json"])
    assert [c["name"] for c in document["categories"]] == ["circle", "triangle", "rectangle"]
    for image in document["images"]:
        with Image.open(one / image["file"]) as picture:
            assert picture.size == (image["width"], image["height"])
        for obj in image["objects"]:
            assert len(obj["polygon"]) >= 3
            assert all(
                0 <= x <= image["width"] and 0 <= y <= image["height"] for x, y in obj["polygon"]
            )

    # Complete: left as it is.
    stamps = {path: path.stat().st_mtime_ns for path in one.rglob("*")}
    create_demo_project(tmp_path / "a", images=6, seed=11)
    assert {path: path.stat().st_mtime_ns for path in one.rglob("*")} == stamps

    # Interrupted: an image missing and no annotations yet, then completed.
    (one / "images" / "img_0003.png").unlink()
    (one / "annotations.json").unlink()
    create_demo_project(tmp_path / "a", images=6, seed=11)
    assert contents(one) == original


def test_stage_weights_follow_measured_costs() -> None:
    plan: list[tuple[Stage, int]] = [("images", 10), ("visualizations", 10), ("compression", 21)]
    weights = stage_weights(plan)
    assert sum(weights.values()) == pytest.approx(1.0)
    ratio = weights["visualizations"] / weights["images"]
    assert ratio == pytest.approx(STAGE_COST["visualizations"] / STAGE_COST["images"])
    assert weights["visualizations"] > weights["images"], "rendering costs more than copying"
    assert stage_weights([("images", 0), ("compression", 0)]) == {
        "images": 0.5,
        "compression": 0.5,
    }
    assert stage_weights([]) == {}
