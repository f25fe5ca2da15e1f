"""DDIM and DDPM ancestral samplers as plain functions of (denoiser, x, timesteps, generators).

The samplers run without autograd; guidance wrappers turn gradients back on for their own pass. A *denoiser* is
any callable ``denoiser(x_t, t) -> Prediction`` where ``t`` holds per-image indices into the model's original
schedule (a plain tensor is read as the raw network output: eps, plus learned-variance channels when sigma is
learned). ``models.denoiser`` builds the base denoiser of a model; guidance is a wrapper that takes a denoiser and
returns one (see ``guidance.py``), so the loops below never change.

Randomness is one ``torch.Generator`` per image, seeded with ``seed + index``: image k gets the same noise
whatever the batch size, the device or how the work is split between processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from ddguide.core.diffusion import eps_to_x0, respace_betas, split_output, x0_to_eps


class Prediction(NamedTuple):
    """What a denoiser predicts for x_t: the noise, and the learned-variance values (None when sigma is fixed)."""

    eps: torch.Tensor
    var: torch.Tensor | None = None


Denoiser = Callable[[torch.Tensor, torch.Tensor], "Prediction | torch.Tensor"]
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


def as_prediction(out: Prediction | torch.Tensor, image_channels: int) -> Prediction:
    """A denoiser's answer as a float32 Prediction (a tensor is split into eps and variance channels)."""
    if isinstance(out, Prediction):
        return Prediction(out.eps.float(), None if out.var is None else out.var.float())
    return Prediction(*split_output(out.float(), image_channels))


def _predict(denoiser: Denoiser, x: torch.Tensor, t: int, abar: torch.Tensor, clip: bool):
    """Run the denoiser once: eps, x0_hat (clipped to [-1, 1] when asked, eps made consistent) and variance values."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps, var = as_prediction(denoiser(x, tt), x.shape[1])
    x0 = eps_to_x0(x, tt, eps, abar)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = x0_to_eps(x, tt, x0, abar)
    return eps, x0, var


@dataclass
class Chain:
    """The state of a batch of chains that a step hook may rewrite: the current x_t, the x0_hat that produced it,
    and each chain's noise generator (a particle sampler that resamples chains must move their generators too)."""

    x: torch.Tensor
    x0: torch.Tensor | None
    generators: list[torch.Generator] | None


StepHook = Callable[[int, int, int, Chain], None]  # (step number, t, t_prev, chain), called after each step


