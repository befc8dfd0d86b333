"""A generated demo project, so that `make run` shows a real export before anyone uploads data.

The project format is ours and deliberately small; the export pipeline reads nothing else::

    <data_root>/<project_id>/
        annotations.json
        images/img_0001.png, images/img_0002.png, ...

    annotations.json = {
        "categories": [{"id": 1, "name": "circle"}, ...],
        "images": [
            {"file": "images/img_0001.png", "width": 320, "height": 240,
             "objects": [{"id": 1, "category": 1, "polygon": [[x, y], [x, y], ...]}, ...]},
            ...
        ]
    }

`file` is relative to the project folder, `category` refers to a category's `id`, and a polygon
is at least three `[x, y]` points in pixels (closed implicitly: the last point joins the first).
Object ids are unique within the project.

The generator draws the same filled shapes that it annotates, so a visualization overlay lands
exactly on something visible and a reviewer can tell at a glance whether it is drawn right.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

WIDTH = 320
HEIGHT = 240
CATEGORIES: tuple[tuple[int, str], ...] = ((1, "circle"), (2, "triangle"), (3, "rectangle"))
_COLOURS = {1: (214, 69, 65), 2: (64, 145, 108), 3: (52, 101, 164)}
_GENERATED_NAME = re.compile(r"img_\d{4,}\.png")


def create_demo_project(
    data_root: Path, project_id: str = "demo", *, images: int = 300, seed: int = 7
) -> Path:
    """Write (or finish writing) the demo project and return its folder.

    Deterministic for a seed, so two export processes started together, or a rerun after an
    interrupted one, produce identical bytes. A complete project is left untouched, which keeps
    `make run` fast after the first time; anything else is rewritten. Every file is written
    to a temporary name and renamed into place, and `annotations.json` comes last, so a project
    that has it and all its images is a complete one.
    """
    if images < 0:
        raise ValueError("images must be >= 0")
    project = data_root / project_id
    image_dir = project / "images"
    rng = random.Random(seed)
    width = max(4, len(str(images)))
    entries = [_image_entry(rng, index, width) for index in range(1, images + 1)]
    _renumber_objects(entries)
    document = {
        "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES],
        "images": entries,
    }
    annotations = (json.dumps(document, indent=1) + "\n").encode()

    if _is_complete(project, annotations, entries):
        return project

    image_dir.mkdir(parents=True, exist_ok=True)
    backgrounds = random.Random(seed ^ 0x5EED)
    gradient = Image.linear_gradient("L").resize((WIDTH, HEIGHT))
    expected = set()
    for entry in entries:
        file = str(entry["file"])
        expected.add(Path(file).name)
        png = _render(entry, gradient, backgrounds)
        _write_atomic(project / file, png)
    # Images of an earlier, larger demo would only confuse someone browsing the folder.
    for stale in image_dir.iterdir():
        if _GENERATED_NAME.fullmatch(stale.name) and stale.name not in expected:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    _write_atomic(project / "annotations.json", annotations)
    return project


def _is_complete(project: Path, annotations: bytes, entries: list[dict[str, Any]]) -> bool:
    try:
        if (project / "annotations.json").read_bytes() != annotations:
            return False
        return all((project / str(entry["file"])).stat().st_size > 0 for entry in entries)
    except FileNotFoundError:
        return False


def _image_entry(rng: random.Random, index: int, width: int) -> dict[str, Any]:
    objects = []
    for _ in range(rng.randint(2, 5)):
        category = rng.choice(CATEGORIES)[0]
        objects.append({"id": 0, "category": category, "polygon": _shape(rng, category)})
    return {
        "file": f"images/img_{index:0{width}d}.png",
        "width": WIDTH,
        "height": HEIGHT,
        "objects": objects,
    }


def _renumber_objects(entries: list[dict[str, Any]]) -> None:
    next_id = 1
    for entry in entries:
        for obj in entry["objects"]:
            obj["id"] = next_id
            next_id += 1


def _shape(rng: random.Random, category: int) -> list[list[float]]:
    """A polygon that lies inside the image, so normalised boxes stay within [0, 1]."""
    radius = rng.uniform(14, 40)
    cx = rng.uniform(radius + 2, WIDTH - radius - 2)
    cy = rng.uniform(radius + 2, HEIGHT - radius - 2)
    turn = rng.uniform(0, 2 * math.pi)
    if category == 1:
        corners = [(radius, 2 * math.pi * k / 20) for k in range(20)]
    elif category == 2:
        corners = [(radius, turn + 2 * math.pi * k / 3) for k in range(3)]
    else:
        # A rotated rectangle: its corners at the same distance, at ±half-angle about 0 and π.
        half = rng.uniform(0.35, 0.9)
        corners = [(radius, turn + a) for a in (half, math.pi - half, math.pi + half, -half)]
    return [[round(cx + r * math.cos(a), 1), round(cy + r * math.sin(a), 1)] for r, a in corners]


def _render(entry: dict[str, Any], gradient: Image.Image, rng: random.Random) -> bytes:
    low = tuple(rng.randint(150, 200) for _ in range(3))
    high = tuple(rng.randint(215, 250) for _ in range(3))
    image = ImageOps.colorize(gradient, black=low, white=high)
    draw = ImageDraw.Draw(image)
    for obj in entry["objects"]:
        points = [(x, y) for x, y in obj["polygon"]]
        draw.polygon(points, fill=_COLOURS[obj["category"]])
    buffer = BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a unique temporary name, then rename: readers never see half a file."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
