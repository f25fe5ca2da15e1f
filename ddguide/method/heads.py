"""Heads on denoiser features (paper §4.1, §5): the architectures, the head artifact and the compatibility check.

- ``classifier``   3 conv layers + pooling on taps such as ``mid`` and an upsampling block at T_f = 700 (§5.1).
- ``segmentation`` a per-pixel MLP of 1x1 convolutions on decoder taps at T_f = 500; taps are upsampled to the
                   image size per batch inside the head, never on disk (§5.2, after Baranchuk et al.).
- ``rejection``    4 conv layers with GroupNorm and max-pools on ``mid`` at T_f = 300 and 800, concatenated and
                   L2-normalised over channels (~1.2M parameters at 1024 input channels) (§5.3).
- ``pixel``        a small CNN on clean pixels: the paper's DDIM-I baseline, guided through x0_hat.

A head artifact carries its feature spec and the model fingerprint; every consumer checks both. A head's raw
logits (temperature 1) are what guidance differentiates, so the paper's lambda means the same for every head. A
temperature fitted on the held-out split calibrates only the probabilities that are reported or thresholded
(``head_prob`` in index.csv, ``filter``, ``--reject``). Training is :mod:`ddguide.stages.train_head`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddguide.core import artifacts
from ddguide.core.errors import UserError
from ddguide.core.model import default_model_path
from ddguide.method.features import FeatureSpec

KINDS = ("classifier", "segmentation", "rejection", "pixel")
PIXELS = "pixels"  # the fingerprint of heads that read pixels, not a model's features


def gather(taps: dict[str, torch.Tensor], keys: list[str], normalize: bool) -> torch.Tensor:
    """Resize taps to the largest tapped resolution and concatenate them along channels. -> (N, C, h, w)"""
    side = max(taps[k].shape[-1] for k in keys)
    parts = [t if t.shape[-1] == side else F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)
             for t in (taps[k] for k in keys)]
    x = torch.cat(parts, dim=1)
    return F.normalize(x, dim=1) if normalize else x


class ClassifierHead(nn.Module):
    def __init__(self, in_channels: int, classes: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
        )
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))  # (N, classes)


class SegmentationHead(nn.Module):
    """Per-pixel MLP; its input is upsampled to ``size`` x ``size`` here, batch by batch."""

    def __init__(self, in_channels: int, classes: int, size: int, hidden: tuple[int, int] = (128, 64)):
        super().__init__()
        self.size = size
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden[0], 1), nn.ReLU(), nn.GroupNorm(8, hidden[0]),
            nn.Conv2d(hidden[0], hidden[1], 1), nn.ReLU(), nn.GroupNorm(8, hidden[1]),
            nn.Conv2d(hidden[1], classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.mlp(x)  # (N, classes, H, W)


class RejectionHead(nn.Module):
    def __init__(self, in_channels: int, classes: int, width: int = 96):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for i in range(4):
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            ch = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).amax(dim=(2, 3)))


class PixelHead(ClassifierHead):
    """The DDIM-I baseline: the same small CNN, on pixels in [-1, 1] (3 channels, or 1 for a grey model)."""

    def __init__(self, classes: int, width: int = 32, channels: int = 3):
        super().__init__(channels, classes, width)


class PixelSegmentationHead(nn.Module):
    """The DDIM-I baseline for masks: a small fully convolutional network on pixels (RGB, or grey)."""

    def __init__(self, classes: int, width: int = 64, channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (N, classes, H, W)


HeadConfig = artifacts.HeadMeta  # a head's config is the typed config of its artifact


class Head(nn.Module):
    """A trained head with its config: ``logits(inputs)`` where inputs are feature taps or pixels."""

    def __init__(self, cfg: HeadConfig, fingerprint: str, path: Path | None = None):
        super().__init__()
        self.cfg, self.fingerprint, self.path = cfg, fingerprint, path
        k = len(cfg.classes)
        if cfg.kind == "classifier":
            self.net: nn.Module = ClassifierHead(cfg.in_channels, k)
        elif cfg.kind == "segmentation":
            self.net = SegmentationHead(cfg.in_channels, k, cfg.image_size)
        elif cfg.kind == "rejection":
            self.net = RejectionHead(cfg.in_channels, k)
        elif cfg.kind == "pixel":
            channels = cfg.in_channels  # the image channels of the model whose samples it reads
            self.net = PixelSegmentationHead(k, channels=channels) if cfg.dense else PixelHead(k, channels=channels)
        else:
            raise UserError(f"unknown head kind {cfg.kind!r} (choose from {', '.join(KINDS)})")
        self.spec = FeatureSpec.from_dict(cfg.spec) if cfg.spec else None

    @property
    def reads_pixels(self) -> bool:
        return self.spec is None

    def inputs(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.spec is not None
        return gather(taps, self.spec.keys(), self.cfg.normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits (temperature 1) from prepared inputs (``inputs(taps)`` or pixels): what guidance uses."""
        return self.net(x)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw logits -> temperature-calibrated logits, for probabilities that are reported or thresholded."""
        return logits / self.cfg.temperature

    def target_index(self, value: str | None) -> int:
        """The class index a guide pushes towards. ``None`` means the positive class of a two-class head
        (``1``, also spelt by the head's label, e.g. ``has_circle``); other heads need an explicit target."""
        classes = self.cfg.classes
        if value is None:
            if len(classes) == 2 and not self.cfg.dense:
                return 1
            raise UserError(f"{self.path or 'the head'}: give --target (one of {', '.join(classes)})")
        if value in classes:
            return classes.index(value)
        if len(classes) == 2 and self.cfg.label and value == self.cfg.label:
            return 1
        names = ", ".join(classes) + (f", or {self.cfg.label} for 1" if len(classes) == 2 and self.cfg.label else "")
        raise UserError(f"target {value!r} is not among the head's classes ({names})")


def save_head(path: str | Path, head: Head) -> Path:
    """Write a ``head`` artifact: the network's weights, its :class:`HeadMeta` config and its fingerprint."""
    return artifacts.save(path, head.net.state_dict(), config=head.cfg, fingerprint=head.fingerprint)


def load_head(path: str | Path, device: str | torch.device = "cpu") -> Head:
    art = artifacts.load(path, "head")
    cfg = head_config(art.config, path)
    with torch.device("meta"):  # the shapes its config implies, checked against the file before anything is built
        expected = {k: tuple(v.shape) for k, v in Head(cfg, art.fingerprint).net.state_dict().items()}
    if {k: tuple(v.shape) for k, v in art.tensors.items()} != expected:
        raise UserError(f"{path}: weights do not fit the head its own config describes "
                        f"({cfg.kind}, {cfg.in_channels} input channels, {len(cfg.classes)} classes)")
    head = Head(cfg, art.fingerprint, Path(path))
    head.net.load_state_dict(art.tensors)
    return head.to(device).eval().requires_grad_(False)


def head_config(config: dict[str, Any], path: str | Path) -> HeadConfig:
    """A head artifact's config, type- and range-checked (kind, classes, channels, size, temperature, spec)."""
    cfg = artifacts.HeadMeta.from_metadata(config, path)
    if cfg.kind not in KINDS:
        raise UserError(f"{path}: unknown head kind {cfg.kind!r}")
    if cfg.spec is not None:
        FeatureSpec.from_dict(cfg.spec, where=f"{path}: feature spec")
    return cfg


def check_compatible(head: Head, fingerprint: str, model_path: str | Path | None, channels: int | None = None) -> None:
    """A head trained on one model's features must never guide another model: the refusal names the head's
    file and the model's (``model_path``; None, or the package's own file, is "the shipped model"). A pixel head
    fits any model whose images have its channels (``channels``: the model's, when known)."""
    if head.reads_pixels:
        if channels is not None and channels != head.cfg.in_channels:
            raise UserError(f"{head.path or 'the head'}: a pixel head of {head.cfg.in_channels}-channel images, "
                            f"{_model_name(model_path)} makes {channels}-channel images")
        return
    artifacts.check_fingerprint(head.fingerprint, fingerprint, consumer=head.path or "the head",
                                source=_model_name(model_path))


def _model_name(model_path: str | Path | None) -> str:
    """How a refusal names a model: its path, or "the shipped model" for the default one."""
    if model_path is None or Path(model_path).resolve() == default_model_path().resolve():
        return "the shipped model"
    return str(model_path)
