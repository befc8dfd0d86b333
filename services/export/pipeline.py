"""The export pipeline: a project folder in, one ZIP archive out, stage by stage.

The old export reported progress only between whole tasks, so its bar sat still for minutes and
then jumped; its cancel could not stop work already under way; and a failure left half-written
folders behind. This pipeline is built against those three faults:

- every stage reports after each item (`report(stage, current, total, item)`), once with
  `current=0` when it starts, so progress moves as work is done and never by guesswork;
- it asks `is_cancelled()` before each item and stops there, and `cleanup()` removes everything
  it wrote, the partial archive included;
- every failure is a `PipelineError` that names the stage, a stable code for the message
  catalogue, a message a person can read, and whether retrying can help.

It is plain blocking code: the worker runs it in a thread and turns reports into events. It
knows nothing of the event log or of asyncio, so it can be tested and measured on its own.

Staging layout (and so the archive's)::

    README.md                         what follows, and the options it was made with
    images/<name>                     the originals, byte for byte
    visualizations/<stem>.png         polygons and category labels drawn over each image
    annotations/coco.json             COCO instances: polygon segmentation, bbox, area
    annotations/yolo/classes.txt      one category name a line; the line number is the class
    annotations/yolo/labels/<stem>.txt  `class cx cy w h`, normalised to the image size
    metrics/objects.csv               image, object_id, category_id, category, area, perimeter
    metrics/images.csv                image, width, height, objects, count_<category>...

`<name>` is the image's project-relative path without a leading `images/`. Every file is written
under a temporary name and renamed into place, so a file that exists is complete: that is what
lets a worker taking over a job trust the outputs of the stages it is told are done.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any

import msgspec
from PIL import Image, ImageDraw, ImageFont

from schemas.events import ExportOptions, Stage

Report = Callable[[Stage, int, int, str | None], None]
"""`report(stage, current, total, item)`: `current` items of `total` are finished; `item` names
the one just finished (None at a stage's start)."""

STAGES: tuple[Stage, ...] = ("images", "visualizations", "annotations", "metrics", "compression")
ANNOTATION_FORMATS: tuple[str, ...] = ("coco", "yolo")
METRICS_FORMATS: tuple[str, ...] = ("csv",)

# Seconds per item of each stage, measured with `python -m services.export.pipeline` (which calls
# `measure_stage_costs`: the 300-image demo project, 320×240 PNGs with 2-5 objects each, every
# stage, COCO and YOLO; a stage's time runs from its `current=0` report to its last, divided by
# its items; median of 5 runs) on the development VM (2 vCPUs AMD EPYC, ext4 on a virtual disk)
# on 2026-11-23. The values are medians of 10 such measurements. Stages that create many small
# files (images, annotations with YOLO) swung between 0.2 and 1.3 ms per item with the disk load
# of other processes on the machine; visualizations (4.3-5.8 ms), metrics and compression were
# steady. A compression item is one archive entry: a PNG stored as is, or a small deflated text.
# Only the ratios matter: they split the processing phase of the progress bar between stages.
STAGE_COST: dict[Stage, float] = {
    "images": 0.00095,
    "visualizations": 0.0052,
    "annotations": 0.0010,
    "metrics": 0.000035,
    "compression": 0.00012,
}

_PRECOMPRESSED = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".zip", ".gz", ".jp2"})
_COPY_CHUNK = 1 << 20
# A missing or forbidden input will be just as missing or forbidden on the next attempt.
_PERMANENT_INPUT_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP}
    | {errno.ENAMETOOLONG}
)
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)


