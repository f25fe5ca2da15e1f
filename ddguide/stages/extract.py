"""`ddguide extract`: denoiser features of an image folder, written as a ``features`` artifact.

Features are stored at native resolution (never upsampled on disk) and streamed batch by batch, so peak memory
is one batch; a shard (torchrun or ``--shard i/n``) writes a part and the parts are joined into the artifact one
process writes. The features themselves (what a tap is, how T_f noise is drawn) are
:mod:`ddguide.method.features`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ddguide.core import artifacts
from ddguide.core.data import (
    attribute_labels,
    folder_classes,
    labelled_files,
    list_images,
    load_image,
    paired_masks,
    to_tensor,
)
from ddguide.core.defaults import DEFAULT_TIMESTEPS
from ddguide.core.errors import UserError
from ddguide.core.model import load_model
from ddguide.core.outputs import join_when_complete
from ddguide.core.runtime import Shard, autocast, barrier, part_path, resolve_device, resolve_shard, store_for_autocast
from ddguide.method.features import FeatureSpec, compute


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
    shard: str | None = None  # "i/n": this process extracts the i-th of n consecutive slices of the images


def image_list_hash(files: Sequence[Path], root: str | Path) -> str:
    """Hash of the relative paths and sizes of the images, so a head can tell which data it saw."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.fsencode(f.relative_to(root).as_posix()) + f":{f.stat().st_size}\n".encode())  # any name
    return h.hexdigest()[:16]


def _labels(cfg: ExtractConfig, files: list[Path], size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-image targets: an attribute column, paired masks, or the class sub-folder."""
    root = Path(cfg.data)
    if (cfg.labels or cfg.label) and cfg.masks:
        raise UserError("--labels/--label and --masks make two kinds of head: extract once for each")
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
    classes = folder_classes(files, root)
    if classes is None:
        return {}, {"label": None}
    labels, names = classes
    return {"labels": torch.tensor(labels, dtype=torch.long)}, {"label": "class", "classes": names}


def extract(cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a ``features`` artifact: taps per (block, T_f) at native resolution, the images and their targets.

    A shard writes its part and returns its path, or ``cfg.out`` once it joined every part."""
    if cfg.batch < 1:
        raise UserError("--batch must be >= 1")
    if cfg.storage not in ("fp32", "fp16"):
        raise UserError(f"unknown storage {cfg.storage!r} (fp32, fp16)")
    shard = resolve_shard(cfg.shard)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device)
    # No gradients here: weights that required them would each leave a bf16 copy in autocast's cache for the
    # whole pass (1.1 GB at the ffhq layout).
    model.requires_grad_(False)
    store_for_autocast(model, cfg.precision, device)  # the same features; half the weights' memory under bf16
    spec = FeatureSpec(tuple(cfg.blocks) or model.net.default_taps(), tuple(cfg.timesteps), cfg.noise, cfg.seed)
    spec.check(model)
    files = list_images(cfg.data)
    if cfg.labels:  # a label table may name a subset of the folder: those images are extracted
        files = labelled_files(files, cfg.data, cfg.labels)
    size, n = model.image_size, len(files)
    targets, label_info = _labels(cfg, files, size)

    # a shard (torchrun or --shard) extracts a consecutive slice of the images into a part; the parts are joined
    lo, hi = shard.bounds(n)
    dtype = torch.float16 if cfg.storage == "fp16" else torch.float32
    channels = model.net.cfg.in_channels  # a 1-channel model reads and stores grey images
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"images": ((hi - lo, size, size, channels),
                                                                         torch.uint8)}
    for t in spec.timesteps:
        for b in spec.blocks:
            side = size // model.net.block_downsampling(b)
            layout[spec.key(b, t)] = ((hi - lo, model.net.block_channels(b), side, side), dtype)
    layout.update({k: ((hi - lo, *v.shape[1:]), v.dtype) for k, v in targets.items()})
    meta = artifacts.FeaturesMeta(spec=spec.to_dict(), image_size=size, model=model.fingerprint, count=n,
                                  images_hash=image_list_hash(files, cfg.data), storage=cfg.storage, **label_info)
    out = Path(cfg.out) if shard.alone else shard.part(cfg.out)

    with artifacts.StreamingWriter(out, layout, config=meta, fingerprint=model.fingerprint) as writer:
        for k, v in targets.items():
            writer.write(k, 0, v[lo:hi])
        for start in range(lo, hi, cfg.batch):
            batch = np.stack([load_image(f, size, cfg.resize, channels)
                              for f in files[start:min(start + cfg.batch, hi)]])
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
    if shard.alone:
        return out
    return Path(cfg.out) if _join(shard, Path(cfg.out), device) else out


def _join(shard: Shard, out: Path, device: torch.device) -> bool:
    """torchrun: every rank waits for the others' parts and rank 0 joins them. ``--shard``: whichever shard
    finds every part present joins them. Whether ``out`` now holds every part."""
    if not shard.linked:
        return join_when_complete(out, shard.parts(out), lambda: join_features(out, shard.world))
    barrier(device)
    if shard.rank == 0:
        join_features(out, shard.world)
    barrier(device)  # every rank returns once the joined artifact exists
    return True


def join_features(out: str | Path, world: int) -> Path:
    """Join the ``world`` parts of ``out`` (each a consecutive slice of the images, with one config) into the
    artifact one process writes, tensor by tensor, and remove the parts."""
    parts = [part_path(out, r, world) for r in range(world)]
    first = artifacts.describe(parts[0], "features")
    for part in parts[1:]:
        other = artifacts.describe(part, "features")
        if (other.config, other.fingerprint) != (first.config, first.fingerprint):
            raise UserError(f"{part} and {parts[0]} come from different extract runs (other options, images or "
                            "model); rerun every shard with the same options")
    artifacts.join_row_parts(out, parts, kind="features", config=first.config, fingerprint=first.fingerprint)
    for part in parts:
        part.unlink(missing_ok=True)
    return Path(out)
