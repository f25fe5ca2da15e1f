"""Denoiser features: the unconditional U-Net's own intermediate blocks at feature timesteps T_f.

The same network that denoises is run on an image with time embedding T_f and read at named blocks (paper §4.1).
``noise='none'`` feeds the clean image, as the paper's official code does; ``noise='fixed'`` first draws
``x_{T_f} ~ q(x_{T_f} | x0)`` with one fixed generator per image (Baranchuk et al.). All timesteps run as one
batched pass and the pass stops after the deepest tapped block.

``ddguide extract`` (:mod:`ddguide.stages.extract`) streams them to disk at native resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ddguide.core import artifacts
from ddguide.core.diffusion import q_sample
from ddguide.core.errors import UserError
from ddguide.core.model import Model
from ddguide.core.sampling import image_generators, per_image_randn

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
    """Features of images ``x`` (N, C, H, W) in [-1, 1] as ``{key: (N, C, h, w)}``, all timesteps in one pass.

    Differentiable in ``x`` (guidance backpropagates through it); ``indices`` seed the fixed noise.
    """
    n, steps = len(x), len(spec.timesteps)
    xs = x.repeat(steps, 1, 1, 1)  # (T*N, C, H, W), timestep-major
    t = torch.tensor(spec.timesteps, device=x.device).repeat_interleave(n)  # (T*N,)
    if spec.noise == "fixed":
        gens = image_generators(spec.seed, indices)
        noise = per_image_randn(x.shape[1:], gens, x.device, x.dtype)  # the same draw at every T_f
        xs = q_sample(xs, t, noise.repeat(steps, 1, 1, 1), model.abar)
    taps = model.features(xs, t, spec.blocks)
    return {spec.key(b, tf): taps[b][i * n:(i + 1) * n] for i, tf in enumerate(spec.timesteps) for b in spec.blocks}


@dataclass
class Features:
    """A loaded features artifact."""

    spec: FeatureSpec
    taps: dict[str, torch.Tensor]
    images: torch.Tensor  # uint8 (N, H, W, C): C = 3, or 1 for a grey model
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
    every tensor, uint8 (N, H, W, C) images (C = 1 or 3), labels and mask ids that are whole numbers >= 0."""
    path, t = art.path, art.tensors
    meta = artifacts.FeaturesMeta.from_metadata(art.config, path)
    spec = FeatureSpec.from_dict(meta.spec, where=f"{path}: feature spec")
    images = t.get("images")
    size = meta.image_size
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:3]) != (size, size) \
            or images.shape[3] not in (1, 3):
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
