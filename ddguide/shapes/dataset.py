"""The built-in procedural dataset ("shapes"): flat coloured shapes whose labels are known exactly.

Nothing can be downloaded where ddguide is developed and tested, so its default model is trained on this
domain and every claim (guided attribute accuracy, mask mIoU, CAS) is measured by the analytic oracles
in ``ddguide.shapes.oracles``. The domain is made easy for a small 32x32 diffusion model to learn:

* 1-3 axis-aligned objects (circle, square, triangle, diamond) in 4 saturated palette colours,
  drawn with hard edges so masks are exact;
* a background of one of 3 dark neutral tones with a gentle linear gradient, far from every object colour;
* objects never touch each other or the border (>= 2 px gap, >= 1 px margin) and are >= S/4 px wide;
* the *main* object is larger than every other by >= 3 px (at 32 px), so the class - shape x colour of
  the main object - can be read off an image exactly.

Every image comes from its own generator ``np.random.default_rng([seed, split_id, index])``, so any
subset of a dataset can be regenerated alone and the same arguments always give byte-identical files.
"""

from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from ddguide.core.artifacts import atomic_write, atomic_write_text
from ddguide.core.errors import UserError
from ddguide.core.outputs import staged_folder

GENERATOR_VERSION = 1
SPLITS = {"train": 0, "val": 1, "test": 2}

# Mask ids: 0 is background, then one id per shape type.
MASK_CLASSES = ("background", "circle", "square", "triangle", "diamond")
SHAPES = MASK_CLASSES[1:]

# Saturated object colours, >= 116 (RGB L2) from every background tone and >= 165 from each other.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "yellow": (235, 205, 40),
}
COLOURS = tuple(PALETTE)
# Dark neutral background tones, ~70 apart so a gentle gradient never brings one near another.
BACKGROUNDS = {"black": (18, 18, 18), "charcoal": (58, 58, 62), "grey": (100, 98, 96)}
CIRCLE_INSET = 0.1  # a circle is the pixels whose centres lie within side/2 - CIRCLE_INSET of its centre
GRADIENT_MAX = 8  # largest change of a background channel from the image centre to an edge

# Class = colour and shape of the main object. Sorted by name, so the class id equals the position of
# the class folder in a sorted listing of images/ (what image-folder readers do).
CLASS_NAMES = tuple(sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES))
ATTRIBUTES = ("has_red", "has_circle", "multiple_objects", "main_left", "main_top")
OBJECT_COUNT_PROBS = (0.5, 0.25, 0.25)  # P(1 object), P(2), P(3): multiple_objects is true half the time


@dataclass(frozen=True)
class ShapesConfig:
    """What ``ddguide data shapes`` generates: ``n`` images of ``size`` px from ``seed`` and ``split``."""

    n: int
    size: int = 32
    seed: int = 0
    split: str = "train"


@dataclass(frozen=True)
class SizeLimits:
    """Object sides in pixels for an image size (the numbers in brackets are for 32 px)."""

    main_min: int  # smallest main object (12)
    main_max: int  # largest main object (16)
    other_min: int  # smallest other object (8)
    margin: int  # the main object is at least this much wider than any other (3)
    centre_gap: float  # main object centre is at least this far from the image's centre lines (1)


@dataclass(frozen=True)
class Shape:
    """One object: mask id of its shape, palette index of its colour, side and top-left corner."""

    shape: int
    colour: int
    side: int
    y: int
    x: int


@dataclass(frozen=True)
class Scene:
    """Everything an image shows; ``objects[0]`` is the main object."""

    background: int  # index into BACKGROUNDS
    gradient_axis: int  # 0: vertical, 1: horizontal
    gradient: int  # background change from the centre to the far edge, in [-GRADIENT_MAX, GRADIENT_MAX]
    objects: tuple[Shape, ...]


