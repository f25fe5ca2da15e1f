"""`ddguide train-head`: a head fitted on a features artifact (or on pixels, the DDIM-I baseline).

The split, initialisation and batches follow one seed (in a forked RNG: the caller's global state is left
alone). The held-out split gives the reported metric and calibrates the temperature, a MAP estimate under a
log T ~ N(0, 1) prior, which only the reported and thresholded probabilities use. The head architectures and
their artifact are :mod:`ddguide.method.heads`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddguide.core import artifacts
from ddguide.core.diffusion import eps_to_x0, q_sample
from ddguide.core.errors import UserError
from ddguide.core.model import Model, default_model_path, denoiser, load_model
from ddguide.core.runtime import autocast, resolve_device, resolve_precision
from ddguide.method.features import Features, FeatureSpec, compute, load_features
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
    augment: str = "none"  # none; x0: train also on the taps of x0_hat(x_t) (the inputs guidance feeds a head);
    # adv: also on adversarial versions of the labelled images (PGD in pixel space through the feature pass);
    # x0-adv: on adversarial versions of their x0_hat(x_t) (the inputs guidance feeds a head, after its push)
    augment_fraction: float = 0.5  # the share of each batch replaced by augmented images
    adv_eps: float = 0.25  # --augment adv / x0-adv: the perturbation's L2 radius, as RMS per pixel on [-1, 1]
    adv_steps: int = 3  # --augment adv / x0-adv: PGD steps per batch
    model: str | None = None  # the features' model, which --augment runs (default: the shipped model)
    device: str = "cpu"  # where that model runs; the head trains on the CPU
    precision: str = "fp32"  # of that model's passes


AUGMENTS = ("none", "x0", "adv", "x0-adv")
ADVERSARIAL = ("adv", "x0-adv")  # the augmentations that attack the head (--adv-eps, --adv-steps)
X0_HAT = ("x0", "x0-adv")  # the augmentations that start from x0_hat at a drawn t
AUGMENT_FIELDS = ("augment", "augment_fraction", "adv_eps", "adv_steps", "model", "device",
                  "precision")  # not recorded without --augment
AUGMENT_T_MAX = 0.5  # t ~ U{0..0.5 T}: beyond it x0_hat of the shipped model loses the attribute (README)
X0_EVAL_FRACTIONS = (0.25, 0.5, 0.75)  # val_accuracy_x0: x0_hat of the held-out images at these fractions of T

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
    if cfg.augment not in AUGMENTS:
        raise UserError(f"--augment: unknown augmentation {cfg.augment!r} (choose from {', '.join(AUGMENTS)})")
    if not 0 <= cfg.augment_fraction <= 1:
        raise UserError(f"--augment-fraction must be in [0, 1], got {cfg.augment_fraction}")
    if cfg.augment != "none" and cfg.kind not in ("classifier", "segmentation"):
        raise UserError(f"--augment {cfg.augment} is for classifier and segmentation heads, not --kind {cfg.kind}")
    if cfg.augment in ADVERSARIAL and not (math.isfinite(cfg.adv_eps) and 0 < cfg.adv_eps <= 2):
        raise UserError(f"--adv-eps must be in (0, 2], got {cfg.adv_eps}")
    if cfg.augment in ADVERSARIAL and not 1 <= cfg.adv_steps <= 100:
        raise UserError(f"--adv-steps must be in 1..100, got {cfg.adv_steps}")
    feats = load_features(cfg.features)
    model = features_model(cfg, feats) if cfg.augment != "none" or cfg.model else None
    y, classes = _targets(feats, cfg.kind)
    normalize = cfg.kind == "rejection"
    x, spec = _inputs(feats, cfg, normalize)
    n = len(y)
    train_idx, val_idx = _split(n, cfg.val_fraction, cfg.seed)
    in_channels = feats.images.shape[3] if spec is None else sum(feats.taps[k].shape[1] for k in spec.keys())
    dense = y.ndim == 3  # (N, H, W) masks
    head_cfg = HeadConfig(kind=cfg.kind, classes=classes, spec=spec.to_dict() if spec else None,
                          in_channels=in_channels, image_size=feats.meta.image_size, normalize=normalize,
                          dense=dense,
                          label=feats.meta.label, train=_train_record(cfg, model))
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
    train_inputs = batch_inputs
    if cfg.augment == "x0":
        assert model is not None and spec is not None
        train_inputs = x0_augmented(batch_inputs, model, feats, spec, fraction=cfg.augment_fraction,
                                    normalize=normalize, precision=_precision(cfg, model), seed=cfg.seed)
    elif cfg.augment in ADVERSARIAL:
        assert model is not None and spec is not None
        train_inputs = adversarial(batch_inputs, model, feats, spec, head.net, y, fraction=cfg.augment_fraction,
                                   eps=cfg.adv_eps, steps=cfg.adv_steps, normalize=normalize,
                                   precision=_precision(cfg, model), seed=cfg.seed,
                                   from_x0_hat=cfg.augment == "x0-adv")
    fit(head.net, train_inputs, y, train_idx, steps=steps, batch=cfg.batch, lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=cfg.seed, progress=progress)

    # 2. held-out metric and temperature (on clean images; with --augment, also on x0_hat of them and, for adv,
    #    on the held-out images' own adversarial versions)
    head.eval()
    temperature, metrics = _held_out(head.net, batch_inputs, y, val_idx, len(classes))
    if cfg.augment != "none" and len(val_idx):
        assert model is not None
        metrics.update(x0_metrics(head, model, feats, _precision(cfg, model)))
        if cfg.augment in ADVERSARIAL:
            metrics.update(adv_metrics(head, model, feats, y, val_idx, eps=cfg.adv_eps, steps=cfg.adv_steps,
                                       precision=_precision(cfg, model)))
    metrics.update({"train_images": len(train_idx), "val_images": len(val_idx)})
    head.cfg = replace(head.cfg, temperature=temperature, metrics=metrics)
    return save_head(cfg.out, head)


# ------------------------------------------------------------------------------- x0_hat augmentation
#
# While a head guides (Eq. 13) it reads the taps of x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
# clamped to [-1, 1]; at high noise these are blurred means that look unlike any clean image, and a head trained
# on clean images alone can be driven to p = 1 on them while the image lacks the attribute. --augment x0 trains
# on those inputs too: a share of each batch is replaced by the taps of x0_hat of the same labelled images at a
# t drawn uniformly from 0..T/2 (:func:`augment_t_max`), with the same labels.


def features_model(cfg: TrainHeadConfig, feats: Features) -> Model:
    """The model ``--model`` names (default: the shipped one), refused unless the features came from it."""
    path = cfg.model or default_model_path()
    model = load_model(path, resolve_device(cfg.device))
    artifacts.check_fingerprint(feats.fingerprint, model.fingerprint, consumer=feats.path,
                                source=str(cfg.model) if cfg.model else "the shipped model")
    return model


def _precision(cfg: TrainHeadConfig, model: Model) -> str:
    return resolve_precision(cfg.precision, model.device)


def _train_record(cfg: TrainHeadConfig, model: Model | None) -> dict:
    """The training settings a head records. Without augmentation they are the fields heads have always
    recorded (so such a head's file is what it was before --augment existed); with it, also the augmentation,
    its share and the precision of the model's passes, with the range of t (x0) or the radius and steps (adv)."""
    record = {k: v for k, v in asdict(cfg).items() if k not in AUGMENT_FIELDS}
    if cfg.augment != "none":
        assert model is not None
        record.update(augment=cfg.augment, augment_fraction=cfg.augment_fraction)
        if cfg.augment in X0_HAT:
            record.update(augment_t=[0, augment_t_max(model)])
        if cfg.augment in ADVERSARIAL:
            record.update(adv_eps=cfg.adv_eps, adv_steps=cfg.adv_steps)
        record.update(precision=_precision(cfg, model))
    return record


def augment_t_max(model: Model) -> int:
    """The largest t --augment x0 draws: AUGMENT_T_MAX of the model's steps. On the shipped model the oracle
    still finds the labelled attribute in x0_hat of 93 % of 100 labelled images at t = 0.5 T, 62 % at 0.8 T
    (chance): later t would teach the head labels its input no longer shows."""
    return int(AUGMENT_T_MAX * model.diffusion.steps)


def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (augmentation draws, evaluation noise) that follows ``seed`` but not the
    stream the batches draw from it."""
    return int.from_bytes(hashlib.sha256(f"ddguide.{purpose}.{seed}".encode()).digest()[:8], "little") >> 1


def _pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1] on ``device``."""
    return (images.permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)


@torch.no_grad()
def x0_hat(model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, precision: str) -> torch.Tensor:
    """What guidance feeds a head at step t for an image whose clean version is ``x0``: x_t = q_sample(x0, t,
    noise), one denoiser pass for eps, x0_hat by Eq. 11 clamped to [-1, 1]."""
    x_t = q_sample(x0, t, noise, model.abar)
    eps = denoiser(model, precision=precision)(x_t, t).eps
    return eps_to_x0(x_t, t, eps, model.abar).clamp(-1, 1)


def taps_input(model: Model, spec: FeatureSpec, images: torch.Tensor, idx: torch.Tensor, *, normalize: bool,
               precision: str) -> torch.Tensor:
    """The head's input (gathered taps, on the CPU) for ``images`` (N, C, H, W) in [-1, 1], the images ``idx``
    of the features (their fixed T_f noise, if any, follows the index); differentiable in ``images``."""
    with autocast(model.device, precision):
        taps = compute(model, images, spec, idx.tolist())
    return gather({k: v.float().cpu() for k, v in taps.items()}, spec.keys(), normalize)


@torch.no_grad()
def x0_hat_inputs(model: Model, feats: Features, spec: FeatureSpec, idx: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor, *, normalize: bool, precision: str) -> torch.Tensor:
    """The head's input for x0_hat of the images ``idx`` of ``feats``."""
    device = model.device
    images = x0_hat(model, _pixels(feats.images[idx], device), t.to(device), noise.to(device), precision)
    return taps_input(model, spec, images, idx, normalize=normalize, precision=precision)


def drawn_x0_hat(model: Model, images: torch.Tensor, gen: torch.Generator, precision: str) -> torch.Tensor:
    """:func:`x0_hat` of ``images`` (N, C, H, W) at t ~ U{0..augment_t_max} and fresh noise, t then the noise
    drawn (on the CPU) from ``gen``."""
    t = torch.randint(0, augment_t_max(model) + 1, (len(images),), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    return x0_hat(model, images, t.to(model.device), noise.to(model.device), precision)


def replacing_share(batch_inputs: Callable[[torch.Tensor], torch.Tensor], fraction: float, gen: torch.Generator,
                    replace_with: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``batch_inputs`` with ``round(fraction * batch)`` of each batch's images, drawn anew every batch from
    ``gen``, replaced by ``replace_with(their indices)`` (which may draw from ``gen`` too, after the pick)."""

    def inputs(idx: torch.Tensor) -> torch.Tensor:
        x = batch_inputs(idx).clone()
        k = int(round(fraction * len(idx)))
        if k == 0:
            return x
        pick = torch.randperm(len(idx), generator=gen)[:k]
        x[pick] = replace_with(idx[pick])
        return x

    return inputs


def x0_augmented(batch_inputs: Callable[[torch.Tensor], torch.Tensor], model: Model, feats: Features,
                 spec: FeatureSpec, *, fraction: float, normalize: bool, precision: str,
                 seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`replacing_share` with the inputs of the images' x0_hat at t ~ U{0..augment_t_max}; every draw from
    one generator of ``seed``."""
    gen = torch.Generator().manual_seed(_derived_seed(seed, "augment"))

    def x0_hats(sub: torch.Tensor) -> torch.Tensor:
        images = drawn_x0_hat(model, _pixels(feats.images[sub], model.device), gen, precision)
        return taps_input(model, spec, images, sub, normalize=normalize, precision=precision)

    return replacing_share(batch_inputs, fraction, gen, x0_hats)


@torch.no_grad()
def x0_metrics(head: Head, model: Model, feats: Features, precision: str = "fp32") -> dict[str, float]:
    """``val_accuracy_x0`` (``val_miou_x0`` for masks): the held-out score of ``head`` on x0_hat of its
    held-out images (the split its training config names) at t = 0.25, 0.5 and 0.75 of T, averaged; the
    noise is fixed by the head's seed, so heads of one seed are scored on the same inputs. {} without a split."""
    train = head.cfg.train
    y, classes = _targets(feats, head.cfg.kind)
    _, val_idx = _split(len(y), float(train.get("val_fraction", 0.2)), int(train.get("seed", 0)))
    if not len(val_idx) or head.spec is None:
        return {}
    gen = torch.Generator().manual_seed(_derived_seed(int(train.get("seed", 0)), "x0-eval"))
    noise = torch.randn((len(val_idx), feats.images.shape[3], feats.meta.image_size, feats.meta.image_size),
                        generator=gen)
    scores = []
    for fraction in X0_EVAL_FRACTIONS:
        t = torch.full((len(val_idx),), int(fraction * model.diffusion.steps))
        logits = torch.cat([head.net(x0_hat_inputs(model, feats, head.spec, val_idx[i:i + 64], t[i:i + 64],
                                                   noise[i:i + 64], normalize=head.cfg.normalize,
                                                   precision=precision))
                            for i in range(0, len(val_idx), 64)])
        target = y[val_idx]
        scores.append(miou(logits.argmax(1), target, len(classes)) if target.ndim == 3 else
                      float((logits.argmax(1) == target).float().mean()))
    return {("val_miou_x0" if y.ndim == 3 else "val_accuracy_x0"): sum(scores) / len(scores)}


# ------------------------------------------------------------------------------- adversarial augmentation
#
# Guidance climbs the head's gradient. Where a small change of the image moves the head's answer without moving
# its content, guidance takes that change and the head is fooled (Eq. 13 on the digits, README). --augment adv
# trains on adversarial versions of the labelled images as well, with their own labels: projected gradient
# ascent on the head's loss within an L2 ball in pixel space, through the feature pass guidance differentiates.
# A head that keeps its answer within the ball has gradients that must change the image's content to change
# its answer (the perceptually aligned gradients of robust classifiers, Santurkar et al. 2019, which Kawar et
# al. 2022 guide with).


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norms, shaped to broadcast over (N, C, H, W)."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


def pgd(net: nn.Module, model: Model, spec: FeatureSpec, images: torch.Tensor, target: torch.Tensor,
        idx: torch.Tensor, *, eps: float, steps: int, normalize: bool, precision: str) -> torch.Tensor:
    """Images within L2 distance ``eps * sqrt(C * H * W)`` of ``images`` (in [-1, 1]) that raise ``net``'s
    cross-entropy on ``target``: ``steps`` steps of 2.5 radius / steps along the normalised gradient, each
    projected back onto the ball and into [-1, 1]. The start is the image itself, so the result is a function
    of the head, the images and their features' noise."""
    radius = eps * math.sqrt(images[0].numel())
    alpha = 2.5 * radius / steps
    delta = torch.zeros_like(images)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            inputs = taps_input(model, spec, images + delta, idx, normalize=normalize, precision=precision)
            loss = F.cross_entropy(net(inputs), target, reduction="sum")
            (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + alpha * g / _norms(g).clamp(min=1e-12)
            delta = delta * (radius / _norms(delta).clamp(min=1e-12)).clamp(max=1)
            delta = (images + delta).clamp(-1, 1) - images
    return (images + delta).detach()


def adversarial(batch_inputs: Callable[[torch.Tensor], torch.Tensor], model: Model, feats: Features,
                spec: FeatureSpec, net: nn.Module, y: torch.Tensor, *, fraction: float, eps: float, steps: int,
                normalize: bool, precision: str, seed: int,
                from_x0_hat: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`replacing_share` (its picks from a generator of ``seed``) with the inputs of the images' :func:`pgd`
    versions against ``net`` as it is at that step. ``from_x0_hat`` (--augment x0-adv): the attack starts from
    x0_hat of the images at t ~ U{0..augment_t_max} instead of the images themselves (t and noise drawn from
    a generator of its own, after the pick)."""

    def attacked(sub: torch.Tensor) -> torch.Tensor:
        images = _pixels(feats.images[sub], model.device)
        if from_x0_hat:
            images = drawn_x0_hat(model, images, gen, precision)
        images = pgd(net, model, spec, images, y[sub], sub, eps=eps, steps=steps, normalize=normalize,
                     precision=precision)
        with torch.no_grad():
            return taps_input(model, spec, images, sub, normalize=normalize, precision=precision)

    gen = torch.Generator().manual_seed(_derived_seed(seed, "x0-adversarial" if from_x0_hat else "adversarial"))
    return replacing_share(batch_inputs, fraction, gen, attacked)


def adv_metrics(head: Head, model: Model, feats: Features, y: torch.Tensor, val_idx: torch.Tensor, *, eps: float,
                steps: int, precision: str = "fp32") -> dict[str, float]:
    """``val_accuracy_adv`` (``val_miou_adv`` for masks): the held-out score on :func:`pgd` versions of the
    held-out images against the finished head, with the radius and steps it was trained with."""
    assert head.spec is not None
    preds, targets = [], []
    for i in range(0, len(val_idx), 64):
        idx = val_idx[i:i + 64]
        images = pgd(head.net, model, head.spec, _pixels(feats.images[idx], model.device), y[idx], idx, eps=eps,
                     steps=steps, normalize=head.cfg.normalize, precision=precision)
        with torch.no_grad():
            preds.append(head.net(taps_input(model, head.spec, images, idx, normalize=head.cfg.normalize,
                                             precision=precision)).argmax(1))
        targets.append(y[idx])
    pred, target = torch.cat(preds), torch.cat(targets)
    if target.ndim == 3:
        return {"val_miou_adv": miou(pred, target, len(head.cfg.classes))}
    return {"val_accuracy_adv": float((pred == target).float().mean())}


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
