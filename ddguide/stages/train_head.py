"""`ddguide train-head`: a head fitted on a features artifact (or on pixels, the DDIM-I baseline).

The split, initialisation and batches follow one seed (in a forked RNG: the caller's global state is left
alone). The held-out split gives the reported metric and calibrates the temperature, a MAP estimate under a
log T ~ N(0, 1) prior, which only the reported and thresholded probabilities use. The head architectures and
their artifact are :mod:`ddguide.method.heads`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddguide.core.errors import UserError
from ddguide.method.features import Features, FeatureSpec, load_features
from ddguide.method.heads import KINDS, PIXELS, Head, HeadConfig, gather, save_head
from ddguide.metrics.miou import miou

# ------------------------------------------------------------------------------------------------ training


@dataclass
class TrainHeadConfig:
    features: str
    out: str
    kind: str = "classifier"
    steps: int | None = None  # default per kind
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    blocks: tuple[str, ...] | None = None  # a subset of the extracted taps (default: all)
    timesteps: tuple[int, ...] | None = None


DEFAULT_STEPS = {"classifier": 500, "segmentation": 400, "rejection": 300, "pixel": 500}


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction)) if n >= 5 else 0
    return perm[n_val:], perm[:n_val]


def _targets(feats: Features, kind: str) -> tuple[torch.Tensor, list[str]]:
    if kind == "segmentation" or (kind == "pixel" and feats.labels is None and feats.masks is not None):
        if feats.masks is None:
            raise UserError(f"{feats.path}: a segmentation head needs masks (extract with --masks DIR)")
        ids = feats.meta.mask_classes if feats.meta.mask_classes is not None else int(feats.masks.max()) + 1
        return feats.masks, [str(i) for i in range(ids)]
    if feats.labels is None:
        raise UserError(f"{feats.path}: a {kind} head needs labels (extract with --labels/--label or class folders)")
    classes = feats.meta.classes or [str(i) for i in range(int(feats.labels.max()) + 1)]
    if len(set(feats.labels.tolist())) < 2:
        raise UserError(f"{feats.path}: every image has the same label; a head needs at least two classes")
    return feats.labels, list(classes)


def _inputs(feats: Features, cfg: TrainHeadConfig, normalize: bool) -> tuple[torch.Tensor, FeatureSpec | None]:
    """The head's input tensor for every image (features gathered, or pixels for the DDIM-I baseline)."""
    if cfg.kind == "pixel":
        return feats.images.permute(0, 3, 1, 2).float() / 127.5 - 1, None
    spec = FeatureSpec(tuple(cfg.blocks or feats.spec.blocks), tuple(cfg.timesteps or feats.spec.timesteps),
                       feats.spec.noise, feats.spec.seed)
    missing = [k for k in spec.keys() if k not in feats.taps]
    if missing:
        raise UserError(f"{feats.path}: has no {', '.join(missing)} (it holds {', '.join(sorted(feats.taps))})")
    if cfg.kind == "segmentation":  # upsampling happens in the head; keep taps native-size here
        return torch.empty(0), spec
    return gather(feats.taps, spec.keys(), normalize), spec


TEMPERATURE_PRIOR_SIGMA = 1.0  # log T ~ N(0, sigma^2): the prior of the calibration fit


def calibrate_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The maximum a posteriori temperature T of softmax(logits / T) on a held-out split.

    The prior ``log T ~ N(0, 1)`` keeps the fit finite when the split is perfectly separated: there the NLL
    alone falls without bound as T -> 0, so a plain search ends at its lower bound whatever the head. The
    search runs over ``log T`` in [-3, 3] (T from 0.05 to 20)."""
    if len(y) == 0:
        return 1.0
    log_t = torch.linspace(-3.0, 3.0, 121)
    nll = torch.stack([F.cross_entropy(logits / lt.exp(), y, reduction="sum") for lt in log_t])
    posterior = nll + log_t ** 2 / (2 * TEMPERATURE_PRIOR_SIGMA ** 2)
    return float(log_t[int(posterior.argmin())].exp())


def chance_warning(metrics: dict[str, float]) -> str | None:
    """One line when a head's held-out accuracy is near what always answering the commonest class gets."""
    acc, chance, n = metrics.get("val_accuracy"), metrics.get("val_chance"), metrics.get("val_images", 0)
    if acc is None or chance is None or n < 8:
        return None
    if acc < chance + 0.5 * (1 - chance):  # less than half of the way from chance to perfect
        return (f"held-out accuracy {acc:.2f} is less than half way from chance ({chance:.2f}, always answering "
                f"the commonest class) to 1: these taps may not carry the label; try `ddguide extract ... "
                f"--blocks auto`")
    return None


