"""Guided denoisers: wrappers that take a denoiser and return one with the same signature, ``(x_t, t) -> Prediction``.

- :func:`conditional` and :func:`classifier_free` — a class-conditional model without and with Ho & Salimans'
  guidance, ``eps = (1 + w) eps(x, c) - w eps(x, null)`` (paper §4.2, §5.3), from the base denoiser of
  ``models.denoiser``; :func:`classifier_free_uncond` takes the null branch from an unconditional model;
- :func:`head_guidance` — the paper's Eq. 13 through heads on the model's own features of x0_hat, around any
  inner denoiser (the plain model, or CFG: guided class-conditional sampling is
  ``head_guidance(classifier_free(denoiser(m), y, null, w), m, guides, lam, indices)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ddguide.core.diffusion import eps_to_x0
from ddguide.core.errors import UserError
from ddguide.core.model import LabelledDenoiser, Model
from ddguide.core.runtime import autocast
from ddguide.core.sampling import Denoiser, Prediction, as_prediction
from ddguide.method.features import FeatureSpec, compute
from ddguide.method.heads import Head
from ddguide.method.plugins import PluginGuide


def conditional(base: LabelledDenoiser, labels: torch.Tensor) -> Denoiser:
    """A class-conditional model without guidance (w = 0): one pass of N images with their labels."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> Prediction:
        return base(x, t, labels[: len(x)].to(x.device))

    return denoise


def classifier_free(base: LabelledDenoiser, labels: torch.Tensor, null: int, w: float) -> Denoiser:
    """CFG in one batched pass of 2N images. ``labels`` (N,) is never modified: the null labels are a new
    tensor (the reference code overwrote its label tensor in place)."""
    both = torch.cat([labels, torch.full_like(labels, null)])  # (2N,)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> Prediction:
        n = len(x)
        eps, var = base(torch.cat([x, x]), torch.cat([t, t]), torch.cat([both[:n], both[len(labels):][:n]])
                        .to(x.device))
        eps_c, eps_u = eps.chunk(2)
        return Prediction((1 + w) * eps_c - w * eps_u, None if var is None else var.chunk(2)[0])

    return denoise


def classifier_free_uncond(base: LabelledDenoiser, uncond: LabelledDenoiser, labels: torch.Tensor,
                           w: float) -> Denoiser:
    """CFG whose null branch is another, unconditional model: ``eps = (1 + w) eps(x, c) - w eps_uncond(x)``.

    For class-conditional models trained without a null class (guided-diffusion's ImageNet models), with an
    unconditional model of the same size and schedule; the variance values, when learned, are the conditional
    model's."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> Prediction:
        eps_c, var = base(x, t, labels[: len(x)].to(x.device))
        eps_u = uncond(x, t).eps
        return Prediction((1 + w) * eps_c - w * eps_u, var)

    return denoise


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
        if isinstance(g, PluginGuide) or g.head.spec is None:
            continue
        blocks, times = merged.setdefault((g.head.spec.noise, g.head.spec.seed), ([], []))
        blocks += [b for b in g.head.spec.blocks if b not in blocks]
        times += [t for t in g.head.spec.timesteps if t not in times]
    return [FeatureSpec(tuple(b), tuple(t), noise, seed) for (noise, seed), (b, t) in merged.items()]


def log_likelihood(model: Model, guides: Sequence[Guide | PluginGuide], x0: torch.Tensor, indices: Sequence[int],
                   precision: str = "fp32") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum over guides of ``weight * log p(y | features(x0))`` per image, and each guide's p(y).

    For masks the log-likelihood is the sum over pixels of per-pixel log-probabilities (the scale on which the
    paper's lambda = 2e-4 is stated). A plug-in guide gives its own log p(x0) and, in place of p(y), that value."""
    taps: dict[str, torch.Tensor] = {}
    with autocast(x0.device, precision):
        for spec in _union_specs(guides):
            taps.update(compute(model, x0, spec, indices))
    taps = {k: v.float() for k, v in taps.items()}  # heads run in fp32 whatever the autocast of the taps
    total = torch.zeros(len(x0), device=x0.device)
    probs = []
    for g in guides:
        if isinstance(g, PluginGuide):
            per_image = g.log_p(x0, indices)
            probs.append(per_image.detach())
            total = total + g.weight * per_image
            continue
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


