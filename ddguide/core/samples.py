"""The samples folder, ddguide's one image-set contract: numbered PNGs, ``index.csv`` and ``grid.png``.

``sample``, ``filter`` and ``data shapes`` write it; ``fid``, ``filter``, ``cas``, ``finetune`` and ``demo`` read it
through :func:`read_samples`. The index has one row per image: ``file`` (relative to the folder, and never allowed
to point outside it), then ``index`` and ``seed`` for generated images, then whatever the sampler reports (class,
guidance, head probabilities, rejection probability). A shard (torchrun or ``--shard``) writes ``index.partRofW.csv``
and whichever shard finishes last joins them (:func:`merge_shards`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ddguide.core import artifacts
from ddguide.core.data import inside, load_image, open_image
from ddguide.core.errors import UserError

INDEX = "index.csv"
GRID = "grid.png"
GRID_IMAGES = 64  # the grid shows the first 64 images


@dataclass(frozen=True)
class SampleRow:
    """One image of a samples folder: its path (checked to lie inside the folder) and the index's columns."""

    path: Path
    values: dict[str, str]

    @property
    def file(self) -> str:
        return self.values["file"]

    @property
    def label(self) -> str | None:
        return self.values.get("class")

    def number(self, default: int) -> int:
        """The image's sample index (its noise seed offset) when the row has one, else ``default``."""
        text = str(self.values.get("index", ""))
        return int(text) if text.isdigit() else default


def index_path(source: str | Path) -> Path:
    """The index of a samples folder, or the index file itself."""
    source = Path(source)
    return source if source.suffix == ".csv" else source / INDEX


def read_samples(source: str | Path, require: Iterable[str] = ("file",), *, exist: bool = True) -> list[SampleRow]:
    """The rows of a samples folder (or of an ``index.csv``), each image's path resolved inside the folder.

    ``require`` names the columns it must have (e.g. ``class`` for labelled sets); with ``exist`` every listed
    file must be there. Any problem is one :class:`UserError` naming the index."""
    index = index_path(source)
    if not index.is_file():
        raise UserError(f"{index.parent}: no {INDEX} (not a ddguide samples folder)")
    required = list(dict.fromkeys(["file", *require]))
    try:
        with open(index, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            absent = [c for c in required if c not in (reader.fieldnames or [])]
            if absent:
                raise UserError(f"{index}: needs {' and '.join(map(repr, required))} column(s), "
                                f"{', '.join(map(repr, absent))} missing")
            rows = [SampleRow(inside(index.parent, row["file"], index), dict(row)) for row in reader if row.get("file")]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{index}: unreadable sample index ({e.__class__.__name__})") from None
    if not rows:
        raise UserError(f"{index}: lists no images")
    missing = [r.path for r in rows if not r.path.is_file()] if exist else []
    if missing:
        raise UserError(f"{index}: lists {len(missing)} missing file(s), e.g. {missing[0]}")
    return rows


def has_column(source: str | Path, column: str) -> bool:
    """Whether an index's header names ``column`` (an unreadable index says yes: its reader reports the problem)."""
    try:
        with open(index_path(source), newline="", encoding="utf-8") as f:
            return column in (next(csv.reader(f), None) or [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return True


def image_name(k: int) -> str:
    """The file name of generated image k."""
    return f"{k:06d}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    """A uint8 image (H, W, 3) as an RGB PNG, or (H, W, 1) / (H, W) as a grey one (mode L)."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, format="PNG")
    artifacts.atomic_write_bytes(path, buf.getvalue())


def write_grid(path: Path, images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2) -> None:
    """Images (H, W, C) uint8 tiled row-major on a white background: a grey grid when every image is grey
    (C = 1), else RGB (grey images repeated)."""
    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    h, w = images[0].shape[:2]
    channels = max(im.shape[2] for im in images)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, channels), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    write_png(path, grid)


def write_index(folder: Path, rows: list[dict[str, Any]], name: str = INDEX) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return artifacts.atomic_write_text(folder / name, buf.getvalue())


def write_folder_tables(folder: Path, rows: list[dict[str, Any]], images: Sequence[np.ndarray] | None = None) -> None:
    """The index and the grid of a folder whose images are written (the grid from ``images`` or read back)."""
    write_index(folder, rows)
    shown = list(images[:GRID_IMAGES]) if images is not None else [read_shown(folder / r["file"])
                                                                      for r in rows[:GRID_IMAGES]]
    write_grid(folder / GRID, shown)


def read_shown(path: Path) -> np.ndarray:
    """An image of a samples folder as the grid shows it: (H, W, 1) for a grey PNG, else (H, W, 3)."""
    grey = open_image(path).mode in ("L", "LA", "I;16", "I;16B", "I;16L", "I", "1")
    return load_image(path, channels=1 if grey else 3)


def part_name(rank: int, world: int) -> str:
    return f"index.part{rank}of{world}.csv"


def merge_shards(out: Path, world: int) -> bool:
    """Once every shard has written its part, join the parts in rank order (each shard did a consecutive slice)
    into index.csv and draw the grid; one shard at a time, so the last to finish does it, or ``ddguide merge``.
    The parts stay: a shard rerun joins again. False while a part is missing."""
    from ddguide.core.outputs import join_when_complete

    parts = [out / part_name(r, world) for r in range(world)]
    return join_when_complete(out, parts, lambda: _join_index(out, parts))


def _join_index(out: Path, parts: list[Path]) -> None:
    rows = [row for p in parts for row in _part_rows(p)]
    if not rows:
        raise UserError(f"{out}: its {len(parts)} shards kept no image; nothing to join")
    write_index(out, rows)
    images = [read_shown(out / r["file"]) for r in rows[:GRID_IMAGES]]
    write_grid(out / GRID, images)


def _part_rows(part: Path) -> list[dict[str, str]]:
    """A shard's rows as written (a shard with no images wrote none)."""
    with open(part, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row.get("file")]
