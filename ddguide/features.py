"""Denoiser features: the unconditional U-Net's own intermediate blocks at feature timesteps T_f.

The same network that denoises is run on an image with time embedding T_f and read at named blocks (paper §4.1).
``noise='none'`` feeds the clean image, as the paper's official code does; ``noise='fixed'`` first draws
``x_{T_f} ~ q(x_{T_f} | x0)`` with one fixed generator per image (Baranchuk et al.). All timesteps run as one
batched pass and the pass stops after the deepest tapped block.

``extract`` streams features to disk at native resolution (never upsampled there): peak memory is one batch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ddguide import artifacts
from ddguide.data import attribute_labels, list_images, load_image, paired_masks, to_tensor
from ddguide.defaults import DEFAULT_TIMESTEPS
from ddguide.diffusion import q_sample
from ddguide.errors import UserError
from ddguide.models import (Model, autocast, barrier, is_main_process, load_model, process_shard, resolve_device,
                            shard_bounds)
from ddguide.sampling import image_generators, per_image_randn

NOISE_MODES = ("none", "fixed")


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a head reads: blocks x timesteps, the noise mode and its seed."""

    blocks: tuple[str, ...]
    timesteps: tuple[int, ...]
    noise: str = "none"
    seed: int = 0

    @staticmethod
    def key(block: str, t: int) -> str:
        return f"feat.{block}@{t}"

    def keys(self) -> list[str]:
        return [self.key(b, t) for t in self.timesteps for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "feature spec") -> "FeatureSpec":
        artifacts.check_fields(cls, d, where)
        if not d["blocks"] or not d["timesteps"] or any(t < 0 for t in d["timesteps"]):
            raise UserError(f"{where}: needs blocks and non-negative timesteps")
        return cls(tuple(d["blocks"]), tuple(int(t) for t in d["timesteps"]), d.get("noise", "none"),
                   int(d.get("seed", 0)))

    def check(self, model: Model) -> None:
        if not self.blocks or not self.timesteps:
            raise UserError("give at least one block and one timestep")
        model.net.check_blocks(self.blocks)
        for t in self.timesteps:
            if not 0 <= t < model.diffusion.steps:
                raise UserError(f"feature timestep {t} is outside the model's 0..{model.diffusion.steps - 1}")
        if self.noise not in NOISE_MODES:
            raise UserError(f"unknown noise mode {self.noise!r} (choose from {', '.join(NOISE_MODES)})")


def compute(model: Model, x: torch.Tensor, spec: FeatureSpec, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Features of images ``x`` (N, 3, H, W) in [-1, 1] as ``{key: (N, C, h, w)}``, all timesteps in one pass.

    Differentiable in ``x`` (guidance backpropagates through it); ``indices`` seed the fixed noise.
    """
    n, steps = len(x), len(spec.timesteps)
    xs = x.repeat(steps, 1, 1, 1)  # (T*N, 3, H, W), timestep-major
    t = torch.tensor(spec.timesteps, device=x.device).repeat_interleave(n)  # (T*N,)
    if spec.noise == "fixed":
        gens = image_generators(spec.seed, indices)
        noise = per_image_randn(x.shape[1:], gens, x.device, x.dtype)  # the same draw at every T_f
        xs = q_sample(xs, t, noise.repeat(steps, 1, 1, 1), model.abar)
    taps = model.features(xs, t, spec.blocks)
    return {spec.key(b, tf): taps[b][i * n:(i + 1) * n] for i, tf in enumerate(spec.timesteps) for b in spec.blocks}


@dataclass
class ExtractConfig:
    data: str
    out: str
    model: str | None = None
    blocks: tuple[str, ...] = ()  # () = the model's default taps (UNetModel.default_taps)
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    noise: str = "none"
    seed: int = 0
    labels: str | None = None  # attribute table (CSV or list_attr_celeba.txt)
    label: str | None = None  # its column
    masks: str | None = None  # folder of PNG / .npy masks paired by stem
    batch: int = 16
    storage: str = "fp32"
    device: str = "auto"
    precision: str = "fp32"
    resize: str = "refuse"


def image_list_hash(files: Sequence[Path], root: str | Path) -> str:
    """Hash of the relative paths and sizes of the images, so a head can tell which data it saw."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.fsencode(f.relative_to(root).as_posix()) + f":{f.stat().st_size}\n".encode())  # any name
    return h.hexdigest()[:16]


def _labels(cfg: ExtractConfig, files: list[Path], size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-image targets: an attribute column, paired masks, or the class sub-folder."""
    root = Path(cfg.data)
    if cfg.labels or cfg.label:
        if not (cfg.labels and cfg.label):
            raise UserError("--labels and --label go together (the file and the attribute column)")
        return {"labels": attribute_labels(files, root, cfg.labels, cfg.label)}, {"label": cfg.label,
                                                                                    "classes": ["0", "1"]}
    if cfg.masks:
        masks = paired_masks(files, cfg.masks, size)
        if masks.min() < 0 or masks.max() > 255:
            raise UserError(f"{cfg.masks}: mask ids must be in 0..255")
        return {"masks": masks.to(torch.uint8)}, {"label": "mask", "mask_classes": int(masks.max()) + 1}
    parents = sorted({f.parent for f in files})
    if len(parents) > 1 and all(p.parent == parents[0].parent for p in parents):  # class sub-folders
        names = [p.name for p in parents]
        labels = torch.tensor([names.index(f.parent.name) for f in files], dtype=torch.long)
        return {"labels": labels}, {"label": "class", "classes": names}
    return {}, {"label": None}


def extract(cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a ``features`` artifact: taps per (block, T_f) at native resolution, the images and their targets."""
    if cfg.batch < 1:
        raise UserError("--batch must be >= 1")
    if cfg.storage not in ("fp32", "fp16"):
        raise UserError(f"unknown storage {cfg.storage!r} (fp32, fp16)")
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device)
    # No gradients here: weights that required them would each leave a bf16 copy in autocast's cache for the
    # whole pass (1.1 GB at the ffhq layout).
    model.requires_grad_(False)
    spec = FeatureSpec(tuple(cfg.blocks) or model.net.default_taps(), tuple(cfg.timesteps), cfg.noise, cfg.seed)
    spec.check(model)
    files = list_images(cfg.data)
    size, n = model.image_size, len(files)
    targets, label_info = _labels(cfg, files, size)

    # under torchrun each rank extracts a consecutive slice of the images into a part; rank 0 joins the parts
    rank, world = process_shard()
    lo, hi = shard_bounds(n)
    dtype = torch.float16 if cfg.storage == "fp16" else torch.float32
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"images": ((hi - lo, size, size, 3), torch.uint8)}
    for t in spec.timesteps:
        for b in spec.blocks:
            side = size // model.net.block_downsampling(b)
            layout[spec.key(b, t)] = ((hi - lo, model.net.block_channels(b), side, side), dtype)
    layout.update({k: ((hi - lo, *v.shape[1:]), v.dtype) for k, v in targets.items()})
    meta = artifacts.FeaturesMeta(spec=spec.to_dict(), image_size=size, model=model.fingerprint, count=n,
                                  images_hash=image_list_hash(files, cfg.data), storage=cfg.storage, **label_info)
    out = Path(cfg.out) if world == 1 else _part_path(cfg.out, rank, world)

    with artifacts.StreamingWriter(out, layout, config=meta, fingerprint=model.fingerprint) as writer:
        for k, v in targets.items():
            writer.write(k, 0, v[lo:hi])
        for start in range(lo, hi, cfg.batch):
            batch = np.stack([load_image(f, size, cfg.resize) for f in files[start:min(start + cfg.batch, hi)]])
            x = to_tensor(batch).to(device)
            with torch.no_grad(), autocast(device, cfg.precision):
                feats = compute(model, x, spec, range(start, start + len(batch)))  # noise follows the image index
            for key, value in feats.items():
                if not torch.isfinite(value).all():
                    raise UserError(f"non-finite values in features {key}: the model or the images are broken")
                writer.write(key, start - lo, value.float())
            writer.write("images", start - lo, torch.from_numpy(batch))
            if progress:
                progress(start - lo + len(batch), hi - lo)
    if world > 1:
        _join_parts(cfg.out, world, meta, model.fingerprint, device)
    return Path(cfg.out)


