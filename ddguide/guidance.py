"""Guided denoisers: wrappers that return a denoiser with the same signature, ``(x_t, t) -> out``.

- :func:`classifier_free` — Ho & Salimans: ``eps = (1 + w) eps(x, c) - w eps(x, null)`` (paper §4.2, §5.3).
- :func:`head_guidance` — the paper's Eq. 13 through heads on the model's own features of x0_hat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ddguide.diffusion import eps_to_x0, split_output
from ddguide.errors import UserError
from ddguide.features import FeatureSpec, compute
from ddguide.heads import Head
from ddguide.generate import Plan
from ddguide.models import Model, autocast
from ddguide.sampling import Denoiser


def class_labels(model: Model, classes: Sequence[int | str], indices: Sequence[int]) -> torch.Tensor:
    """Per-image class ids: image k gets ``classes[k % len(classes)]`` (``--class all`` cycles evenly)."""
    null = null_class(model)  # refuses unconditional models
    names = model.classes or []
    ids = []
    for c in classes:
        if isinstance(c, str) and not c.isdigit():
            if c not in names:
                raise UserError(f"class {c!r} is not in the model; it knows {', '.join(names) or 'no class names'}")
            ids.append(names.index(c))
        else:
            ids.append(int(c))
    known = len(names) if names else null
    for i in ids:
        if not 0 <= i < known:
            raise UserError(f"class id {i} is out of range: the model has {known} classes")
    return torch.tensor([ids[k % len(ids)] for k in indices], dtype=torch.long)


def null_class(model: Model) -> int:
    """The label that means 'no class': the last embedding row of a fine-tuned model."""
    if model.net.cfg.num_classes is None:
        raise UserError("--class and --cfg need a class-conditional model (see `ddguide finetune`)")
    return model.net.cfg.num_classes - 1


def classifier_free(model: Model, labels: torch.Tensor, w: float, precision: str = "fp32") -> Denoiser:
    """CFG in one batched pass of 2N images. ``labels`` (N,) is never modified: the null labels are a new
    tensor (the reference code overwrote its label tensor in place)."""
    null = torch.full_like(labels, null_class(model))
    both = torch.cat([labels, null]).to(model.device)  # (2N,)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(x.device, precision):
            out = model(torch.cat([x, x]), torch.cat([t, t]), both[: 2 * len(x)]).float()
        cond, uncond = out.chunk(2)
        eps_c, var = split_output(cond, x.shape[1])
        eps_u, _ = split_output(uncond, x.shape[1])
        eps = (1 + w) * eps_c - w * eps_u
        return eps if var is None else torch.cat([eps, var], dim=1)

    return denoise


def conditional(model: Model, labels: torch.Tensor, precision: str = "fp32") -> Denoiser:
    """The class-conditional model without guidance (w = 0), one pass of N images."""
    labels = labels.to(model.device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(x.device, precision):
            return model(x, t, labels[: len(x)]).float()

    return denoise


def class_sampling(classes: Sequence[str] | None, w: float | None, precision: str) -> Plan | None:
    """The plan for ``sample --class C [--cfg W]`` (None when no class is given).

    ``all`` cycles through every class of the model, so N images cover the classes evenly.
    """
    if not classes:
        if w is not None:
            raise UserError("--cfg needs --class")
        return None

    def chosen(model: Model) -> list[int | str]:
        if list(classes) == ["all"]:
            return list(range(len(model.classes or []) or null_class(model)))
        return list(classes)

    def denoiser_for(model: Model, indices: Sequence[int]) -> Denoiser:
        labels = class_labels(model, chosen(model), indices)
        return classifier_free(model, labels, w, precision) if w else conditional(model, labels, precision)

    def row_info(model: Model, _images: torch.Tensor, indices: Sequence[int]) -> list[dict]:
        labels = class_labels(model, chosen(model), indices).tolist()
        names = model.classes or []
        return [{"class": names[c] if names else c, "guidance": f"cfg:{w or 0}"} for c in labels]

    return Plan(denoiser_for, row_info, check=lambda model: class_labels(model, chosen(model), [0]) and None)


# ------------------------------------------------------------------------------------ guidance by heads


@dataclass
class Guide:
    """One expert of the product: a head, its weight, and the target (a class index, an (H, W) mask, or one
    mask per image (N, H, W))."""

    head: Head
    weight: float
    target: int | torch.Tensor


def _union_specs(guides: Sequence[Guide]) -> list[FeatureSpec]:
    """One spec per (noise, seed) with the union of blocks and timesteps: shared taps are computed once."""
    merged: dict[tuple[str, int], tuple[list[str], list[int]]] = {}
    for g in guides:
        if g.head.spec is None:
            continue
        blocks, times = merged.setdefault((g.head.spec.noise, g.head.spec.seed), ([], []))
        blocks += [b for b in g.head.spec.blocks if b not in blocks]
        times += [t for t in g.head.spec.timesteps if t not in times]
    return [FeatureSpec(tuple(b), tuple(t), noise, seed) for (noise, seed), (b, t) in merged.items()]


def log_likelihood(model: Model, guides: Sequence[Guide], x0: torch.Tensor, indices: Sequence[int],
                   precision: str = "fp32") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum over guides of ``weight * log p(y | features(x0))`` per image, and each guide's p(y).

    For masks the log-likelihood is the sum over pixels of per-pixel log-probabilities (the scale on which the
    paper's lambda = 2e-4 is stated)."""
    taps: dict[str, torch.Tensor] = {}
    with autocast(x0.device, precision):
        for spec in _union_specs(guides):
            taps.update(compute(model, x0, spec, indices))
    taps = {k: v.float() for k, v in taps.items()}  # heads run in fp32 whatever the autocast of the taps
    total = torch.zeros(len(x0), device=x0.device)
    probs = []
    for g in guides:
        logits = g.head(x0 if g.head.reads_pixels else g.head.inputs(taps)).float()  # raw: temperature 1
        logp = F.log_softmax(logits, dim=1)
        if isinstance(g.target, torch.Tensor):  # (H, W) or per-image (N, H, W) masks
            mask = g.target.to(x0.device)
            index = (mask.expand(len(x0), *mask.shape[-2:]) if mask.ndim == 2 else mask).unsqueeze(1)
            per_image = logp.gather(1, index).sum(dim=(1, 2, 3))
            probs.append((logp.argmax(1) == index[:, 0]).float().mean(dim=(1, 2)))  # pixel agreement
        else:
            per_image = logp[:, g.target]
            probs.append(F.softmax(g.head.calibrated(logits.detach()), dim=1)[:, g.target])  # reported: calibrated
        total = total + g.weight * per_image
    return total, probs


