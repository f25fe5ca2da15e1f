"""`ddguide convert`: openai improved-/guided-diffusion checkpoints and diffusers ``UNet2DModel`` folders ->
ddguide ``model`` artifacts.

Checkpoints are read with ``torch.load(weights_only=True)`` (a pickle cannot run code) or from safetensors.
A checkpoint that does not fit the architecture is refused with a short diff and, when one architecture flag
explains the difference, the name of that flag. A diffusers folder (``config.json``,
``diffusion_pytorch_model.safetensors`` and a scheduler config) carries its own architecture and schedule
(:mod:`ddguide.core.diffusers_unet`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddguide.core import artifacts
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.model import Model, model_from_folder, save_model
from ddguide.core.presets import DEFAULT_CHANNEL_MULT, PRESETS, get_preset
from ddguide.core.unet import UNetConfig, UNetModel


@dataclass
class ConvertConfig:
    checkpoint: str
    out: str
    preset: str | None = None  # None: inferred from the file stem
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # UNetConfig fields
    diffusion: dict[str, Any] = dataclasses.field(default_factory=dict)  # DiffusionConfig fields


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt``/``.pth`` (weights only, never arbitrary pickles) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        artifacts.read_header(path)  # the header type-checked first
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a bad header
            raise UserError(f"{path}: unreadable safetensors file ({str(e)[:160]})") from None
        artifacts.check_finite(path, sd)
        return sd
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line, ours
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise UserError(f"{path}: refused to load: the file holds more than plain tensors ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:160]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a state_dict (name -> tensor)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    artifacts.check_finite(path, sd)
    return sd


def shapes_of(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the network a config builds, without allocating its weights."""
    with torch.device("meta"):
        net = UNetModel(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def describe_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor], limit: int = 3) -> str:
    """'N missing (a, b, ...), M unexpected (...), K mis-shaped (key: ours vs file)'."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shaped = [f"{k}: {list(expected[k])} vs {list(found[k].shape)}" for k in expected
              if k in found and tuple(found[k].shape) != expected[k]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if items:
            more = f", +{len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:limit])}{more})")
    return "; ".join(parts)


def _candidates(cfg: UNetConfig, sd: dict[str, torch.Tensor]) -> list[tuple[str, UNetConfig]]:
    """Single-flag variations of ``cfg``, each named by the flag a user would have got wrong."""
    out: list[tuple[str, UNetConfig]] = []
    rep = dataclasses.replace
    if "out.2.weight" in sd and sd["out.2.weight"].shape[0] != cfg.out_channels:
        learn = sd["out.2.weight"].shape[0] == 2 * cfg.in_channels
        out.append((f"learn_sigma={learn}", rep(cfg, out_channels=sd["out.2.weight"].shape[0])))
    classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    if classes != cfg.num_classes:
        out.append((f"class_cond={classes is not None}", rep(cfg, num_classes=classes)))
    if "time_embed.0.weight" in sd and sd["time_embed.0.weight"].shape[1] != cfg.model_channels:
        out.append((f"num_channels={sd['time_embed.0.weight'].shape[1]}",
                    rep(cfg, model_channels=sd["time_embed.0.weight"].shape[1])))
    out.append((f"use_scale_shift_norm={not cfg.use_scale_shift_norm}",
                rep(cfg, use_scale_shift_norm=not cfg.use_scale_shift_norm)))
    out.append((f"resblock_updown={not cfg.resblock_updown}", rep(cfg, resblock_updown=not cfg.resblock_updown)))
    for n in (1, 2, 3, 4):
        if n != cfg.num_res_blocks:
            out.append((f"num_res_blocks={n}", rep(cfg, num_res_blocks=n)))
    for res in ((32, 16, 8), (16, 8), (16,), (8,), (32, 16)):
        if res != cfg.attention_resolutions:
            out.append((f"attention_resolutions={','.join(map(str, res))}", rep(cfg, attention_resolutions=res)))
    for size, mult in DEFAULT_CHANNEL_MULT.items():
        if mult != cfg.channel_mult:
            out.append((f"image_size={size} (channel_mult {','.join(map(str, mult))})",
                        rep(cfg, image_size=size, channel_mult=mult)))
    return out


def likely_wrong_flag(cfg: UNetConfig, sd: dict[str, torch.Tensor]) -> str | None:
    """The one architecture flag whose change makes every key and shape fit, if there is one."""
    found = {k: tuple(v.shape) for k, v in sd.items()}
    for flag, candidate in _candidates(cfg, sd):
        try:
            if shapes_of(candidate) == found:
                return flag
        except (UserError, ValueError, ZeroDivisionError):
            continue
    return None


def check_fits(cfg: UNetConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = shapes_of(cfg)
    if {k: tuple(v.shape) for k, v in sd.items()} == expected:
        return
    flag = likely_wrong_flag(cfg, sd)
    hint = f" Likely wrong flag: {flag}." if flag else ""
    raise UserError(f"{source} does not fit the architecture: {describe_mismatch(expected, sd)}.{hint}")


def infer_preset(path: str | os.PathLike) -> str:
    stem = Path(path).stem
    if stem in PRESETS:
        return stem
    raise UserError(f"cannot infer the preset from the file name {Path(path).name!r}; pass --preset "
                    f"(one of {', '.join(PRESETS)}) or the architecture options")


def convert(cfg: ConvertConfig) -> Model:
    """Read, check and write; nothing is written when the checkpoint does not fit."""
    if Path(cfg.checkpoint).is_dir():
        return convert_diffusers(cfg)
    name = cfg.preset or (None if cfg.overrides else infer_preset(cfg.checkpoint))
    preset = get_preset(name) if name else None
    sd = read_state_dict(cfg.checkpoint)
    base = preset.unet.to_dict() if preset else UNetConfig().to_dict()
    unet_cfg = UNetConfig.from_dict({**base, **cfg.overrides})
    diff_base = preset.diffusion.to_dict() if preset else DiffusionConfig().to_dict()
    diffusion = DiffusionConfig.from_dict({**diff_base, **cfg.diffusion})
    check_fits(unet_cfg, sd, str(cfg.checkpoint))
    net = UNetModel(unet_cfg)
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    # a published class-conditional model has one embedding row per class and no null class (guided-diffusion
    # trained without label dropout): CFG needs an unconditional model for its null branch (`--cfg-uncond`)
    model = Model(net, diffusion, info={"preset": name, "source": preset.source if preset else "custom",
                                        "converted_from": Path(cfg.checkpoint).name},
                  null_class=None if unet_cfg.num_classes is None else False)
    save_model(cfg.out, model)
    return model


def convert_diffusers(cfg: ConvertConfig) -> Model:
    """A diffusers ``UNet2DModel`` folder as a model artifact: its config, diffusers' own tensor names and the
    diffusion its scheduler config describes (or ``cfg.diffusion``)."""
    if cfg.preset or cfg.overrides:
        raise UserError(f"{cfg.checkpoint}: a diffusers folder carries its own architecture in config.json; drop "
                        "--preset and --arch")
    model = model_from_folder(cfg.checkpoint, cfg.diffusion or None)
    save_model(cfg.out, model)
    return model
