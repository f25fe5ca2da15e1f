"""`ddguide train`: an unconditional epsilon-prediction model from an image folder, resumable after a kill.

The loop, EMA, checkpoints and loss curve are the shared engine (:mod:`ddguide.stages.training`,
:mod:`ddguide.core.checkpoint`); this module is the stage: a preset's network drawn from the seed (or started from a
model artifact), the images of a folder, and the model artifact it writes. Rerunning the same command continues
from the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddguide.core import artifacts
from ddguide.core.checkpoint import checkpoint_path
from ddguide.core.data import list_images, load_image
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.presets import get_preset
from ddguide.core.unet import UNetConfig, UNetModel
from ddguide.stages.training import Progress, Recipe, fit, flat_config, run_identity, setup_device, write_model

TRAIN_RECIPE = Recipe(steps=20000, lr=2e-4, warmup=200)  # `ddguide train`'s defaults


def train_recipe(**overrides: Any) -> Recipe:
    """``train``'s default recipe with ``overrides`` (any :class:`Recipe` field)."""
    return replace(TRAIN_RECIPE, **overrides)


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "shapes32"
    recipe: Recipe = field(default_factory=train_recipe)
    schedule: str | None = None  # None: the preset's schedule
    init: str | None = None  # start from this model artifact's weights (a fresh optimiser)
    resize: str = "refuse"
    threads: int | None = None
    device: str = "auto"
    arch: dict[str, Any] | None = None  # U-Net options replacing the preset's (`train --arch JSON`)

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree with to be resumed: not the device, nor the step count unless the
        learning rate decays over it."""
        keep = ["data", "preset", "batch", "lr", "warmup", "ema_decay", "grad_clip", "schedule", "seed"]
        # `init` joined later: leaving it out when unset keeps older checkpoints resumable
        optional = [k for k in ("init", "arch") if getattr(self, k) is not None]  # joined later: older
        return run_identity(self, keep + optional + self.recipe.optional_keys())  # checkpoints stay resumable


def load_dataset(folder: str, size: int, resize: str) -> torch.Tensor:
    """All training images as uint8 (N, H, W, 3); training sets here are small (10k images = 30 MB)."""
    files = list_images(folder)
    return torch.from_numpy(np.stack([load_image(f, size, resize) for f in files]))


def train(cfg: TrainConfig, progress: Progress | None = None) -> Path:
    """Train (or resume) and write the EMA weights as a ``model`` artifact at ``cfg.out``."""
    cfg.recipe.validate()
    preset = get_preset(cfg.preset)
    unet = architecture(preset.unet, cfg.arch)
    diffusion = DiffusionConfig(preset.diffusion.steps, cfg.schedule or preset.diffusion.schedule,
                                preset.diffusion.rescale_timesteps)
    device = setup_device(cfg.device, cfg.threads)
    net = initial_net(unet, cfg.recipe.seed)
    if cfg.init:
        _warm_start(net, cfg.init)
    ema, state = fit(net.to(device), diffusion, cfg.recipe, checkpoint_path(cfg.out), cfg.identity(),
                     torch.Generator().manual_seed(cfg.recipe.seed),
                     lambda: (load_dataset(cfg.data, unet.image_size, cfg.resize), None), device, progress)
    return write_model(cfg.out, unet, diffusion, ema, state, {"preset": cfg.preset, "train": flat_config(cfg)})


def architecture(base: UNetConfig, arch: dict[str, Any] | None) -> UNetConfig:
    """``base`` with the ``--arch`` options replacing its own, refused in one line when they name unknown fields
    or describe no network (checked on the meta device: nothing is allocated)."""
    if not arch:
        return base
    try:
        cfg = UNetConfig.from_dict({**base.to_dict(), **arch})
    except UserError as e:
        raise UserError(f"--arch: {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"--arch: {e}") from None
    try:
        with torch.device("meta"):
            UNetModel(cfg)
    except UserError as e:
        raise UserError(f"--arch: {e}") from None
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, RuntimeError, KeyError) as e:
        raise UserError(f"--arch does not describe a U-Net ({e.__class__.__name__}: {e})") from None
    return cfg


def initial_net(unet: UNetConfig, seed: int) -> UNetModel:
    """The network drawn from its own seed, so initialisation does not depend on the global generator."""
    init = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=init)))
        return UNetModel(unet)


def _warm_start(net: UNetModel, path: str) -> None:
    """Continue from a model artifact of the same architecture (e.g. the shipped model) with a new optimiser."""
    art = artifacts.load(path, "model")
    if art.config.get("unet") != net.cfg.to_dict():
        raise UserError(f"{path}: --init needs a model of the same architecture as preset {net.cfg}")
    net.load_state_dict(art.tensors)
