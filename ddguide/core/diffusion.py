"""Diffusion maths: noise schedules (float64), respacing, q_sample and eps <-> x0 conversions.

Symbols follow the paper: ``abar_t`` is the cumulative product of ``alpha_t = 1 - beta_t`` (Eq. 5:
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ddguide.core.errors import UserError

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class DiffusionConfig:
    """How a model was trained: the number of steps, the beta schedule, and whether its time input was
    rescaled to [0, 1000) (improved-diffusion's ``rescale_timesteps``)."""

    steps: int = 1000
    schedule: str = "linear"
    rescale_timesteps: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown noise schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if self.steps < 1:
            raise UserError(f"diffusion steps must be >= 1, got {self.steps}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network sees for schedule index ``t``."""
        return t.float() * (1000.0 / self.steps) if self.rescale_timesteps else t


def betas(schedule: str, steps: int) -> np.ndarray:
    """Beta schedule in float64. Linear: 1e-4..2e-2 scaled to 1000 steps (DDPM); cosine: Nichol & Dhariwal
    with offset s = 0.008 and betas clipped at 0.999."""
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 2e-2, steps, dtype=np.float64)
    if schedule == "cosine":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                        dtype=np.float64)
    raise UserError(f"unknown noise schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


def alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """``abar_t`` for t = 0..T-1, float64."""
    return torch.from_numpy(np.cumprod(1.0 - betas(cfg.schedule, cfg.steps)))


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Which of the original timesteps to keep, as guided-diffusion's ``space_timesteps`` defines it.

    ``"ddimN"`` keeps every k-th step with the integer stride k that gives exactly N steps
    (``ddim50`` of 1000 -> 0, 20, ..., 980). A plain count ``"N"`` (or a comma list of counts, one per equal
    section) spreads N steps over each section with a fractional stride, keeping both ends (``"250"`` -> ..., 999).
    """
    spacing = str(spacing).strip()
    if spacing.startswith("ddim"):
        desired = int(spacing[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise UserError(f"cannot take exactly {desired} steps with an integer stride from {num_timesteps}")
    try:
        counts = [int(c) for c in spacing.split(",")]
    except ValueError:
        raise UserError(f"bad step spacing {spacing!r} (use a count like 50, 'ddim50', or '10,15,20')") from None
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise UserError(f"cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0  # accumulated, not multiplied, so rounding matches guided-diffusion exactly
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def sampling_timesteps(num_timesteps: int, steps: int, sampler: str) -> list[int]:
    """The kept timesteps of a ``steps``-step sampler: DDIM takes guided-diffusion's integer stride when one gives
    exactly ``steps``, else (and for DDPM) the fractional spacing that keeps both ends."""
    if steps > num_timesteps:
        raise UserError(f"--steps {steps} exceeds the model's {num_timesteps} diffusion steps")
    if sampler == "ddim":
        try:
            return space_timesteps(num_timesteps, f"ddim{steps}")
        except UserError:
            pass
    return space_timesteps(num_timesteps, str(steps))


def respace_betas(abar: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Betas of the shortened chain that visits only ``kept`` steps: ``1 - abar_k / abar_{k_prev}``."""
    sub = abar[kept]
    prev = torch.cat([torch.ones(1, dtype=sub.dtype), sub[:-1]])
    return 1 - sub / prev


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Eq. 5: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = _per_image(abar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def eps_to_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Eq. 11: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = _per_image(abar, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_to_eps(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    a = _per_image(abar, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def split_output(out: torch.Tensor, image_channels: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a network output into eps and the learned-variance values (None when sigma is not learned)."""
    if out.shape[1] == 2 * image_channels:
        return out[:, :image_channels], out[:, image_channels:]
    return out, None


def _per_image(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a float64 schedule at per-image timesteps and shape it (N, 1, 1, 1) in ``like``'s dtype."""
    v = values.to(like.device)[t.to(like.device)]
    return v.to(torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype).view(-1, 1, 1, 1)