class DDIM:
    """DDIM (Song et al. 2021, Eq. 12): ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's posterior
    variance on the kept steps."""

    def __init__(self, abar: torch.Tensor, timesteps: Sequence[int], eta: float = 0.0):
        self.abar, self.eta, self.steps = abar, eta, _steps(timesteps)

    def mean_std(self, chain: Chain, t: int, t_prev: int, eps: torch.Tensor, x0: torch.Tensor,
                 var: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gaussian kernel p(x_{t_prev} | x_t): its mean, and its standard deviation (None: deterministic)."""
        a, a_prev = _abar(self.abar, t).float(), _abar(self.abar, t_prev).float()
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        return mean, sigma if t_prev >= 0 and self.eta > 0 else None

    def step(self, chain: Chain, t: int, t_prev: int, eps: torch.Tensor, x0: torch.Tensor,
             var: torch.Tensor | None) -> torch.Tensor:
        return _draw_kernel(chain, *self.mean_std(chain, t, t_prev, eps, x0, var))


class DDPM:
    """Ancestral sampling on the kept steps (betas respaced as ``1 - abar_k / abar_{k_prev}``).

    With learned sigma the variance interpolates log(beta) and the clipped log posterior variance as in
    Nichol & Dhariwal (Eq. 15); otherwise it is the 'fixed large' choice (beta, first step posterior).
    """

    def __init__(self, abar: torch.Tensor, timesteps: Sequence[int]):
        self.kept = sorted(int(t) for t in timesteps)
        self.steps = _steps(self.kept)
        self.betas = respace_betas(abar, self.kept)  # (K,) float64
        sub = abar[self.kept]
        self.sub, self.sub_prev = sub, torch.cat([torch.ones(1, dtype=sub.dtype), sub[:-1]])
        post_var = self.betas * (1 - self.sub_prev) / (1 - sub)
        self.post_log_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.fixed_large = torch.cat([post_var[1:2], self.betas[1:]])

    def mean_std(self, chain: Chain, t: int, t_prev: int, eps: torch.Tensor, x0: torch.Tensor,
                 var: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gaussian kernel p(x_{t_prev} | x_t): its mean, and its standard deviation (None on the last step)."""
        k, betas, sub, sub_prev = self.kept.index(t), self.betas, self.sub, self.sub_prev
        # posterior mean of q(x_{k-1} | x_k, x0) on the respaced chain
        coef_x0 = betas[k] * sub_prev[k].sqrt() / (1 - sub[k])
        coef_xt = (1 - sub_prev[k]) * (1 - betas[k]).sqrt() / (1 - sub[k])
        mean = coef_x0.float() * x0 + coef_xt.float() * chain.x
        if k == 0:
            return mean, None
        if var is not None:
            frac = (var + 1) / 2
            log_var = frac * torch.log(betas[k]).float() + (1 - frac) * self.post_log_clipped[k].float()
        else:
            log_var = torch.log(self.fixed_large[k]).float()  # a 0-dim tensor: it broadcasts on any device
        return mean, torch.exp(0.5 * log_var)

    def step(self, chain: Chain, t: int, t_prev: int, eps: torch.Tensor, x0: torch.Tensor,
             var: torch.Tensor | None) -> torch.Tensor:
        return _draw_kernel(chain, *self.mean_std(chain, t, t_prev, eps, x0, var))


def _draw_kernel(chain: Chain, mean: torch.Tensor, std: torch.Tensor | None) -> torch.Tensor:
    """A draw from N(mean, std^2), each chain's noise from its own generator (the mean itself when std is None)."""
    if std is None:
        return mean
    return mean + std * per_image_randn(mean.shape[1:], chain.generators, mean.device)


Transition = Any  # DDIM, DDPM, or a wrapper with their step(chain, t, t_prev, eps, x0, var) -> x_{t_prev}


class Segment:
    """Steps ``start`` to ``stop - 1`` of a transition's schedule: a loop run on a segment continues chains that
    an earlier segment left at its last x_t (a search that drops candidates between segments)."""

    def __init__(self, transition: Transition, start: int, stop: int):
        self.transition, self.steps = transition, transition.steps[start:stop]

    def step(self, chain: Chain, t: int, t_prev: int, eps: torch.Tensor, x0: torch.Tensor,
             var: torch.Tensor | None) -> torch.Tensor:
        return self.transition.step(chain, t, t_prev, eps, x0, var)


@torch.no_grad()
def run_chain(denoiser: Denoiser, x: torch.Tensor, transition: Transition, abar: torch.Tensor, *,
              generators: Sequence[torch.Generator] | None = None, clip: bool = True,
              callback: Callback | None = None, after_step: StepHook | None = None) -> torch.Tensor:
    """The one sampling loop: from pure noise ``x`` at the largest kept timestep to images.

    Each step asks the denoiser once, takes the transition, then calls ``after_step`` (where a particle sampler
    reweights and resamples the chains in place) and ``callback`` (progress)."""
    chain = Chain(x, None, None if generators is None else list(generators))
    for i, (t, t_prev) in enumerate(transition.steps):
        eps, x0, var = _predict(denoiser, chain.x, t, abar, clip)
        chain.x, chain.x0 = transition.step(chain, t, t_prev, eps, x0, var), x0
        if after_step:
            after_step(i, t, t_prev, chain)
        if callback:
            callback(i + 1, len(transition.steps))
    return chain.x.detach()


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], abar: torch.Tensor, *,
                eta: float = 0.0, generators: Sequence[torch.Generator] | None = None, clip: bool = True,
                callback: Callback | None = None, after_step: StepHook | None = None) -> torch.Tensor:
    """DDIM from pure noise ``x`` at the largest of ``timesteps`` to an image (see :class:`DDIM`)."""
    if eta > 0 and generators is None:
        raise ValueError("eta > 0 needs per-image generators")
    return run_chain(denoiser, x, DDIM(abar, timesteps, eta), abar, generators=generators, clip=clip,
                     callback=callback, after_step=after_step)


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], abar: torch.Tensor, *,
                generators: Sequence[torch.Generator], clip: bool = True,
                callback: Callback | None = None, after_step: StepHook | None = None) -> torch.Tensor:
    """Ancestral sampling from pure noise ``x`` (see :class:`DDPM`)."""
    return run_chain(denoiser, x, DDPM(abar, timesteps), abar, generators=generators, clip=clip,
                     callback=callback, after_step=after_step)
