"""DDIM and DDPM ancestral samplers as plain functions of (denoiser, x, timesteps, generators).

Samplers do not touch autograd: callers run them under ``torch.no_grad()`` and guidance wrappers re-enable
gradients for their own pass. A *denoiser* is any callable ``denoiser(x_t, t) -> out`` where ``t`` holds
per-image indices into the model's original schedule and ``out`` is the network output (eps, plus
learned-variance channels when sigma is learned).
Guidance is a wrapper with the same signature (see ``guidance.py``), so the loops below never change.

Randomness is one ``torch.Generator`` per image, seeded with ``seed + index``: image k gets the same noise
whatever the batch size, the device or how the work is split between processes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ddguide.diffusion import eps_to_x0, respace_betas, split_output, x0_to_eps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int], None]  # (steps done, steps total)


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded ``seed + index``."""
    return [torch.Generator().manual_seed(seed + int(i)) for i in indices]


def per_image_randn(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``(len(generators), *shape)``, image k drawn from generator k on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device=device, dtype=dtype)


def _steps(timesteps: Sequence[int]) -> list[tuple[int, int]]:
    """(t, t_prev) pairs from the largest kept timestep down; t_prev = -1 means 'the clean image'."""
    ts = sorted(int(t) for t in timesteps)
    return list(zip(reversed(ts), reversed([-1] + ts[:-1])))


def _abar(abar: torch.Tensor, t: int) -> torch.Tensor:
    return abar[t] if t >= 0 else torch.ones((), dtype=abar.dtype)


def _predict(denoiser: Denoiser, x: torch.Tensor, t: int, abar: torch.Tensor, clip: bool):
    """Run the denoiser once: eps, x0_hat (clipped to [-1, 1] when asked, eps made consistent) and variance values."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps, var = split_output(denoiser(x, tt).float(), x.shape[1])
    x0 = eps_to_x0(x, tt, eps, abar)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = x0_to_eps(x, tt, x0, abar)
    return eps, x0, var


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], abar: torch.Tensor, *,
                eta: float = 0.0, generators: Sequence[torch.Generator] | None = None, clip: bool = True,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) from pure noise ``x`` at the largest of ``timesteps`` to an image.

    ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's posterior variance on the kept steps.
    """
    if eta > 0 and generators is None:
        raise ValueError("eta > 0 needs per-image generators")
    steps = _steps(timesteps)
    for i, (t, t_prev) in enumerate(steps):
        eps, x0, _ = _predict(denoiser, x, t, abar, clip)
        a, a_prev = _abar(abar, t).float(), _abar(abar, t_prev).float()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if t_prev >= 0 and eta > 0:
            x = x + sigma * per_image_randn(x.shape[1:], generators, x.device)
        if callback:
            callback(i + 1, len(steps))
    return x.detach()


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], abar: torch.Tensor, *,
                generators: Sequence[torch.Generator], clip: bool = True,
                callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling on the kept steps (betas respaced as ``1 - abar_k / abar_{k_prev}``).

    With learned sigma the variance interpolates log(beta) and the clipped log posterior variance as in
    Nichol & Dhariwal (Eq. 15); otherwise it is the 'fixed large' choice (beta, first step posterior).
    """
    kept = sorted(int(t) for t in timesteps)
    betas = respace_betas(abar, kept)  # (K,) float64
    sub = abar[kept]
    sub_prev = torch.cat([torch.ones(1, dtype=sub.dtype), sub[:-1]])
    post_var = betas * (1 - sub_prev) / (1 - sub)
    post_log_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    fixed_large = torch.cat([post_var[1:2], betas[1:]])
    steps = _steps(kept)
    for i, (t, _) in enumerate(steps):
        k = kept.index(t)
        eps, x0, var = _predict(denoiser, x, t, abar, clip)
        # posterior mean of q(x_{k-1} | x_k, x0) on the respaced chain
        coef_x0 = betas[k] * sub_prev[k].sqrt() / (1 - sub[k])
        coef_xt = (1 - sub_prev[k]) * (1 - betas[k]).sqrt() / (1 - sub[k])
        mean = coef_x0.float() * x0 + coef_xt.float() * x
        if var is not None:
            frac = (var + 1) / 2
            log_var = frac * torch.log(betas[k]).float() + (1 - frac) * post_log_clipped[k].float()
        else:
            log_var = torch.log(fixed_large[k]).float()  # a 0-dim tensor: it broadcasts on any device
        x = mean
        if k > 0:
            x = x + torch.exp(0.5 * log_var) * per_image_randn(x.shape[1:], generators, x.device)
        if callback:
            callback(i + 1, len(steps))
    return x.detach()