CLAMPS = ("pass", "none", "hard")


def head_input(x0: torch.Tensor, clamp: str = "pass") -> torch.Tensor:
    """x0_hat as the head sees it. Eq. 11 can leave [-1, 1] at high noise, where no real image lies.

    ``pass`` (default, chosen by benchmarks/guidance_clamp.py): the head reads x0_hat clamped to [-1, 1] and the
    gradient passes the clamp unchanged (straight-through); ``none``: the head reads x0_hat as Eq. 11 gives it
    (the paper has no clamp); ``hard``: clamped, and the clipped pixels get no gradient."""
    if clamp == "none":
        return x0
    if clamp == "hard":
        return x0.clamp(-1, 1)
    return x0 + (x0.clamp(-1, 1) - x0).detach()


def head_guidance(model: Model, guides: Sequence[Guide], lam: float, indices: Sequence[int], *,
                  grad: str = "full", window: tuple[int, int] | None = None, precision: str = "fp32",
                  clamp: str = "pass") -> Denoiser:
    """Eq. 13: ``eps_hat = eps - lambda * sqrt(1 - abar_t) * grad_{x_t} log p(y | features(x0_hat(x_t)))``.

    ``grad='full'`` differentiates through the denoiser as the paper does; ``grad='x0'`` treats eps as constant,
    so ``d x0_hat / d x_t = 1 / sqrt(abar_t)`` and only the truncated feature pass is differentiated.
    ``window=(hi, lo)`` guides only while ``lo <= t <= hi``. Both modes treat the clamp of x0_hat the same way
    (:func:`head_input`).
    """
    if lam < 0:
        raise UserError(f"--lambda must be >= 0, got {lam}")
    if grad not in ("full", "x0"):
        raise UserError(f"unknown --guide-grad {grad!r} (full, x0)")
    if clamp not in CLAMPS:
        raise ValueError(f"unknown clamp {clamp!r}")
    abar = model.abar

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        a = abar[step].float()
        if lam == 0 or (window is not None and not window[1] <= step <= window[0]):
            with torch.no_grad(), autocast(x.device, precision):
                return model(x, t).float()
        with torch.enable_grad():
            if grad == "full":
                x_in = x.detach().requires_grad_(True)
                with autocast(x.device, precision):
                    out = model(x_in, t).float()
                eps, var = split_output(out, x.shape[1])
                x0 = head_input(eps_to_x0(x_in, t, eps, abar), clamp)  # Eq. 11
                logp, _ = log_likelihood(model, guides, x0, indices, precision)
                (g,) = torch.autograd.grad(logp.sum(), x_in)
            else:
                with torch.no_grad(), autocast(x.device, precision):
                    out = model(x, t).float()
                eps, var = split_output(out, x.shape[1])
                x0 = eps_to_x0(x, t, eps, abar).requires_grad_(True)
                logp, _ = log_likelihood(model, guides, head_input(x0, clamp), indices, precision)
                (g,) = torch.autograd.grad(logp.sum(), x0)
                g = g / a.sqrt()  # chain rule with eps held constant
        eps_hat = eps.detach() - lam * (1 - a).sqrt() * g  # Eq. 13
        return eps_hat if var is None else torch.cat([eps_hat, var.detach()], dim=1)

    return denoise


