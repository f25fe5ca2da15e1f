"""Heads on denoiser features (paper §4.1, §5) and their training.

- ``classifier``   3 conv layers + pooling on taps such as ``mid`` and an upsampling block at T_f = 700 (§5.1).
- ``segmentation`` a per-pixel MLP of 1x1 convolutions on decoder taps at T_f = 500; taps are upsampled to the
                   image size per batch inside the head, never on disk (§5.2, after Baranchuk et al.).
- ``rejection``    4 conv layers with GroupNorm and max-pools on ``mid`` at T_f = 300 and 800, concatenated and
                   L2-normalised over channels (~1.2M parameters at 1024 input channels) (§5.3).
- ``pixel``        a small CNN on clean pixels: the paper's DDIM-I baseline, guided through x0_hat.

A head artifact carries its feature spec and the model fingerprint; every consumer checks both. A head's raw
logits (temperature 1) are what guidance differentiates, so the paper's lambda means the same for every head. A
temperature fitted on the held-out split calibrates only the probabilities that are reported or thresholded
(``head_prob`` in index.csv, ``filter``, ``--reject``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddguide import artifacts
from ddguide.errors import UserError
from ddguide.features import Features, FeatureSpec, load_features
from ddguide.models import default_model_path

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
    """The DDIM-I baseline: the same small CNN, on RGB pixels in [-1, 1]."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__(3, classes, width)


class PixelSegmentationHead(nn.Module):
    """The DDIM-I baseline for masks: a small fully convolutional network on RGB pixels."""

    def __init__(self, classes: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
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
            self.net = PixelSegmentationHead(k) if cfg.dense else PixelHead(k)
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


def miou(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Mean intersection over union over the classes present in prediction or target."""
    ious = []
    for c in range(classes):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        if union:
            ious.append(inter / union)
    return float(sum(ious) / max(len(ious), 1))


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


def check_compatible(head: Head, fingerprint: str, model_path: str | Path | None) -> None:
    """A head trained on one model's features must never guide another model: the refusal names the head's
    file and the model's (``model_path``; None, or the package's own file, is "the shipped model")."""
    if head.reads_pixels:
        return
    artifacts.check_fingerprint(head.fingerprint, fingerprint, consumer=head.path or "the head",
                                source=_model_name(model_path))


def _model_name(model_path: str | Path | None) -> str:
    """How a refusal names a model: its path, or "the shipped model" for the default one."""
    if model_path is None or Path(model_path).resolve() == default_model_path().resolve():
        return "the shipped model"
    return str(model_path)