def _part_path(out: str | Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.part{rank}of{world}{out.suffix}")


def _join_parts(out: str | Path, world: int, meta: artifacts.FeaturesMeta, fingerprint: str,
                device: torch.device) -> None:
    """Every rank waits for the others' parts; rank 0 joins them into ``out`` and removes them."""
    barrier(device)
    if is_main_process():
        parts = [_part_path(out, r, world) for r in range(world)]
        artifacts.join_row_parts(out, parts, config=meta, fingerprint=fingerprint)
        for part in parts:
            part.unlink()
    barrier(device)  # every rank returns once the joined artifact exists


@dataclass
class Features:
    """A loaded features artifact."""

    spec: FeatureSpec
    taps: dict[str, torch.Tensor]
    images: torch.Tensor  # uint8 (N, H, W, 3)
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    meta: artifacts.FeaturesMeta
    fingerprint: str
    path: Path


def load_features(path: str | Path) -> Features:
    """Load a features artifact after checking its contract (:func:`check_features`)."""
    art = artifacts.load(path, "features")
    meta, spec = check_features(art)
    taps = {k: v.float() for k, v in art.tensors.items() if k.startswith("feat.")}
    return Features(spec, taps, art.tensors["images"], art.tensors.get("labels"),
                    art.tensors["masks"].long() if "masks" in art.tensors else None, meta,
                    art.fingerprint, Path(path))


def check_features(art: artifacts.Artifact) -> tuple[artifacts.FeaturesMeta, FeatureSpec]:
    """A features artifact's contract: its typed config and spec, every tap of the spec, one row per image in
    every tensor, uint8 (N, H, W, 3) images, labels and mask ids that are whole numbers >= 0."""
    path, t = art.path, art.tensors
    meta = artifacts.FeaturesMeta.from_metadata(art.config, path)
    spec = FeatureSpec.from_dict(meta.spec, where=f"{path}: feature spec")
    images = t.get("images")
    size = meta.image_size
    if images is None or images.dtype != torch.uint8 or tuple(images.shape[1:]) != (size, size, 3):
        raise UserError(f"{path}: features artifact without uint8 images of {size}x{size}")
    n = len(images)
    missing = [k for k in spec.keys() if k not in t]
    if missing:
        raise UserError(f"{path}: lacks the taps {', '.join(missing[:3])} its spec names")
    for key, value in t.items():
        if value.ndim == 0 or len(value) != n:
            raise UserError(f"{path}: tensor {key} has {len(value) if value.ndim else 0} rows for {n} images")
    for key in ("labels", "masks"):
        if key in t and (t[key].is_floating_point() or (t[key].numel() and int(t[key].min()) < 0)):
            raise UserError(f"{path}: {key} must be whole numbers >= 0")
    return meta, spec