def parse_guide(text: str) -> tuple[str, float, str | None]:
    """``HEAD[:weight[:target]]`` -> (path, weight, target)."""
    path, _, rest = text.partition(":")
    weight_text, _, target = rest.partition(":")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise UserError(f"--guide {text!r}: the weight after ':' must be a number") from None
    if not math.isfinite(weight):
        raise UserError(f"--guide {text!r}: the weight after ':' must be a finite number")
    return path, weight, target or None


def head_sampling(guides: Sequence[str], target: str | None, mask: str | None, lam: float, grad: str,
                  window: tuple[int, int] | None, precision: str) -> Plan | None:
    """The plan for ``sample --guide HEAD[:weight[:target]] ... (--target Y | --mask PNG) --lambda L``."""
    from ddguide.data import read_mask
    from ddguide.heads import check_compatible, load_head

    if not guides:
        if target is not None or mask is not None or window is not None:
            raise UserError("--target, --mask and --guide-window need at least one --guide HEAD")
        return None
    if lam < 0:
        raise UserError(f"--lambda must be >= 0, got {lam}")
    experts = []
    for text in guides:
        path, weight, own_target = parse_guide(text)
        head = load_head(path)
        if head.cfg.dense:
            if mask is None:
                raise UserError(f"{path}: a segmentation head needs --mask PNG")
            m = torch.from_numpy(read_mask(mask))
            size = head.cfg.image_size
            if tuple(m.shape) != (size, size):
                raise UserError(f"{mask}: mask is {m.shape[1]}x{m.shape[0]}, the head expects {size}x{size}")
            if m.min() < 0 or m.max() >= len(head.cfg.classes):
                raise UserError(f"{mask}: mask ids {int(m.min())}..{int(m.max())} outside the head's "
                                f"0..{len(head.cfg.classes) - 1}")
            experts.append(Guide(head, weight, m.long()))  # (H, W)
        else:  # no target: a two-class head guides towards its positive class
            experts.append(Guide(head, weight, head.target_index(own_target or target)))

    def check(model: Model) -> None:
        for g in experts:
            check_compatible(g.head, model.fingerprint, model.source_path)
            if g.head.cfg.image_size != model.image_size:
                raise UserError(f"{g.head.path}: trained on {g.head.cfg.image_size} px images, the model makes "
                                f"{model.image_size} px")
            if g.head.spec is not None:
                g.head.spec.check(model)
            g.head.to(model.device)

    def denoiser_for(model: Model, indices: Sequence[int]) -> Denoiser:
        return head_guidance(model, experts, lam, indices, grad=grad, window=window, precision=precision)

    def row_info(model: Model, images: torch.Tensor, indices: Sequence[int]) -> list[dict]:
        with torch.no_grad():
            _, probs = log_likelihood(model, experts, images, indices, precision)
        rows = []
        for i in range(len(images)):
            row = {"guidance": f"heads:lambda={lam}:{grad}", "head_prob": round(float(probs[0][i]), 4)}
            row.update({f"head_prob_{k + 1}": round(float(p[i]), 4) for k, p in enumerate(probs[1:], start=1)})
            rows.append(row)
        return rows

    return Plan(denoiser_for, row_info, check)
