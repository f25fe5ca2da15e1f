"""Rejection sampling with a head on the *unconditional* model's features (paper §5.3).

A sample of class c is kept when the rejection head gives p(c) >= threshold (paper: 0.2). The head reads ``mid``
taps at T_f = 300 and 800, concatenated and L2-normalised over channels — the same ``Head.inputs`` is used in
training and here (the reference code normalised in training but not when filtering).

- :func:`filter_folder` — ``ddguide filter DIR --head H --threshold T --out KEPT``.
- :func:`sample_with_rejection` — ``ddguide sample --class all --reject H --threshold T -n N``: draws until N
  images of each class are accepted and reports the acceptance rate per class.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ddguide.data import inside, load_image, to_tensor, to_uint8
from ddguide.errors import UserError
from ddguide.features import compute
from ddguide.generate import (SampleConfig, check_finite_images, draw, read_index, timesteps_for, write_grid,
                              write_index, write_png)
from ddguide.guidance import class_labels, classifier_free, conditional
from ddguide.heads import Head, check_compatible, load_head
from ddguide.models import (Model, all_gather, barrier, is_main_process, load_model, process_shard, resolve_device,
                            shard_bounds)
from ddguide.outputs import samples_folder, staged_folder

Progress = Callable[[int, int], None]


@dataclass
class Rejector:
    """The rejection head together with the unconditional model whose features it reads."""

    head: Head
    model: Model

    @classmethod
    def load(cls, head_path: str, model_path: str | None, device: torch.device) -> "Rejector":
        head = load_head(head_path, device)
        if head.reads_pixels or head.cfg.dense:
            raise UserError(f"{head_path}: a {head.cfg.kind} head cannot filter; train one with --kind rejection")
        model = load_model(model_path, device).requires_grad_(False)
        check_compatible(head, model.fingerprint, model_path)
        return cls(head, model)

    def class_index(self, name: str) -> int:
        if name not in self.head.cfg.classes:
            raise UserError(f"class {name!r} is not among the rejection head's classes "
                            f"({', '.join(self.head.cfg.classes)})")
        return self.head.cfg.classes.index(name)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, targets: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
        """p(target) for uint8 images (N, H, W, 3)."""
        size = self.head.cfg.image_size
        if images.shape[1:3] != (size, size):
            raise UserError(f"images are {images.shape[2]}x{images.shape[1]}, the head expects {size}x{size}")
        x = to_tensor(images).to(self.model.device)
        taps = compute(self.model, x, self.head.spec, indices)
        probs = torch.softmax(self.head.calibrated(self.head(self.head.inputs(taps))).float(), dim=1)
        return probs[torch.arange(len(x)), torch.as_tensor(list(targets), device=probs.device)].cpu()


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")


@dataclass
class FilterResult:
    kept: int
    total: int
    per_class: dict[str, tuple[int, int]]  # class -> (kept, seen)


@dataclass
class FilterConfig:
    folder: str
    head: str
    out: str
    threshold: float = 0.2
    model: str | None = None  # the unconditional model the head was trained on
    batch: int = 64
    device: str = "auto"


def filter_folder(cfg: FilterConfig, progress: Progress | None = None) -> FilterResult:
    """Copy the samples of a folder (with an index.csv holding a class column) that the head accepts."""
    check_threshold(cfg.threshold)
    folder, out = Path(cfg.folder), Path(cfg.out)
    rows = read_index(folder)
    if not rows or "class" not in rows[0]:
        raise UserError(f"{folder / 'index.csv'}: needs a 'class' column (samples from `sample --class`)")
    files = [inside(folder, r.get("file") or "", folder / "index.csv") for r in rows]  # never outside the folder
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder / 'index.csv'}: lists {len(missing)} missing file(s), e.g. {missing[0]}")
    device = resolve_device(cfg.device)
    rejector = Rejector.load(cfg.head, cfg.model, device)
    targets = [rejector.class_index(r["class"]) for r in rows]

    # under torchrun each rank scores a consecutive slice of the rows; every rank then sees all probabilities
    lo, hi = shard_bounds(len(rows))
    probs: list[float] = []
    for start in range(lo, hi, cfg.batch):
        chunk = rows[start:min(start + cfg.batch, hi)]
        images = np.stack([load_image(f) for f in files[start:start + len(chunk)]])
        probs += rejector.probabilities(images, targets[start:start + len(chunk)],
                                        [int(r["index"]) if str(r.get("index", "")).isdigit() else start + i
                                         for i, r in enumerate(chunk)]).tolist()
        if progress:
            progress(start - lo + len(chunk), hi - lo)
    probs = [p for part in all_gather(probs, device) for p in part]

    keep = [r | {"reject_prob": round(p, 4)} for r, p in zip(rows, probs) if p >= cfg.threshold]
    if not keep:
        raise UserError(f"no sample reaches p >= {cfg.threshold}; nothing written (highest p {max(probs):.3f})")
    world = process_shard()[1]
    with staged_folder(out, "output", in_place=world > 1) as stage:
        for i in range(lo, hi):  # each rank copies the accepted images of its own slice
            if probs[i] >= cfg.threshold:
                target = stage / files[i].relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(files[i], target)
        barrier(device)
        if is_main_process():
            write_index(stage, keep)
            write_grid(stage / "grid.png", [load_image(stage / r["file"]) for r in keep[:64]])
        barrier(device)  # every rank returns once the index exists
    per_class: dict[str, tuple[int, int]] = {}
    for r, p in zip(rows, probs):
        kept, seen = per_class.get(r["class"], (0, 0))
        per_class[r["class"]] = (kept + (p >= cfg.threshold), seen + 1)
    return FilterResult(len(keep), len(rows), per_class)


@dataclass
class RejectionSampling:
    """``sample`` options that only rejection sampling has."""

    head: str
    threshold: float = 0.2
    reject_model: str | None = None  # the unconditional model (default: the shipped one)
    classes: list[str] = field(default_factory=lambda: ["all"])
    cfg_scale: float | None = None
    max_draws: int = 50  # per accepted image, before giving up on a class


def sample_with_rejection(cfg: SampleConfig, rs: RejectionSampling, progress: Progress | None = None) -> FilterResult:
    """Draw from a class-conditional model until ``cfg.n`` images of every chosen class are accepted."""
    check_threshold(rs.threshold)
    cfg.validate()
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device).requires_grad_(False)
    rejector = Rejector.load(rs.head, rs.reject_model, device)
    lineage = model.info.get("finetuned_from")
    if lineage and lineage != rejector.model.fingerprint:
        raise UserError(f"{cfg.model} was fine-tuned from model {lineage}, the rejection head reads model "
                        f"{rejector.model.fingerprint}")
    names = model.classes or []
    if not names:
        raise UserError(f"{cfg.model or 'the model'} has no class names: rejection sampling needs a model from "
                        "`ddguide finetune`")
    wanted = names if rs.classes == ["all"] else list(rs.classes)
    label_of = {c: int(class_labels(model, [c], [0])[0]) for c in wanted}
    target_of = {c: rejector.class_index(names[label_of[c]]) for c in wanted}
    steps = timesteps_for(model, cfg.steps, cfg.sampler)
    with staged_folder(cfg.out, "samples", own=samples_folder) as out:
        return _draw_until_accepted(cfg, rs, model, rejector, wanted, label_of, target_of, steps, out, progress)


def _draw_until_accepted(cfg: SampleConfig, rs: RejectionSampling, model: Model, rejector: Rejector,
                         wanted: list[str], label_of: dict, target_of: dict, steps: list[int], out: Path,
                         progress: Progress | None) -> FilterResult:
    accepted: dict[str, int] = {c: 0 for c in wanted}
    seen: dict[str, int] = {c: 0 for c in wanted}
    rows, next_index = [], cfg.start
    while any(accepted[c] < cfg.n for c in wanted):
        todo = [c for c in wanted if accepted[c] < cfg.n and seen[c] < rs.max_draws * cfg.n]
        if not todo:
            low = [c for c in wanted if accepted[c] < cfg.n]
            raise UserError(f"gave up after {rs.max_draws * cfg.n} draws for {', '.join(map(str, low))}: "
                            f"lower --threshold or fine-tune longer")
        batch = [todo[i % len(todo)] for i in range(cfg.batch)]
        indices = list(range(next_index, next_index + len(batch)))
        next_index += len(batch)
        labels = torch.tensor([label_of[c] for c in batch])
        denoiser = (classifier_free(model, labels, rs.cfg_scale, cfg.precision) if rs.cfg_scale
                    else conditional(model, labels, cfg.precision))
        x = draw(model, denoiser, indices, cfg.seed, steps, cfg.sampler, cfg.eta)
        check_finite_images(x, indices)
        images = to_uint8(x)
        probs = rejector.probabilities(images, [target_of[c] for c in batch], indices)
        for k, c, image, p in zip(indices, batch, images, probs.tolist()):
            seen[c] += 1
            if p >= rs.threshold and accepted[c] < cfg.n:
                accepted[c] += 1
                write_png(out / f"{k:06d}.png", image)
                rows.append({"file": f"{k:06d}.png", "index": k, "seed": cfg.seed + k, "class": c,
                             "guidance": f"cfg:{rs.cfg_scale or 0}", "reject_prob": round(p, 4)})
        if progress:
            progress(sum(accepted.values()), cfg.n * len(wanted))
    write_index(out, rows)
    write_grid(out / "grid.png", [load_image(out / r["file"]) for r in rows[:64]])
    return FilterResult(len(rows), sum(seen.values()), {c: (accepted[c], seen[c]) for c in wanted})
