"""`ddguide sample`: images from a model, written as PNGs with an index and a grid.

Image k is drawn with generator ``seed + k`` (see ``sampling.py``), so any batch size or split of the work gives
the same images. The index (``index.csv``) has one row per image: file, index, seed and whatever the denoiser
wrapper reports for that image (class, guidance, head probability).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ddguide import artifacts
from ddguide.data import to_uint8
from ddguide.diffusion import space_timesteps
from ddguide.errors import UserError
from ddguide.models import Model, autocast, load_model, process_shard, resolve_device
from ddguide.outputs import samples_folder, staged_folder
from ddguide.sampling import Denoiser, image_generators, per_image_randn, sample_ddim, sample_ddpm

INDEX = "index.csv"
SAMPLERS = ("ddim", "ddpm")


@dataclass
class SampleConfig:
    out: str
    model: str | None = None
    n: int = 16
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    batch: int = 16
    device: str = "auto"
    precision: str = "fp32"
    start: int = 0  # first image index

    def validate(self) -> None:
        if self.n < 1 or self.batch < 1 or self.steps < 1:
            raise UserError("--num-images, --batch and --steps must be >= 1")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"--eta must be in [0, 1], got {self.eta}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r} ({', '.join(PRECISIONS)})")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_finite_images(x: torch.Tensor, indices: Sequence[int]) -> None:
    """A sampling step that gave NaN or inf stops the run (before any of its images is written)."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"sampling gave NaN or infinite values (images {indices[0]}..{indices[-1]}): the guidance "
                        "scale (--lambda, --cfg or a --guide weight) is likely too large, or the model's or a head's "
                        "weights are broken; no image was written")


def timesteps_for(model: Model, steps: int, sampler: str) -> list[int]:
    """Kept timesteps: DDIM uses guided-diffusion's integer stride when it fits, else the fractional spacing."""
    total = model.diffusion.steps
    if steps > total:
        raise UserError(f"--steps {steps} exceeds the model's {total} diffusion steps")
    if sampler == "ddim":
        try:
            return space_timesteps(total, f"ddim{steps}")
        except UserError:
            pass
    return space_timesteps(total, str(steps))


def draw(model: Model, denoiser: Denoiser, indices: Sequence[int], seed: int, steps: Sequence[int],
         sampler: str = "ddim", eta: float = 0.0, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Sample the images with the given indices; returns float (N, 3, H, W) in [-1, 1]."""
    gens = image_generators(seed, indices)
    size = model.image_size
    x = per_image_randn((model.net.cfg.in_channels, size, size), gens, model.device)
    if sampler == "ddim":
        return sample_ddim(denoiser, x, steps, model.abar, eta=eta, generators=gens, callback=callback)
    return sample_ddpm(denoiser, x, steps, model.abar, generators=gens, callback=callback)


def plain_denoiser(model: Model, device: torch.device, precision: str) -> Denoiser:
    """The model as a denoiser without gradients, under the requested autocast."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            return model(x, t).float()
    return denoise


def write_png(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    artifacts.atomic_write_bytes(path, buf.getvalue())


def write_grid(path: Path, images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2) -> None:
    """Images (H, W, 3) uint8 tiled row-major on a white background."""
    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images[0].shape[:2]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
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


def read_index(folder: str | Path, name: str = INDEX) -> list[dict[str, str]]:
    path = Path(folder) / name
    if not path.is_file():
        raise UserError(f"{folder}: no {INDEX} (not a ddguide samples folder)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Plan:
    """How to sample beyond the plain model: ``denoiser_for(model, indices)`` wraps the model for one batch
    (guidance, CFG; per-image classes or targets), ``row_info(model, images, indices)`` adds index columns
    (class, head probability) and ``check(model)`` refuses bad combinations before anything is written."""

    denoiser_for: Callable[[Model, Sequence[int]], Denoiser]
    row_info: Callable[[Model, torch.Tensor, Sequence[int]], list[dict[str, Any]]] | None = None
    check: Callable[[Model], None] | None = None


def generate(cfg: SampleConfig, plan: Plan | None = None,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Sample ``cfg.n`` images into ``cfg.out`` (PNGs, index.csv, grid.png)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device).requires_grad_(False)  # guidance needs input gradients only
    if plan is None:
        plain = plain_denoiser(model, device, cfg.precision)
        plan = Plan(lambda _model, _indices: plain)
    if plan.check:
        plan.check(model)
    steps = timesteps_for(model, cfg.steps, cfg.sampler)
    rank, world = process_shard()
    mine = list(range(cfg.start, cfg.start + cfg.n))[rank::world]  # image k is the same on any shard
    rows, kept = [], []
    total = len(mine) * len(steps)
    # staged: the folder appears (or replaces an earlier samples folder) only once every image and the index are
    # written; torchrun shards write in place and the last one to finish joins the index
    with staged_folder(cfg.out, "samples", own=samples_folder, in_place=world > 1) as out:
        for first in range(0, len(mine), cfg.batch):
            indices = mine[first:first + cfg.batch]
            cb = (lambda i, _k, d=first * len(steps), b=len(indices): progress(d + i * b, total)) if progress else None
            x = draw(model, plan.denoiser_for(model, indices), indices, cfg.seed, steps, cfg.sampler, cfg.eta, cb)
            check_finite_images(x, indices)
            extra = plan.row_info(model, x, indices) if plan.row_info else [{} for _ in indices]
            for k, image, more in zip(indices, to_uint8(x), extra):
                name = f"{k:06d}.png"
                write_png(out / name, image)
                rows.append({"file": name, "index": k, "seed": cfg.seed + k, **more})
                if len(kept) < 64:
                    kept.append(image)
        if world == 1:
            write_index(out, rows)
            write_grid(out / "grid.png", kept)
        else:
            write_index(out, rows, name=f"index.part{rank}of{world}.csv")
            merge_shards(out, world)
    return Path(cfg.out)


def merge_shards(out: Path, world: int) -> bool:
    """Once every shard has written its part, join the parts into index.csv and draw the grid. Any shard may
    do it (the result is the same, and writes are atomic), so no barrier between processes is needed."""
    parts = [out / f"index.part{r}of{world}.csv" for r in range(world)]
    if not all(p.is_file() for p in parts):
        return False
    rows = sorted((row for p in parts for row in read_index(out, p.name)), key=lambda r: int(r["index"]))
    write_index(out, rows)
    images = [np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in rows[:64]]
    write_grid(out / "grid.png", images)
    return True
