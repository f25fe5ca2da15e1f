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
from ddguide.core.data import check_channels, first_colour, list_images, load_image
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.presets import get_preset
from ddguide.core.unet import UNetConfig, UNetModel
from ddguide.stages.training import (
    OnCheckpoint,
    Progress,
    Recipe,
    fit,
    flat_config,
    preview_grid,
    run_identity,
    setup_device,
    write_model,
)

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
    channels: int | None = None  # 1 (grey) or 3 (RGB); None: --arch's or --init's, else found from the images
    preview: int = 16  # images in the grid drawn at each checkpoint (0: none)
    export: bool = False  # write the model from the last checkpoint without training further

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree with to be resumed: not the device, nor the step count unless the
        learning rate decays over it."""
        keep = ["data", "preset", "batch", "lr", "warmup", "ema_decay", "grad_clip", "schedule", "seed"]
        # `init` joined later: leaving it out when unset keeps older checkpoints resumable
        optional = [k for k in ("init", "arch") if getattr(self, k) is not None]  # joined later: older
        optional += ["channels"] if self.channels == 1 else []  # checkpoints stay resumable
        return run_identity(self, keep + optional + self.recipe.optional_keys())


def load_dataset(folder: str, size: int, resize: str, channels: int | None = 3) -> tuple[torch.Tensor, int]:
    """All training images as uint8 (N, H, W, C) and C; training sets here are small (10k images = 30 MB).

    ``channels=None`` picks 1 when every image is grey (mode L, or RGB with R == G == B everywhere), else 3; a
    colour image in a 1-channel set is refused in one line naming it. A 3-channel model reads grey images as RGB."""
    files = list_images(folder)
    rgb = np.stack([load_image(f, size, resize) for f in files])  # (N, H, W, 3)
    colour = first_colour(rgb)
    if channels is None:
        channels = 3 if colour is not None else 1
    if channels == 1 and colour is not None:
        raise UserError(f"{files[colour]}: a colour image, but the model trains on 1-channel (grey) images "
                        "(leave --channels out, or pass --channels 3, to train on colour)")
    return torch.from_numpy(np.ascontiguousarray(rgb[..., :channels])), channels


def train(cfg: TrainConfig, progress: Progress | None = None) -> Path:
    """Train (or resume) and write the EMA weights as a ``model`` artifact at ``cfg.out``."""
    cfg.recipe.validate()
    preset = get_preset(cfg.preset)
    unet = architecture(preset.unet, cfg.arch)
    images = None
    channels = requested_channels(cfg, unet)
    if channels is None:  # found from the images: they are read before the network is built
        images, channels = load_dataset(cfg.data, unet.image_size, cfg.resize, None)
    cfg, unet = replace(cfg, channels=channels), with_channels(unet, channels)
    diffusion = DiffusionConfig(preset.diffusion.steps, cfg.schedule or preset.diffusion.schedule,
                                preset.diffusion.rescale_timesteps)
    device = setup_device(cfg.device, cfg.threads)
    net = initial_net(unet, cfg.recipe.seed)
    if cfg.init:
        _warm_start(net, cfg.init)

    def read() -> tuple[torch.Tensor, None]:
        data = images if images is not None else load_dataset(cfg.data, unet.image_size, cfg.resize, channels)[0]
        return data, None

    ema, state = fit(net.to(device), diffusion, cfg.recipe, checkpoint_path(cfg.out), cfg.identity(),
                     torch.Generator().manual_seed(cfg.recipe.seed), read, device, progress,
                     on_checkpoint=_previews(cfg, unet, diffusion, device), export=cfg.export)
    return write_model(cfg.out, unet, diffusion, ema, state, {"preset": cfg.preset, "train": flat_config(cfg)})


def preview_path(out: str | Path) -> Path:
    """The sample grid ``train`` redraws at each checkpoint beside the model: ``m.safetensors`` -> ``m.samples.png``."""
    return Path(out).with_suffix(".samples.png")


def _previews(cfg: TrainConfig, unet: UNetConfig, diffusion: DiffusionConfig,
              device: torch.device) -> OnCheckpoint | None:
    if not cfg.preview:
        return None
    return lambda ema, state: preview_grid(preview_path(cfg.out), unet, diffusion, ema, device, cfg.preview)


def requested_channels(cfg: TrainConfig, unet: UNetConfig) -> int | None:
    """The image channels asked for: ``--channels``, else ``--arch``'s ``in_channels``, else the ``--init``
    model's; None when the images decide."""
    arch = (cfg.arch or {}).get("in_channels")
    if cfg.channels is not None:
        check_channels(cfg.channels, "--channels")
        if arch is not None and arch != cfg.channels:
            raise UserError(f"--channels {cfg.channels} disagrees with --arch's in_channels {arch}")
        return cfg.channels
    if arch is not None:
        return check_channels(unet.in_channels, "--arch in_channels")
    if cfg.init:
        unet_cfg = artifacts.describe(cfg.init, "model").config.get("unet")
        init = unet_cfg.get("in_channels") if isinstance(unet_cfg, dict) else None
        return init if init in (1, 3) else None  # anything else is refused by the warm start
    return None


def with_channels(unet: UNetConfig, channels: int) -> UNetConfig:
    """``unet`` reading and writing images of ``channels`` (a learned variance keeps one value per channel)."""
    return replace(unet, in_channels=channels, out_channels=2 * channels if unet.learn_sigma else channels)


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
        found = art.config["unet"].get("in_channels") if isinstance(art.config.get("unet"), dict) else None
        if found in (1, 3) and found != net.cfg.in_channels:
            raise UserError(f"{path}: --init has {found} image channel(s), this run trains {net.cfg.in_channels}")
        raise UserError(f"{path}: --init needs a model of the same architecture as preset {net.cfg}")
    net.load_state_dict(art.tensors)