def train_head(cfg: TrainHeadConfig, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Train a head on a features artifact; the held-out split gives its metric and temperature."""
    if cfg.kind not in KINDS:
        raise UserError(f"unknown head kind {cfg.kind!r} (choose from {', '.join(KINDS)})")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    feats = load_features(cfg.features)
    y, classes = _targets(feats, cfg.kind)
    normalize = cfg.kind == "rejection"
    x, spec = _inputs(feats, cfg, normalize)
    n = len(y)
    train_idx, val_idx = _split(n, cfg.val_fraction, cfg.seed)
    in_channels = 3 if spec is None else sum(feats.taps[k].shape[1] for k in spec.keys())
    dense = y.ndim == 3  # (N, H, W) masks
    head_cfg = HeadConfig(kind=cfg.kind, classes=classes, spec=spec.to_dict() if spec else None,
                          in_channels=in_channels, image_size=feats.meta.image_size, normalize=normalize,
                          dense=dense,
                          label=feats.meta.label, train=asdict(cfg))
    with torch.random.fork_rng(devices=[]):  # the initialisation is seeded without touching the caller's generator
        torch.manual_seed(cfg.seed)
        head = Head(head_cfg, PIXELS if spec is None else feats.fingerprint)

    def batch_inputs(idx: torch.Tensor) -> torch.Tensor:
        if cfg.kind == "segmentation":
            return gather({k: feats.taps[k][idx] for k in spec.keys()}, spec.keys(), False)
        return x[idx]

    # 1. fit with Adam on random mini-batches of the training split
    steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS[cfg.kind]
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    fit(head.net, batch_inputs, y, train_idx, steps=steps, batch=cfg.batch, lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=cfg.seed, progress=progress)

    # 2. held-out metric and temperature
    head.eval()
    temperature, metrics = _held_out(head.net, batch_inputs, y, val_idx, len(classes))
    metrics.update({"train_images": len(train_idx), "val_images": len(val_idx)})
    head.cfg = replace(head.cfg, temperature=temperature, metrics=metrics)
    return save_head(cfg.out, head)


@torch.no_grad()
def _held_out(net: nn.Module, batch_inputs: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
              val_idx: torch.Tensor, classes: int) -> tuple[float, dict[str, float]]:
    """(temperature, metrics) on the held-out split: accuracy and chance, or mIoU for dense targets, and the
    calibrated NLL; (1.0, {}) without a split."""
    if not len(val_idx):
        return 1.0, {}
    logits = torch.cat([net(batch_inputs(val_idx[i:i + 64])) for i in range(0, len(val_idx), 64)])
    target = y[val_idx]
    temperature = calibrate_temperature(_flat(logits), _flat_y(target))
    if target.ndim == 3:  # (N, H, W) masks
        metrics = {"val_miou": miou(logits.argmax(1), target, classes)}
    else:
        counts = torch.bincount(target, minlength=classes)
        metrics = {"val_accuracy": float((logits.argmax(1) == target).float().mean()),
                   "val_chance": float(counts.max()) / len(val_idx)}
    metrics["val_nll"] = float(F.cross_entropy(_flat(logits) / temperature, _flat_y(target)))
    return temperature, metrics


def fit(net: nn.Module, batch_inputs: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
        train_idx: torch.Tensor, *, steps: int, batch: int, lr: float, weight_decay: float, seed: int,
        progress: Callable[[int, int, str], None] | None = None) -> nn.Module:
    """AdamW on random mini-batches of ``train_idx`` (one generator from ``seed``); cross-entropy, per pixel
    for dense targets. Leaves ``net`` in eval mode."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = train_idx[torch.randint(0, len(train_idx), (min(batch, len(train_idx)),), generator=gen)]
        loss = F.cross_entropy(net(batch_inputs(idx)), y[idx])
        if not torch.isfinite(loss):
            raise UserError(f"the head's loss is {float(loss)} at step {step + 1}: the learning rate (--lr {lr:g}) "
                            "is likely too high, or the features are broken; no head was written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % 10 == 0:
            progress(step + 1, steps, f"loss {loss.item():.3f}")
    return net.eval()


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) or (N, K, H, W) -> (M, K) rows of class scores."""
    return logits if logits.ndim == 2 else logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def _flat_y(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1)
