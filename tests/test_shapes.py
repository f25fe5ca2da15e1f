"""The procedural shapes dataset: determinism, layout on disk, label statistics, memory, argument checks."""

from __future__ import annotations

import csv
import gc
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddguide.core.errors import UserError
from ddguide.shapes import dataset as shapes
from ddguide.shapes import oracles
from ddguide.shapes.dataset import ShapesConfig


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_generate_is_byte_identical_across_runs(tmp_path):
    cfg = ShapesConfig(n=20, seed=3)
    first = _files(shapes.generate(tmp_path / "a", cfg))
    second = _files(shapes.generate(tmp_path / "b", cfg))
    assert first == second
    assert not [name for name in first if Path(name).name.startswith(".tmp")]


def test_splits_and_seeds_give_different_images():
    base = ShapesConfig(n=10)
    for other in (ShapesConfig(n=10, split="val"), ShapesConfig(n=10, split="test"), ShapesConfig(n=10, seed=1)):
        same = [np.array_equal(shapes.sample(base, i)[0], shapes.sample(other, i)[0]) for i in range(10)]
        assert not any(same)


def test_layout_tables_and_files_agree(tmp_path):
    out = shapes.generate(tmp_path / "data", ShapesConfig(n=40, seed=1))
    index_header, index = _read_csv(out / "index.csv")
    attr_header, attrs = _read_csv(out / "attributes.csv")
    assert index_header[:2] == ["file", "class"] and "seed" in index_header
    assert attr_header == ["file", *shapes.ATTRIBUTES]
    assert [row["file"] for row in index] == [row["file"] for row in attrs]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["class_names"] == list(shapes.CLASS_NAMES) and meta["attributes"] == list(shapes.ATTRIBUTES)
    assert meta["mask_classes"] == {str(i): name for i, name in enumerate(shapes.MASK_CLASSES)}
    assert len({Path(row["file"]).stem for row in index}) == 40
    for i, row in enumerate(index):
        image_path, mask_path = out / row["file"], out / "masks" / Path(row["file"]).name
        assert row["file"] == f"images/{row['class']}/train_{i:06d}.png"
        assert shapes.CLASS_NAMES[int(row["class_id"])] == row["class"]
        with Image.open(image_path) as im, Image.open(mask_path) as mask:
            assert (im.mode, im.size, mask.mode) == ("RGB", (32, 32), "L")
            expected_image, expected_mask, _ = shapes.sample(ShapesConfig(n=40, seed=1), i)
            assert np.array_equal(np.asarray(im), expected_image)
            assert np.array_equal(np.asarray(mask), expected_mask)
        assert all(attrs[i][name] in ("0", "1") for name in shapes.ATTRIBUTES)


def test_masks_mark_exactly_the_object_pixels():
    palette = np.array(list(shapes.PALETTE.values()))
    for i in range(50):
        image, mask, scene = shapes.sample(ShapesConfig(n=50, seed=2), i)
        is_object = (image[:, :, None] == palette).all(-1).any(-1)
        assert np.array_equal(is_object, mask > 0)
        assert set(np.unique(mask)) - {0} == {o.shape for o in scene.objects}


def test_label_statistics_and_scene_rules():
    cfg = ShapesConfig(n=400, seed=4)
    scenes = [shapes.sample_scene(cfg, i) for i in range(cfg.n)]
    classes = np.bincount([shapes.scene_class(s) for s in scenes], minlength=len(shapes.CLASS_NAMES))
    assert len(shapes.CLASS_NAMES) >= 10 and classes.min() == classes.max() == cfg.n // len(shapes.CLASS_NAMES)
    for name in shapes.ATTRIBUTES:
        rate = np.mean([shapes.scene_attributes(s, cfg.size)[name] for s in scenes])
        assert 0.25 <= rate <= 0.6, (name, rate)
    lim = shapes.size_limits(cfg.size)
    for s in scenes:
        main, *others = s.objects
        assert 1 <= len(s.objects) <= 3 and lim.main_min <= main.side <= lim.main_max
        assert all(lim.other_min <= o.side <= main.side - lim.margin for o in others)
        assert all(shapes._gap_ok(a, b) for k, a in enumerate(s.objects) for b in s.objects[k + 1:])
        assert all(1 <= o.y and o.y + o.side <= cfg.size - 1 for o in s.objects)


def test_shape_templates_fill_their_box():
    for shape in range(1, len(shapes.MASK_CLASSES)):
        for side in (7, 8, 16):
            mask = shapes.shape_mask(shape, side)
            assert mask.any(0).all() and mask.any(1).all()


def test_shapes_stay_apart_at_every_side_the_generator_draws():
    # a perfectly drawn object must lead the next shape's template by twice the oracle's margin, so one wrong
    # pixel on its edge cannot make it ambiguous (circles drawn 0.3 px inside their box overlapped diamonds
    # by IoU 0.91 at 8 px)
    for size in (24, 32):
        lim = shapes.size_limits(size)
        for side in range(lim.other_min, lim.main_max + 1):
            masks = [shapes.shape_mask(k, side) for k in range(1, len(shapes.MASK_CLASSES))]
            for i, a in enumerate(masks):
                for b in masks[i + 1:]:
                    assert (a & b).sum() / (a | b).sum() <= 1 - 2 * oracles.MIN_IOU_LEAD, (size, side)


def _peak_memory(out: Path, n: int) -> int:
    """Peak traced allocation while writing n images; the lower of two runs, so that garbage left by earlier
    tests or a stray allocation on another thread does not count."""
    peaks = []
    for attempt in range(2):
        gc.collect()
        tracemalloc.start()
        shapes.generate(out / str(attempt), ShapesConfig(n=n))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return min(peaks)


def test_memory_does_not_grow_with_n(tmp_path):
    _peak_memory(tmp_path / "warm", 5)  # caches (templates, imports) filled before measuring
    # from ~100 images on the peak is the largest single image's temporaries (408-412 kB measured for 100-800);
    # at 50 it sits ~20 kB lower, so a 50-image baseline left a bound of 24 kB with no margin
    small, large = _peak_memory(tmp_path / "small", 100), _peak_memory(tmp_path / "large", 600)
    assert large < small + 24 * 1024, (small, large)  # keeping one row per image would add ~70 kB


def test_progress_reports_every_image(tmp_path):
    calls = []
    shapes.generate(tmp_path / "p", ShapesConfig(n=5), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


@pytest.mark.parametrize("cfg", [ShapesConfig(n=0), ShapesConfig(n=5, size=8), ShapesConfig(n=5, size=36),
                                 ShapesConfig(n=5, split="dev"), ShapesConfig(n=5, seed=-1)])
def test_bad_arguments_are_refused(tmp_path, cfg):
    with pytest.raises(UserError):
        shapes.generate(tmp_path / "x", cfg)


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        shapes.generate(tmp_path, ShapesConfig(n=1))