def size_limits(size: int) -> SizeLimits:
    main_max, margin = size // 2, max(2, round(3 * size / 32))
    # >= 7 px where two objects still fit side by side: smaller circles, squares and diamonds look alike
    other_min = max(size // 4, min(7, size - 4 - main_max))
    return SizeLimits(
        main_min=max(round(0.375 * size), other_min + margin),
        main_max=main_max,
        other_min=other_min,
        margin=margin,
        centre_gap=size / 32,
    )


def check_config(cfg: ShapesConfig) -> None:
    """Refuse arguments that cannot make a dataset, with a line that says what is allowed."""
    if cfg.n < 1:
        raise UserError(f"--num-images must be at least 1 (got {cfg.n})")
    if cfg.size < 16 or cfg.size % 8 or cfg.size > 4096:
        raise UserError(f"--size must be a multiple of 8 in 16..4096 (got {cfg.size})")
    if cfg.n > 10**8:
        raise UserError(f"--num-images must be at most 100000000 (got {cfg.n})")
    if cfg.split not in SPLITS:
        raise UserError(f"unknown split {cfg.split!r} (choose from {', '.join(SPLITS)})")
    if cfg.seed < 0:
        raise UserError(f"--seed must not be negative (got {cfg.seed})")


# --- geometry -----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def shape_mask(shape: int, side: int, width: int | None = None) -> np.ndarray:
    """Hard-edged (side, width) bool mask of a shape; its bounding box is exactly side x width.

    Shapes are defined on pixel centres, so the same function draws images and is the template the
    oracle matches components against. The generator draws squares only (``width`` left out); the oracle also
    asks for boxes one pixel off square (``side`` rows by ``width`` columns).
    """
    width = side if width is None else width
    cy = np.arange(side) + 0.5 - side / 2  # pixel centre offsets from the box's centre
    cx = np.arange(width) + 0.5 - width / 2
    dy, dx = np.meshgrid(cy, cx, indexing="ij")
    name = MASK_CLASSES[shape]
    if name == "circle":
        # radius a tenth of a pixel under side/2: the disc fills its box, and at even sides its top row is
        # 4 px wide or more, not the 2 px tip a diamond has (at 0.3 px under, 8/10/12 px circles and diamonds
        # overlapped by IoU 0.88-0.91 and a one-pixel error made them indistinguishable)
        ry, rx = side / 2 - CIRCLE_INSET, width / 2 - CIRCLE_INSET
        # squares keep the form the generator always used: the ellipse form rounds differently on the boundary
        mask = dx**2 + dy**2 <= ry**2 if width == side else (dx / rx) ** 2 + (dy / ry) ** 2 <= 1
    elif name == "square":
        mask = np.ones((side, width), bool)
    elif name == "triangle":
        # apex up, base on the bottom row: half-width grows by width / (2 side) px per row
        row = np.arange(side)[:, None]
        mask = np.abs(dx) * side <= (row + 1) * width / 2
    elif name == "diamond":
        mask = np.abs(dx) * side + np.abs(dy) * width <= side * width / 2
    else:
        raise ValueError(f"unknown shape id {shape}")
    mask.setflags(write=False)  # cached: shared by every caller
    return mask


def _gap_ok(a: Shape, b: Shape, gap: int = 2) -> bool:
    """True if the bounding boxes of a and b are at least ``gap`` px apart along x or along y."""
    apart_x = a.x + a.side + gap <= b.x or b.x + b.side + gap <= a.x
    apart_y = a.y + a.side + gap <= b.y or b.y + b.side + gap <= a.y
    return apart_x or apart_y


# --- sampling -----------------------------------------------------------------------------------------


def image_rng(cfg: ShapesConfig, index: int) -> np.random.Generator:
    """The generator of image ``index``: one per image, so any subset can be made alone."""
    return np.random.default_rng([cfg.seed, SPLITS[cfg.split], index])


def sample_scene(cfg: ShapesConfig, index: int) -> Scene:
    """The scene of image ``index``. Its class is ``index % len(CLASS_NAMES)``, so classes are balanced."""
    rng = image_rng(cfg, index)
    colour_name, shape_name = CLASS_NAMES[index % len(CLASS_NAMES)].split("_")
    count = 1 + int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS))
    kinds = [(SHAPES.index(shape_name) + 1, COLOURS.index(colour_name))]
    kinds += [(int(rng.integers(1, len(MASK_CLASSES))), int(rng.integers(len(COLOURS)))) for _ in range(count - 1)]
    return Scene(
        background=int(rng.integers(len(BACKGROUNDS))),
        gradient_axis=int(rng.integers(2)),
        gradient=int(rng.integers(-GRADIENT_MAX, GRADIENT_MAX + 1)),
        objects=_layout(rng, cfg.size, kinds),
    )


def _layout(rng: np.random.Generator, size: int, kinds: list[tuple[int, int]]) -> tuple[Shape, ...]:
    """Sides and positions for (shape, colour) pairs, main object first; retries until all fit apart."""
    lim = size_limits(size)
    for _ in range(10_000):
        main_side = int(rng.integers(lim.main_min, lim.main_max + 1))
        sides = [main_side] + [int(rng.integers(lim.other_min, main_side - lim.margin + 1)) for _ in kinds[1:]]
        placed = _place(rng, size, kinds, sides, lim)
        if placed is not None:
            return placed
    raise RuntimeError(f"could not lay out {len(kinds)} objects in a {size} px image")