def head_guidance(inner: Denoiser, model: Model, guides: Sequence[Guide | PluginGuide], lam: float,
                  indices: Sequence[int], *, grad: str = "full", window: tuple[int, int] | None = None,
                  precision: str = "fp32", clamp: str = "pass", only: set[int] | None = None,
                  normalize: bool = False) -> Denoiser:
    """Eq. 13 around ``inner``: ``eps_hat = eps - lambda * sqrt(1 - abar_t) * grad_{x_t} log p(y | features(x0_hat))``.

    ``inner`` is any denoiser (the plain model, CFG); ``model`` gives the schedule and the feature taps the heads
    read (under ``precision``). ``grad='full'`` differentiates through ``inner`` as the paper does; ``grad='x0'``
    treats eps as constant, so ``d x0_hat / d x_t = 1 / sqrt(abar_t)`` and only the truncated feature pass is
    differentiated. ``window=(hi, lo)`` guides only while ``lo <= t <= hi``. Both modes treat the clamp of x0_hat
    the same way (:func:`head_input`). ``only`` (a set of timesteps) guides at those steps alone (``--guide-every``).
    ``normalize`` rescales each image's gradient ``grad_{x_t} log p`` to unit RMS over its pixels before lambda
    scales it (``--normalize-grad``), so lambda is a step size whatever the guides' scale. With ``lam = 0`` (or
    outside the window) it is ``inner`` itself.
    """
    if lam < 0:
        raise UserError(f"--lambda must be >= 0, got {lam}")
    if grad not in ("full", "x0"):
        raise UserError(f"unknown --guide-grad {grad!r} (full, x0)")
    if clamp not in CLAMPS:
        raise ValueError(f"unknown clamp {clamp!r}")
    abar = model.abar

    def denoise(x: torch.Tensor, t: torch.Tensor) -> Prediction:
        step = int(t[0])
        if lam == 0 or (window is not None and not window[1] <= step <= window[0]) or (only is not None
                                                                                     and step not in only):
            with torch.no_grad():
                return inner(x, t)
        a = abar[step].float()
        (eps, var), _, g = guidance_gradient(inner, model, guides, x, t, indices, grad=grad, precision=precision,
                                             clamp=clamp)
        if normalize:
            g = g / g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt().clamp(min=1e-12)
        return Prediction(eps - lam * (1 - a).sqrt() * g, var)  # Eq. 13

    return denoise


def guidance_gradient(inner: Denoiser, model: Model, guides: Sequence[Guide | PluginGuide], x: torch.Tensor,
                      t: torch.Tensor, indices: Sequence[int], *, grad: str = "full", precision: str = "fp32",
                      clamp: str = "pass") -> tuple[Prediction, torch.Tensor, torch.Tensor]:
    """``inner``'s prediction at x_t, the guides' ``log p(y | features(x0_hat(x_t)))`` (N,) and its gradient with
    respect to x_t, all detached. ``grad='full'`` differentiates through ``inner``; ``grad='x0'`` holds eps
    constant, so the gradient is the one at x0_hat divided by sqrt(abar_t)."""
    abar = model.abar
    with torch.enable_grad():
        if grad == "full":
            x_in = x.detach().requires_grad_(True)
            eps, var = as_prediction(inner(x_in, t), x.shape[1])
            x0 = head_input(eps_to_x0(x_in, t, eps, abar), clamp)  # Eq. 11
            logp, _ = log_likelihood(model, guides, x0, indices, precision)
            (g,) = torch.autograd.grad(logp.sum(), x_in)
        else:
            with torch.no_grad():
                eps, var = as_prediction(inner(x, t), x.shape[1])
            x0 = eps_to_x0(x, t, eps, abar).requires_grad_(True)
            logp, _ = log_likelihood(model, guides, head_input(x0, clamp), indices, precision)
            (g,) = torch.autograd.grad(logp.sum(), x0)
            g = g / abar[int(t[0])].float().sqrt()  # chain rule with eps held constant
    return Prediction(eps.detach(), None if var is None else var.detach()), logp.detach(), g
