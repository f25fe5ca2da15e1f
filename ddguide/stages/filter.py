"""`ddguide filter DIR --head H --threshold T --out KEPT`: the samples of a folder that a rejection head accepts
(paper §5.3; the head and its threshold are in ``rejection.py``, which ``sample --reject`` uses inside its loop)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ddguide.core.data import load_image
from ddguide.core.errors import UserError
from ddguide.core.outputs import staged_folder
from ddguide.core.runtime import Shard, all_gather, autocast, barrier, resolve_device, resolve_shard
from ddguide.core.samples import (
    GRID,
    GRID_IMAGES,
    SampleRow,
    merge_shards,
    part_name,
    read_samples,
    read_shown,
    write_grid,
    write_index,
)
from ddguide.method.rejection import Rejector, check_threshold

Progress = Callable[[int, int], None]


@dataclass
class FilterResult:
    kept: int
    total: int
    per_class: dict[str, tuple[int, int]]  # class -> (kept, seen)
    joined: bool = True  # with --shard: whether index.csv now covers every shard's rows


@dataclass
class FilterConfig:
    folder: str
    head: str
    out: str
    threshold: float = 0.2
    model: str | None = None  # the unconditional model the head was trained on
    batch: int = 64
    device: str = "auto"
    precision: str = "fp32"  # of the model and head (ddguide.core.runtime.autocast)
    shard: str | None = None  # "i/n": this process filters the i-th of n consecutive slices of the rows


def filter_folder(cfg: FilterConfig, progress: Progress | None = None) -> FilterResult:
    """Copy the samples of a folder (with an index.csv holding a class column) that the head accepts; with
    ``--shard`` only those of this shard's rows (its result counts them), joined once every shard is done."""
    check_threshold(cfg.threshold)
    shard = resolve_shard(cfg.shard)
    folder, out = Path(cfg.folder), Path(cfg.out)
    samples = read_samples(folder, require=("class",))  # every file inside the folder, and there
    rows, files = [r.values for r in samples], [r.path for r in samples]
    device = resolve_device(cfg.device)
    rejector = Rejector.load(cfg.head, cfg.model, device)
    targets = [rejector.class_index(r["class"]) for r in rows]

    # a shard scores a consecutive slice of the rows; under torchrun every rank then sees all probabilities
    lo, hi = shard.bounds(len(rows))
    probs: list[float] = []
    for start in range(lo, hi, cfg.batch):
        chunk = rows[start:min(start + cfg.batch, hi)]
        images = np.stack([load_image(f, channels=rejector.channels) for f in files[start:start + len(chunk)]])
        with autocast(device, cfg.precision):
            probs += rejector.probabilities(images, targets[start:start + len(chunk)],
                                            [r.number(start + i)
                                             for i, r in enumerate(samples[start:start + len(chunk)])]).tolist()
        if progress:
            progress(start - lo + len(chunk), hi - lo)
    if not shard.linked and not shard.alone:
        return _filter_part(cfg, shard, samples[lo:hi], probs)
    probs = [p for part in all_gather(probs, device) for p in part]

    keep = [r | {"reject_prob": round(p, 4)} for r, p in zip(rows, probs) if p >= cfg.threshold]
    if not keep:
        raise UserError(f"no sample reaches p >= {cfg.threshold}; nothing written (highest p {max(probs):.3f})")
    with staged_folder(out, "output", in_place=shard.linked) as stage:
        for i in range(lo, hi):  # each rank copies the accepted images of its own slice
            if probs[i] >= cfg.threshold:
                target = stage / files[i].relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(files[i], target)
        barrier(device)
        if shard.rank == 0:
            write_index(stage, keep)
            write_grid(stage / GRID, [read_shown(stage / r["file"]) for r in keep[:GRID_IMAGES]])
        barrier(device)  # every rank returns once the index exists
    return FilterResult(len(keep), len(rows), _per_class(rows, probs, cfg.threshold))


def _filter_part(cfg: FilterConfig, shard: Shard, samples: list[SampleRow], probs: list[float]) -> FilterResult:
    """``--shard``: copy this shard's accepted images into the output, write its rows as an index part, and
    join the parts once every shard has written its own (the last to finish does it)."""
    folder, out = Path(cfg.folder), Path(cfg.out)
    keep = [s.values | {"reject_prob": round(p, 4)} for s, p in zip(samples, probs) if p >= cfg.threshold]
    with staged_folder(out, "output", in_place=True) as stage:
        for s, p in zip(samples, probs):
            if p >= cfg.threshold:
                target = stage / s.path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(s.path, target)
        write_index(stage, keep, name=part_name(shard.rank, shard.world))
        joined = merge_shards(stage, shard.world)
    rows = [s.values for s in samples]
    return FilterResult(len(keep), len(rows), _per_class(rows, probs, cfg.threshold), joined)


def _per_class(rows: list[dict[str, str]], probs: list[float], threshold: float) -> dict[str, tuple[int, int]]:
    per_class: dict[str, tuple[int, int]] = {}
    for r, p in zip(rows, probs):
        kept, seen = per_class.get(r["class"], (0, 0))
        per_class[r["class"]] = (kept + (p >= threshold), seen + 1)
    return per_class