def _place(rng, size, kinds, sides, lim: SizeLimits) -> tuple[Shape, ...] | None:
    """Random non-touching positions >= 1 px inside the border, or None if some object found no room."""
    placed: list[Shape] = []
    for (shape, colour), side in zip(kinds, sides):
        for _ in range(30):
            y, x = (int(v) for v in rng.integers(1, size - side, size=2))
            candidate = Shape(shape, colour, side, y, x)
            if not placed and not _main_clear_of_centre(candidate, size, lim):
                continue
            if all(_gap_ok(candidate, other) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return tuple(placed)


def _main_clear_of_centre(obj: Shape, size: int, lim: SizeLimits) -> bool:
    """Keep the main object's centre off the centre lines so main_left / main_top are never ambiguous."""
    cy, cx = obj.y + obj.side / 2, obj.x + obj.side / 2
    return abs(cx - size / 2) >= lim.centre_gap and abs(cy - size / 2) >= lim.centre_gap


# --- labels and rendering -----------------------------------------------------------------------------


def scene_class(scene: Scene) -> int:
    main = scene.objects[0]
    return CLASS_NAMES.index(f"{COLOURS[main.colour]}_{MASK_CLASSES[main.shape]}")


def scene_attributes(scene: Scene, size: int) -> dict[str, bool]:
    """The binary attributes: one colour, one shape, one count and two layout attributes."""
    main = scene.objects[0]
    return {
        "has_red": any(COLOURS[o.colour] == "red" for o in scene.objects),
        "has_circle": any(MASK_CLASSES[o.shape] == "circle" for o in scene.objects),
        "multiple_objects": len(scene.objects) > 1,
        "main_left": main.x + main.side / 2 < size / 2,
        "main_top": main.y + main.side / 2 < size / 2,
    }


def render(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image (size, size, 3) uint8 and its mask (size, size) uint8 of MASK_CLASSES ids."""
    ramp = (np.arange(size) + 0.5) / size * 2 - 1  # -1 at one edge, +1 at the other
    ramp = ramp[:, None] if scene.gradient_axis == 0 else ramp[None, :]
    base = np.array(list(BACKGROUNDS.values())[scene.background], np.float32)
    shade = np.broadcast_to(ramp * scene.gradient, (size, size))[..., None]  # (S, S, 1)
    image = np.rint(base + shade).clip(0, 255).astype(np.uint8)  # (S, S, 3)
    mask = np.zeros((size, size), np.uint8)
    for obj in scene.objects:
        inside = shape_mask(obj.shape, obj.side)
        window = (slice(obj.y, obj.y + obj.side), slice(obj.x, obj.x + obj.side))
        image[window][inside] = PALETTE[COLOURS[obj.colour]]
        mask[window][inside] = obj.shape
    return image, mask


def sample(cfg: ShapesConfig, index: int) -> tuple[np.ndarray, np.ndarray, Scene]:
    """Image ``index`` of a dataset in memory: (image, mask, scene), identical to what ``generate`` writes."""
    scene = sample_scene(cfg, index)
    image, mask = render(scene, cfg.size)
    return image, mask, scene


# --- writing ------------------------------------------------------------------------------------------


def generate(out: Path, cfg: ShapesConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a dataset to ``out`` one image at a time (memory does not grow with ``cfg.n``).

    Layout: images/<class>/<stem>.png (RGB), masks/<stem>.png (L, MASK_CLASSES ids), attributes.csv,
    index.csv and dataset.json. The tables are renamed into place only once every image is written, and
    dataset.json comes last: a folder holding it is complete.
    """
    check_config(cfg)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    width = max(6, len(str(cfg.n - 1)))
    # staged in a hidden sibling that a rerun of the same command resumes (images already there are complete:
    # each is written atomically); the folder appears under its name only once dataset.json is written
    with staged_folder(out, "dataset", resume=json.dumps(asdict(cfg), sort_keys=True)) as stage:
        with _csv_table(stage / "index.csv", ["file", "class", "class_id", "seed", "split", "index", "objects",
                                               "background"]) as index_rows, \
                _csv_table(stage / "attributes.csv", ["file", *ATTRIBUTES]) as attribute_rows:
            for i in range(cfg.n):
                stem = f"{cfg.split}_{i:0{width}d}"
                scene = sample_scene(cfg, i)
                cls = scene_class(scene)
                file = f"images/{CLASS_NAMES[cls]}/{stem}.png"
                if not ((stage / file).is_file() and (stage / "masks" / f"{stem}.png").is_file()):
                    image, mask = render(scene, cfg.size)
                    _write_png(stage / file, image)
                    _write_png(stage / "masks" / f"{stem}.png", mask)
                index_rows.writerow([file, CLASS_NAMES[cls], cls, cfg.seed, cfg.split, i, len(scene.objects),
                                     list(BACKGROUNDS)[scene.background]])
                attribute_rows.writerow([file, *(int(v) for v in scene_attributes(scene, cfg.size).values())])
                if progress is not None:
                    progress(i + 1, cfg.n)
        atomic_write_text(stage / "dataset.json", json.dumps(describe(cfg), indent=2) + "\n")
    return out


def describe(cfg: ShapesConfig) -> dict:
    """The contents of dataset.json: config, label vocabularies, palette and generator version."""
    return {
        "generator": "ddguide.shapes",
        "version": GENERATOR_VERSION,
        "config": asdict(cfg),
        "class_names": list(CLASS_NAMES),
        "attributes": list(ATTRIBUTES),
        "mask_classes": {str(i): name for i, name in enumerate(MASK_CLASSES)},
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
    }


def _write_png(path: Path, array: np.ndarray) -> None:
    # Fixed compression and no metadata: the same array always gives the same bytes.
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", compress_level=6))


@contextmanager
def _csv_table(path: Path, header: list[str]) -> Iterator:
    """A csv writer streaming to a temporary file that replaces ``path`` only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            yield writer
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