class PipelineError(Exception):
    """A failure the worker turns into `export:failed`.

    `message` is shown to people, so it names files only by their project- or archive-relative
    names, never by a path on the server. `retryable` says whether running the job again can
    succeed: disk full and other environment faults can clear up, bad input cannot.
    """

    def __init__(self, stage: Stage, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.stage: Stage = stage
        self.code = code
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return (
            f"PipelineError(stage={self.stage!r}, code={self.code!r}, "
            f"message={self.message!r}, retryable={self.retryable!r})"
        )


class PipelineCancelled(Exception):
    """Raised before the next item once `is_cancelled()` says so; the caller then cleans up."""

    def __init__(self, stage: Stage) -> None:
        super().__init__(f"cancelled during {stage}")
        self.stage: Stage = stage


@dataclass(frozen=True)
class ArchiveResult:
    path: Path
    file_name: str
    size_bytes: int
    sha256: str


# The project format (see services/export/demo.py). msgspec checks types and gives errors with
# the JSON path of the bad value, which is what someone fixing the file needs to see.
_Point = tuple[float, float]


class _ObjectDoc(msgspec.Struct, frozen=True):
    id: int | str
    category: int
    polygon: Annotated[list[_Point], msgspec.Meta(min_length=3)]


class _ImageDoc(msgspec.Struct, frozen=True):
    file: str
    width: Annotated[int, msgspec.Meta(gt=0)]
    height: Annotated[int, msgspec.Meta(gt=0)]
    objects: list[_ObjectDoc] = []


class _CategoryDoc(msgspec.Struct, frozen=True):
    id: int
    name: Annotated[str, msgspec.Meta(min_length=1)]


class _ProjectDoc(msgspec.Struct, frozen=True):
    categories: list[_CategoryDoc]
    images: list[_ImageDoc]


_project_decoder = msgspec.json.Decoder(_ProjectDoc)


@dataclass(frozen=True, slots=True)
class _Image:
    file: str
    """Project-relative, as annotations.json names it."""
    name: str
    """Archive-relative under images/: `file` without a leading `images/`."""
    stem: str
    """`name` without its suffix: names the visualization and the YOLO label file."""
    doc: _ImageDoc


@dataclass(frozen=True, slots=True)
class _Project:
    categories: tuple[_CategoryDoc, ...]
    images: tuple[_Image, ...]
    objects: int


class ExportPipeline:
    """Runs the stages an `ExportOptions` selects over one project folder.

    `work_dir` belongs to this job: staging goes to `work_dir/staging`, the archive to
    `work_dir/<archive_name>` (written as `<archive_name>.partial` and renamed when complete, so a
    file under the final name is always a whole archive).
    """

    def __init__(
        self,
        project_dir: Path,
        work_dir: Path,
        options: ExportOptions,
        *,
        report: Report,
        is_cancelled: Callable[[], bool],
        archive_name: str,
    ) -> None:
        if (
            PurePosixPath(archive_name).name != archive_name
            or Path(archive_name).name != archive_name
            or not archive_name.endswith(".zip")
            or archive_name in (".zip", "staging")
        ):
            raise ValueError(
                f"archive_name must be a plain file name ending in .zip: {archive_name!r}"
            )
        self.project_dir = project_dir
        self.work_dir = work_dir
        self.options = options
        self.archive_name = archive_name
        self._report = report
        self._is_cancelled = is_cancelled
        self._staging = work_dir / "staging"
        self._archive = work_dir / archive_name
        self._partial = work_dir / f"{archive_name}.partial"
        self._project: _Project | None = None
        self._fonts: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}

    # -- planning ---------------------------------------------------------------------------

    def plan(self) -> list[tuple[Stage, int]]:
        """The selected stages in order with their item counts; validates options and project.

        Everything that can be known wrong before any work (an unknown format, a missing project,
        annotations that do not parse or break the format's rules) fails here, so a bad job fails
        at once instead of after minutes of copying.
        """
        annotation_formats = self._annotation_formats()
        metrics_formats = self._metrics_formats()
        project = self._load()
        plan: list[tuple[Stage, int]] = []
        images = len(project.images)
        if self.options.include_original_images:
            plan.append(("images", images))
        if self.options.include_visualizations:
            plan.append(("visualizations", images))
        if annotation_formats:
            plan.append(("annotations", images + len(annotation_formats)))
        if metrics_formats:
            plan.append(("metrics", images))
        entries = sum(len(self._outputs(stage)) for stage, _ in plan)
        plan.append(("compression", entries + len(self._outputs("compression"))))
        return plan

    def _annotation_formats(self) -> tuple[str, ...]:
        return _formats(self.options.annotation_formats, ANNOTATION_FORMATS, "annotations")

    def _metrics_formats(self) -> tuple[str, ...]:
        return _formats(self.options.metrics_formats, METRICS_FORMATS, "metrics")

    def _load(self) -> _Project:
        if self._project is None:
            self._project = self._parse()
        return self._project

    def _parse(self) -> _Project:
        first: Stage = self._first_stage()
        if not self.project_dir.is_dir():
            raise PipelineError(
                first,
                "missing_project",
                f"Project {self.project_dir.name!r} was not found.",
                retryable=False,
            )
        try:
            raw = (self.project_dir / "annotations.json").read_bytes()
        except FileNotFoundError:
            raise PipelineError(
                first,
                "missing_project",
                f"Project {self.project_dir.name!r} has no annotations.json.",
                retryable=False,
            ) from None
        except OSError as exc:
            raise _read_error(first, "annotations.json", exc) from exc
        try:
            doc = _project_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise _malformed(f"annotations.json is not valid: {exc}") from exc
        return _check_project(doc)

    def _first_stage(self) -> Stage:
        if self.options.include_original_images:
            return "images"
        if self.options.include_visualizations:
            return "visualizations"
        return "annotations"

    def _outputs(self, stage: Stage) -> list[str]:
        """The staging-relative files a stage writes, in archive order."""
        project = self._load()
        if stage == "images":
            return [f"images/{image.name}" for image in project.images]
        if stage == "visualizations":
            return [f"visualizations/{image.stem}.png" for image in project.images]
        if stage == "annotations":
            outputs = []
            formats = self._annotation_formats()
            if "coco" in formats:
                outputs.append("annotations/coco.json")
            if "yolo" in formats:
                outputs.append("annotations/yolo/classes.txt")
                outputs += [f"annotations/yolo/labels/{image.stem}.txt" for image in project.images]
            return outputs
        if stage == "metrics":
            return ["metrics/objects.csv", "metrics/images.csv"] if self._metrics_formats() else []
        return ["README.md"] if self.options.include_documentation else []

    # -- running ----------------------------------------------------------------------------

    def run(self, *, done_stages: frozenset[Stage] = frozenset()) -> ArchiveResult:
        """Run the plan and return the archive; staging is removed once the archive is complete.

        A stage in `done_stages` is skipped (without reports) when all its outputs are in staging,
        and redone otherwise: the worker that claims an abandoned job only knows what the events
        say was finished, and the disk may disagree. `compression` in `done_stages` with the
        archive present returns that archive.
        """
        plan = self.plan()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if "compression" in done_stages and self._archive.is_file():
            return self._existing_archive()
        self._staging.mkdir(exist_ok=True)
        result: ArchiveResult | None = None
        for stage, total in plan:
            if stage in done_stages and stage != "compression" and self._outputs_present(stage):
                continue
            with _mapped_errors(stage, None, internal=False):
                if stage == "images":
                    self._copy_images()
                elif stage == "visualizations":
                    self._draw_visualizations()
                elif stage == "annotations":
                    self._write_annotations()
                elif stage == "metrics":
                    self._write_metrics()
                else:
                    result = self._compress(total)
        assert result is not None, "the plan always ends with compression"
        return result

    def cleanup(self) -> None:
        """Remove staging, the partial archive and the archive. Safe to call any number of times.

        Errors other than "already gone" propagate, so the caller can report that clean-up did
        not complete instead of claiming it did.
        """
        if self._staging.exists():
            shutil.rmtree(self._staging, onerror=_ignore_missing)
        self._partial.unlink(missing_ok=True)
        self._archive.unlink(missing_ok=True)

    def _outputs_present(self, stage: Stage) -> bool:
        return all((self._staging / name).is_file() for name in self._outputs(stage))

    def _items(self, stage: Stage, items: Sequence[tuple[str, Callable[[], None]]]) -> None:
        """Report 0, then for each item: check for cancellation, do it, report it."""
        total = len(items)
        self._report(stage, 0, total, None)
        for index, (name, work) in enumerate(items, start=1):
            if self._is_cancelled():
                raise PipelineCancelled(stage)
            with _mapped_errors(stage, name):
                work()
            self._report(stage, index, total, name)

    def _fresh_dir(self, name: str) -> Path:
        """A stage's output folder, emptied: a redone stage must not keep a failed try's files."""
        path = self._staging / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    # -- images -----------------------------------------------------------------------------

    def _copy_images(self) -> None:
        project = self._load()
        self._fresh_dir("images")
        self._items(
            "images", [(image.file, partial(self._copy_image, image)) for image in project.images]
        )

    def _copy_image(self, image: _Image) -> None:
        with self._open_source("images", image) as source:
            # Only the header is read: enough to refuse a file that is not an image at all
            # instead of shipping it as one.
            _identify("images", image.file, source)
            source.seek(0)
            with _atomic(self._staging / "images" / image.name) as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)

    def _open_source(self, stage: Stage, image: _Image) -> IO[bytes]:
        try:
            return (self.project_dir / image.file).open("rb")
        except OSError as exc:
            raise _read_error(stage, image.file, exc) from exc

    # -- visualizations ---------------------------------------------------------------------

    def _draw_visualizations(self) -> None:
        project = self._load()
        self._fresh_dir("visualizations")
        colours = {
            category.id: _PALETTE[index % len(_PALETTE)]
            for index, category in enumerate(project.categories)
        }
        names = {category.id: category.name for category in project.categories}
        self._items(
            "visualizations",
            [
                (image.file, partial(self._draw_visualization, image, colours, names))
                for image in project.images
            ],
        )

    def _draw_visualization(
        self, image: _Image, colours: dict[int, tuple[int, int, int]], names: dict[int, str]
    ) -> None:
        with self._open_source("visualizations", image) as source:
            base = _decode("visualizations", image.file, source)
        overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        font = self._font(min(base.size))
        outline = max(1, min(base.size) // 160)
        for obj in image.doc.objects:
            colour = colours[obj.category]
            points = [(x, y) for x, y in obj.polygon]
            draw.polygon(points, fill=(*colour, 70), outline=(*colour, 255), width=outline)
        # Labels after all fills, so no shape is drawn over another's label.
        for obj in image.doc.objects:
            colour = colours[obj.category]
            label = names[obj.category]
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            w, h = right - left + 4, bottom - top + 4
            # Above the shape's box when there is room, and never outside the image.
            box_x, box_y, _, _ = _bbox(obj.polygon)
            x = max(0.0, min(box_x, base.width - w))
            y = max(0.0, min(box_y - h, base.height - h))
            draw.rectangle((x, y, x + w, y + h), fill=(*colour, 200))
            draw.text((x + 2 - left, y + 2 - top), label, fill=(255, 255, 255, 255), font=font)
        result = Image.alpha_composite(base, overlay).convert("RGB")
        with _atomic(self._staging / "visualizations" / f"{image.stem}.png") as target:
            result.save(target, "PNG", compress_level=3)

    def _font(self, side: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        size = max(10, side // 20)
        font = self._fonts.get(size)
        if font is None:
            font = self._fonts[size] = ImageFont.load_default(size=size)
        return font

    # -- annotations ------------------------------------------------------------------------

    def _write_annotations(self) -> None:
        project = self._load()
        formats = self._annotation_formats()
        self._fresh_dir("annotations")
        coco = _Coco(project) if "coco" in formats else None
        yolo = "yolo" in formats
        items: list[tuple[str, Callable[[], None]]] = []
        classes = {category.id: index for index, category in enumerate(project.categories)}
        for image_id, image in enumerate(project.images, start=1):
            work = partial(self._annotate, image_id, image, coco, classes if yolo else None)
            items.append((image.file, work))
        if coco is not None:
            items.append(("annotations/coco.json", partial(self._write_coco, coco)))
        if "yolo" in formats:
            items.append(("annotations/yolo/classes.txt", partial(self._write_classes, project)))
        self._items("annotations", items)

    def _annotate(
        self, image_id: int, image: _Image, coco: _Coco | None, classes: dict[int, int] | None
    ) -> None:
        """COCO entries are collected for one file at the end; a YOLO file is written now."""
        if coco is not None:
            coco.add(image_id, image)
        if classes is not None:
            lines = [_yolo_line(classes[obj.category], obj, image.doc) for obj in image.doc.objects]
            path = self._staging / "annotations" / "yolo" / "labels" / f"{image.stem}.txt"
            with _atomic(path) as target:
                target.write("".join(line + "\n" for line in lines).encode())

    def _write_coco(self, coco: _Coco) -> None:
        with _atomic(self._staging / "annotations" / "coco.json") as target:
            target.write(json.dumps(coco.document(), separators=(",", ":")).encode())

    def _write_classes(self, project: _Project) -> None:
        with _atomic(self._staging / "annotations" / "yolo" / "classes.txt") as target:
            target.write("".join(f"{c.name}\n" for c in project.categories).encode())

    # -- metrics ----------------------------------------------------------------------------

    def _write_metrics(self) -> None:
        project = self._load()
        folder = self._fresh_dir("metrics")
        names = {category.id: category.name for category in project.categories}
        with (
            _atomic_text(folder / "objects.csv") as objects_file,
            _atomic_text(folder / "images.csv") as images_file,
        ):
            objects_csv = csv.writer(objects_file)
            images_csv = csv.writer(images_file)
            objects_csv.writerow(
                ["image", "object_id", "category_id", "category", "area", "perimeter"]
            )
            images_csv.writerow(
                ["image", "width", "height", "objects"]
                + [f"count_{category.name}" for category in project.categories]
            )

            def measure(image: _Image) -> None:
                counts = dict.fromkeys(names, 0)
                for obj in image.doc.objects:
                    counts[obj.category] += 1
                    objects_csv.writerow(
                        [
                            image.name,
                            obj.id,
                            obj.category,
                            names[obj.category],
                            _number(polygon_area(obj.polygon)),
                            _number(polygon_perimeter(obj.polygon)),
                        ]
                    )
                images_csv.writerow(
                    [
                        image.name,
                        image.doc.width,
                        image.doc.height,
                        len(image.doc.objects),
                        *counts.values(),
                    ]
                )

            self._items(
                "metrics", [(image.file, partial(measure, image)) for image in project.images]
            )

    # -- compression ------------------------------------------------------------------------

    def _compress(self, total: int) -> ArchiveResult:
        entries = list(self._outputs("compression"))
        for stage, _ in self.plan():
            if stage != "compression":
                entries += self._outputs(stage)
        self._report("compression", 0, total, None)
        if self.options.include_documentation:
            with _atomic(self._staging / "README.md") as target:
                target.write(self._readme().encode())
        with self._partial.open("wb") as raw:
            writer = _HashingWriter(raw)
            archive = zipfile.ZipFile(writer, "w", compression=zipfile.ZIP_DEFLATED)
            try:
                for index, name in enumerate(entries, start=1):
                    if self._is_cancelled():
                        raise PipelineCancelled("compression")
                    with _mapped_errors("compression", name):
                        self._add_entry(archive, name)
                    self._report("compression", index, total, name)
            except BaseException:
                # The archive is abandoned: finishing it could only fail again (disk full) and
                # turn a cancel or the first error into another one.
                with contextlib.suppress(Exception):
                    archive.close()
                raise
            archive.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(self._partial, self._archive)
        shutil.rmtree(self._staging, onerror=_ignore_missing)
        return ArchiveResult(
            path=self._archive,
            file_name=self.archive_name,
            size_bytes=writer.size,
            sha256=writer.hexdigest(),
        )

    def _add_entry(self, archive: zipfile.ZipFile, name: str) -> None:
        source = self._staging / name
        info = zipfile.ZipInfo.from_file(source, name)
        # PNG and JPEG are compressed already: deflating them again costs time and saves nothing.
        stored = PurePosixPath(name).suffix.lower() in _PRECOMPRESSED
        info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
        with source.open("rb") as src, archive.open(info, "w") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)

    def _existing_archive(self) -> ArchiveResult:
        # Only on take-over after a completed compression: the hash was lost with the worker.
        digest = hashlib.sha256()
        size = 0
        with self._archive.open("rb") as file:
            while chunk := file.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return ArchiveResult(self._archive, self.archive_name, size, digest.hexdigest())

    def _readme(self) -> str:
        project = self._load()
        stages = [stage for stage, _ in self.plan()]
        formats = self._annotation_formats()
        lines = [
            f"# Export of project {self.project_dir.name}",
            "",
            f"{len(project.images)} images, {project.objects} annotated objects in "
            f"{len(project.categories)} categories: "
            + ", ".join(f"{c.name} (id {c.id})" for c in project.categories)
            + ".",
            "",
            "## Contents",
            "",
            "- `README.md`: this file.",
        ]
        if "images" in stages:
            lines.append("- `images/`: the original images, unchanged.")
        if "visualizations" in stages:
            lines.append(
                "- `visualizations/`: each image as PNG with its annotated polygons filled and "
                "outlined in one colour per category, and labelled with the category name."
            )
        if "coco" in formats:
            lines.append(
                "- `annotations/coco.json`: COCO instances. `segmentation` is the polygon as "
                "`[x1, y1, x2, y2, ...]` in pixels, `bbox` is `[x, y, width, height]` of the "
                "polygon, `area` is the polygon's area (shoelace formula). Image ids follow the "
                "order of the project; `object_id` is the project's id of the object."
            )
        if "yolo" in formats:
            lines.append(
                "- `annotations/yolo/`: YOLO detection labels. `classes.txt` lists the category "
                "names, line n (from 0) being class n; `labels/<image>.txt` has one line "
                "`class cx cy w h` per object: the box around the polygon, clipped to the image, "
                "its centre and size divided by the image's width and height."
            )
        if "metrics" in stages:
            lines += [
                "- `metrics/objects.csv`: one row per object: `image`, `object_id`, "
                "`category_id`, `category`, `area` (square pixels, shoelace formula), "
                "`perimeter` (pixels, the closed polygon's length).",
                "- `metrics/images.csv`: one row per image: `image`, `width`, `height`, "
                "`objects`, and `count_<category>` for each category.",
            ]
        options = msgspec.json.encode(self.options).decode()
        lines += ["", "## Options", "", f"`{options}`", ""]
        return "\n".join(lines)


# -- validation -------------------------------------------------------------------------------


def _formats(requested: Sequence[str], known: tuple[str, ...], stage: Stage) -> tuple[str, ...]:
    chosen: list[str] = []
    for name in requested:
        key = name.strip().lower()
        if key not in known:
            raise PipelineError(
                stage,
                "unsupported_format",
                f"The {stage} format {name!r} is not supported (supported: {', '.join(known)}).",
                retryable=False,
            )
        if key not in chosen:
            chosen.append(key)
    return tuple(chosen)


def _malformed(message: str) -> PipelineError:
    return PipelineError("annotations", "malformed_annotation", message, retryable=False)


def _check_project(doc: _ProjectDoc) -> _Project:
    """The rules the types cannot say: references, uniqueness, safe names, finite numbers."""
    category_ids: set[int] = set()
    category_names: set[str] = set()
    for category in doc.categories:
        if category.id in category_ids:
            raise _malformed(f"annotations.json: category id {category.id} appears twice.")
        if category.name in category_names:
            raise _malformed(f"annotations.json: category name {category.name!r} appears twice.")
        category_ids.add(category.id)
        category_names.add(category.name)
    images: list[_Image] = []
    stems: set[str] = set()
    object_ids: set[int | str] = set()
    objects = 0
    for index, image in enumerate(doc.images):
        where = f"annotations.json: images[{index}]"
        path = PurePosixPath(image.file)
        if (
            not image.file
            or path.is_absolute()
            or "\\" in image.file
            or any(part in ("..", ".", "") for part in image.file.split("/"))
        ):
            raise _malformed(f"{where}: file {image.file!r} is not a path inside the project.")
        parts = path.parts[1:] if path.parts[0] == "images" and len(path.parts) > 1 else path.parts
        name = "/".join(parts)
        stem = str(PurePosixPath(name).with_suffix(""))
        # Visualizations and YOLO labels are named by stem; case-folded so that no two collide
        # on a case-insensitive disk either.
        if stem.casefold() in stems:
            raise _malformed(f"{where}: another image has the same name as {image.file!r}.")
        stems.add(stem.casefold())
        for number, obj in enumerate(image.objects):
            what = f"{where}.objects[{number}]"
            if obj.category not in category_ids:
                raise _malformed(f"{what}: category {obj.category} is not defined.")
            if obj.id in object_ids:
                raise _malformed(f"{what}: object id {obj.id!r} is used twice.")
            object_ids.add(obj.id)
            if not all(math.isfinite(c) for point in obj.polygon for c in point):
                raise _malformed(f"{what}: the polygon has a coordinate that is not a number.")
            objects += 1
        images.append(_Image(file=image.file, name=name, stem=stem, doc=image))
    return _Project(categories=tuple(doc.categories), images=tuple(images), objects=objects)


# -- geometry and formats ---------------------------------------------------------------------


def polygon_area(polygon: Sequence[_Point]) -> float:
    """The shoelace formula: the area of a simple polygon, whichever way it winds."""
    twice = 0.0
    for (x1, y1), (x2, y2) in zip(polygon, [*polygon[1:], polygon[0]], strict=True):
        twice += x1 * y2 - x2 * y1
    return abs(twice) / 2


def polygon_perimeter(polygon: Sequence[_Point]) -> float:
    """The length of the closed outline, the closing edge included."""
    return sum(math.dist(a, b) for a, b in zip(polygon, [*polygon[1:], polygon[0]], strict=True))


def _bbox(polygon: Sequence[_Point]) -> tuple[float, float, float, float]:
    xs = [x for x, _ in polygon]
    ys = [y for _, y in polygon]
    return min(xs), min(ys), max(xs), max(ys)


class _Coco:
    """COCO instances, built image by image and written once at the end."""

    def __init__(self, project: _Project) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = [
            {"id": c.id, "name": c.name, "supercategory": ""} for c in project.categories
        ]

    def add(self, image_id: int, image: _Image) -> None:
        doc = image.doc
        self.images.append(
            {"id": image_id, "file_name": image.name, "width": doc.width, "height": doc.height}
        )
        for obj in doc.objects:
            x0, y0, x1, y1 = _bbox(obj.polygon)
            self.annotations.append(
                {
                    # COCO wants integer ids unique in the file; the project's id is kept beside.
                    "id": len(self.annotations) + 1,
                    "object_id": obj.id,
                    "image_id": image_id,
                    "category_id": obj.category,
                    "segmentation": [[c for point in obj.polygon for c in point]],
                    "area": polygon_area(obj.polygon),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )

    def document(self) -> dict[str, Any]:
        return {
            "info": {"description": "Exported annotations", "version": "1.0"},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }


def _yolo_line(class_index: int, obj: _ObjectDoc, image: _ImageDoc) -> str:
    x0, y0, x1, y1 = _bbox(obj.polygon)
    # YOLO has no way to say "outside the image": clip, so every value stays within [0, 1].
    x0, x1 = (min(max(v, 0.0), image.width) for v in (x0, x1))
    y0, y1 = (min(max(v, 0.0), image.height) for v in (y0, y1))
    cx = (x0 + x1) / 2 / image.width
    cy = (y0 + y1) / 2 / image.height
    w = (x1 - x0) / image.width
    h = (y1 - y0) / image.height
    return f"{class_index} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def _number(value: float) -> str:
    return repr(round(value, 4))


# -- files and errors -------------------------------------------------------------------------


class _HashingWriter:
    """The archive's file, hashed and counted as it is written.

    It has no `seek`, so ZipFile writes strictly forward (sizes go into data descriptors
    instead of being patched into headers afterwards): the bytes hashed are the file's bytes,
    and the archive never has to be read back.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        written = self._raw.write(data)
        self._digest.update(data)
        self.size += len(data)
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` under a temporary name and rename it into place only if all went well."""
    with _renamed(path) as temporary, temporary.open("wb") as file:
        yield file


@contextlib.contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """`_atomic` for CSV: UTF-8, and no newline translation (the csv module writes CRLF)."""
    with _renamed(path) as temporary, temporary.open("w", encoding="utf-8", newline="") as file:
        yield file


@contextlib.contextmanager
def _renamed(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.part")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _identify(stage: Stage, name: str, source: IO[bytes]) -> None:
    try:
        with Image.open(source):
            pass
    except Exception as exc:
        raise _image_error(stage, name, exc) from exc


def _decode(stage: Stage, name: str, source: IO[bytes]) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()
            return opened.convert("RGBA")
    except Exception as exc:
        raise _image_error(stage, name, exc) from exc


def _image_error(stage: Stage, name: str, exc: Exception) -> PipelineError:
    # Decoders raise many types for bad data (OSError without errno, SyntaxError, ValueError,
    # DecompressionBombError...); only an OSError with an errno is about the disk, not the file.
    if isinstance(exc, OSError) and exc.errno is not None:
        return _read_error(stage, name, exc)
    if isinstance(exc, Image.DecompressionBombError):
        reason = "it is too large to process"
    else:
        reason = "it is not an image in a format that can be read, or it is damaged"
    return PipelineError(
        stage, "unreadable_file", f"{name} could not be read: {reason}.", retryable=False
    )


def _read_error(stage: Stage, name: str, exc: OSError) -> PipelineError:
    if exc.errno is None or exc.errno in _PERMANENT_INPUT_ERRNOS:
        reason = os.strerror(exc.errno).lower() if exc.errno else "it could not be opened"
        return PipelineError(
            stage, "unreadable_file", f"{name} could not be read: {reason}.", retryable=False
        )
    return PipelineError(
        stage,
        "io_error",
        f"Reading {name} failed: {os.strerror(exc.errno).lower()}.",
        retryable=True,
    )


@contextlib.contextmanager
def _mapped_errors(stage: Stage, item: str | None, *, internal: bool = True) -> Iterator[None]:
    """Turn what escapes a stage into a PipelineError naming the stage, without server paths.

    `internal=False` leaves exceptions other than OSError alone: around a whole stage they may
    come from the caller's `report`, which is the caller's business.
    """
    where = f" while writing {item}" if item else ""
    try:
        yield
    except (PipelineError, PipelineCancelled):
        raise
    except OSError as exc:
        if exc.errno in _NO_SPACE_ERRNOS:
            raise PipelineError(
                stage,
                "disk_full",
                f"The export ran out of disk space during {stage}{where}.",
                retryable=True,
            ) from exc
        reason = os.strerror(exc.errno).lower() if exc.errno else "input/output error"
        # Writing to our own work folder failing is a fault of the machine, not of the project,
        # so another attempt (possibly on another worker) can succeed.
        raise PipelineError(
            stage, "io_error", f"The export failed during {stage}{where}: {reason}.", retryable=True
        ) from exc
    except Exception as exc:
        if not internal:
            raise
        raise PipelineError(
            stage,
            "internal_error",
            f"The export failed during {stage}{where} because of an internal error.",
            retryable=False,
        ) from exc


def _ignore_missing(function: Callable[..., Any], path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


# -- progress weights -------------------------------------------------------------------------


def stage_weights(plan: Sequence[tuple[Stage, int]]) -> dict[Stage, float]:
    """Each planned stage's share of the expected processing time (items × cost), summing to 1.

    Equal shares made the old bar crawl through a slow stage and leap over fast ones; these make
    the bar's speed roughly constant. A plan of nothing but empty stages gets equal shares, so
    the bar still reaches its end.
    """
    if not plan:
        return {}
    expected = {stage: items * STAGE_COST[stage] for stage, items in plan}
    total = sum(expected.values())
    if total <= 0:
        return {stage: 1 / len(plan) for stage, _ in plan}
    return {stage: cost / total for stage, cost in expected.items()}


class _Stopwatch:
    """A `report` that notes when each stage reported first and last."""

    def __init__(self) -> None:
        self.first: dict[Stage, float] = {}
        self.last: dict[Stage, float] = {}
        self.totals: dict[Stage, int] = {}

    def __call__(self, stage: Stage, current: int, total: int, item: str | None) -> None:
        now = time.perf_counter()
        self.first.setdefault(stage, now)
        self.last[stage] = now
        self.totals[stage] = total

    def spans(self) -> dict[Stage, tuple[float, int]]:
        return {s: (self.last[s] - self.first[s], self.totals[s]) for s in self.first}


def measure_stage_costs(
    root: Path, *, images: int = 300, runs: int = 5
) -> tuple[dict[Stage, float], float]:
    """Seconds per item of each stage on the demo project, and the archive throughput in MB/s.

    The median over `runs` runs, from each stage's `current=0` report to its last. This is how
    `STAGE_COST` was measured; rerun it on the deployment's hardware to refresh the numbers.
    """
    from .demo import create_demo_project

    project = create_demo_project(root / "data", images=images)
    options = ExportOptions(annotation_formats=("coco", "yolo"))
    samples: dict[Stage, list[float]] = {stage: [] for stage in STAGES}
    throughput: list[float] = []
    for attempt in range(runs):
        watch = _Stopwatch()
        pipeline = ExportPipeline(
            project,
            root / f"work-{attempt}",
            options,
            report=watch,
            is_cancelled=lambda: False,
            archive_name="demo.zip",
        )
        result = pipeline.run()
        for stage, (seconds, items) in watch.spans().items():
            samples[stage].append(seconds / max(items, 1))
        throughput.append(result.size_bytes / 1e6 / watch.spans()["compression"][0])
        pipeline.cleanup()
    median = {stage: sorted(values)[len(values) // 2] for stage, values in samples.items()}
    return median, sorted(throughput)[len(throughput) // 2]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        costs, mb_per_s = measure_stage_costs(Path(directory))
    for stage, cost in costs.items():
        print(f"{stage:15} {cost:.6f} s/item")
    print(f"archive         {mb_per_s:.1f} MB/s")
