"""Particle and search samplers with heads as potentials or verifiers.

Guidance by gradient (Eq. 13) can fool a head instead of producing the attribute; methods that *select* among
samples of the model itself cannot leave the model's distribution. Two families, both built on the one sampling
loop (``sampling.run_chain``):

- **Feynman-Kac steering** (Singhal et al., ICML 2025): K chains (particles) per image. At evaluation steps every
  particle is scored by the reward ``r = sum_g w_g log p_g(y_g | features(x0_hat))`` of the guiding heads, its
  lineage statistic is updated (``max``: running maximum, ``sum``: running sum, ``diff``: the latest reward) and
  its log-weight grows by ``scale * (new statistic - old statistic)``, so the product of the potentials over a
  trajectory is ``exp(scale * final statistic)``. When the effective sample size of an image's particles falls
  below K/2 (or at every evaluation with ``adaptive=False``) they are resampled (systematic resampling). No
  backward pass is needed; with ``--lambda > 0`` the Eq. 13 step is the proposal. At the end the particle with the
  highest final reward is kept.
- **The twisted diffusion sampler** (TDS; Wu et al., NeurIPS 2023): K chains per image whose proposal shifts the
  reverse kernel's mean by ``lambda * sigma_t^2 * grad log p~_t`` (the Eq. 13 direction) with the twist
  ``p~_t(y | x_t) = p(y | features(x0_hat(x_t)))^scale``, weighted by the exact importance ratio
  ``p(x_{t-1} | x_t) p~_{t-1}(y | x_{t-1}) / (q(x_{t-1} | x_t, y) p~_t(y | x_t))``, the last step's twist being the
  heads' p(y | x_0) itself; resampled when the ESS falls below K/2. The image kept is drawn from the final
  weights, so with many particles it is a sample of the model conditioned on the heads.
- **Search over noise** (Ma et al., 2025): ``best-of-n`` draws N candidates and keeps the verifier's best;
  ``zero-order`` then draws N neighbours of the best starting noise on its sphere, a few rounds, keeping the best.
  ``prune`` spends the candidates' compute where it decides: N candidates run the first steps, the verifier
  scores each one's x0_hat at the pruning timesteps and only the best K go on (by default 3/8 of them after 28 %
  of the steps, then the best one after 64 %). Attributes settle early in the reverse process (on the shipped
  model the head's score of x0_hat after 6 of 25 DDIM steps ranks has_red with an AUC of 0.94, main_left 0.92),
  so 8 candidates pruned this way cost about what 4 full samples do.

All randomness of image k (its particles' noise, the resampling draws, the neighbours) comes from generators
seeded by (seed, k), so any batch size or process split gives the same image. Particle 0 of image k uses the
generator of the plain sampler, so K = 1 (or N = 1) is the plain sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ddguide.core.errors import UserError
from ddguide.core.sampling import Chain, Prediction, per_image_randn

POTENTIALS = ("max", "diff", "sum")
SEARCHES = ("best-of-n", "zero-order", "prune")
# --search prune's default schedule: (share of the steps done, share of the candidates kept). Chosen by
# benchmarks/prune_schedule.py on 512
# unguided DDIM-25 samples of the shipped model (seed 50000, not the benchmarks' seeds) by replaying every
# schedule of one or two prunings within 4x an unguided sample's passes on the recorded x0_hat scores: 8 candidates,
# 3 kept after step 7 of 25, 1 after step 16, gave the largest smallest share of the four attributes (has_red
# 0.95, multiple_objects 0.99, has_circle 0.96, main_left 0.97); pruning to one after a quarter of the steps
# served has_red as well (0.99) but main_left worse than best-of-4 (0.79), whose x0_hat ranks late. On the
# benchmarks' own seeds (benchmarks/guidance.py prune-8, 3 x 64): 0.96, 0.99, 0.90 and 0.98.
PRUNE_DEFAULT = ((0.28, 3 / 8), (0.64, 0.0))
_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: spreads (seed, k, j) over the generator seed space


def particle_seed(seed: int, index: int, particle: int, stream: int = 0) -> int:
    """The generator seed of particle ``particle`` of image ``index`` (stream 0: its noise; others: resampling,
    neighbours). Particle 0's noise is the plain sampler's ``seed + index``."""
    if particle == 0 and stream == 0:
        return seed + index
    h = (seed + index) * _MIX + (particle + 1) * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB
    return (h ^ (h >> 31)) % (2**63 - 1)


def particle_generators(seed: int, indices: Sequence[int], k: int, stream: int = 0) -> list[torch.Generator]:
    """Generators of K particles per image, image-major: [(i0, 0), (i0, 1), ..., (i1, 0), ...]."""
    return [torch.Generator().manual_seed(particle_seed(seed, int(i), j, stream)) for i in indices for j in range(k)]


def effective_sample_size(logw: torch.Tensor) -> torch.Tensor:
    """ESS of each row of log-weights (images x particles): (sum w)^2 / sum w^2, in [1, K]."""
    w = torch.softmax(logw, dim=-1)
    return 1.0 / (w**2).sum(dim=-1)


def systematic_resample(logw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Ancestor indices for one image's K particles (systematic resampling: one uniform draw)."""
    k = logw.shape[-1]
    w = torch.softmax(logw.double(), dim=-1)
    u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(k, dtype=torch.float64)) / k
    return torch.searchsorted(torch.cumsum(w, -1), u).clamp(max=k - 1)


@dataclass
class SteeringConfig:
    particles: int = 4
    potential: str = "max"
    scale: float = 1.0  # the potentials are exp(scale * reward statistic)
    every: int = 5  # evaluate (and maybe resample) every this many steps
    window: tuple[int, int] | None = None  # (hi, lo): evaluate only while lo <= t <= hi
    adaptive: bool = True  # resample only when ESS < K/2

    def validate(self, steps: Sequence[int]) -> None:
        if self.particles < 1:
            raise UserError(f"--particles must be >= 1, got {self.particles}")
        if self.potential not in POTENTIALS:
            raise UserError(f"unknown --potential {self.potential!r} ({', '.join(POTENTIALS)})")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise UserError(f"--potential-scale must be a finite number >= 0, got {self.scale}")
        if self.every < 1:
            raise UserError(f"--resample-every must be >= 1, got {self.every}")
        if self.window is not None:
            hi, lo = self.window
            if not hi >= lo >= 0 or not any(lo <= t <= hi for t in steps):
                raise UserError(f"--resample-window {hi} {lo} holds none of the sampler's timesteps "
                                f"({min(steps)}..{max(steps)})")


def prune_schedule(prune_at: Sequence[tuple[int, int]], steps: Sequence[int], candidates: int) -> list[tuple[int, int]]:
    """``--search prune``'s (step number, candidates kept) pairs from ``(timestep T, keep K)`` pairs: after the
    step at the first kept timestep <= T the best K candidates of each image go on. Default
    (:data:`PRUNE_DEFAULT`): the best 3/8 after 28 % of the steps, the best one after 64 %."""
    order = sorted(steps, reverse=True)
    if not prune_at:
        schedule, last_step, last_keep = [], -1, candidates
        for share, keep_share in PRUNE_DEFAULT:
            step = min(max(round(share * len(order)) - 1, last_step + 1), len(order) - 2)
            keep = max(math.ceil(keep_share * candidates), 1)
            if step > last_step and keep < last_keep:
                schedule.append((step, keep))
                last_step, last_keep = step, keep
        return schedule
    schedule, last_step, last_keep = [], -1, candidates
    for t, keep in prune_at:
        step = next((i for i, s in enumerate(order) if s <= t), None)
        if step is None or step >= len(order) - 1:
            raise UserError(f"--prune-at {t}:{keep}: the sampler has no step left after timestep {t} (its "
                            f"timesteps are {order[0]}..{order[-1]}; the last step is scored anyway)")
        if step <= last_step:
            raise UserError(f"--prune-at {t}:{keep}: the pruning timesteps must go from high t to low, each on a "
                            "later step than the one before")
        if not 1 <= keep < last_keep:
            raise UserError(f"--prune-at {t}:{keep}: each pruning must keep fewer candidates than it had "
                            f"({last_keep}) and at least 1")
        schedule.append((step, keep))
        last_step, last_keep = step, keep
    return schedule


class ParticleColumns:
    """The index.csv columns both particle samplers report per image, from their ``cfg.particles``,
    ``resamples`` (per image), ``ess_trace`` (one tensor of per-image ESS per evaluation) and ``chosen()``."""

    def summary(self, b: int) -> dict[str, float | int]:
        """Index columns of image b: particles, resampling count, ESS trace summary, chosen particle."""
        trace = [float(e[b]) for e in self.ess_trace]  # type: ignore[attr-defined]
        k = self.cfg.particles  # type: ignore[attr-defined]
        return {"particles": k, "resampled": int(self.resamples[b]),  # type: ignore[attr-defined]
                "ess_min": round(min(trace), 3) if trace else float(k),
                "ess_mean": round(sum(trace) / len(trace), 3) if trace else float(k),
                "chosen": int(self.chosen()[b])}  # type: ignore[attr-defined]


@dataclass
class Steering(ParticleColumns):
    """Feynman-Kac steering of ``images x K`` chains, run as the sampling loop's ``after_step`` hook.

    ``reward(x0, indices) -> (N,)`` scores x0_hat of every chain (the chains of image k get index k)."""

    cfg: SteeringConfig
    reward: object  # Callable[[Tensor, Sequence[int]], Tensor]
    indices: list[int]  # image index of every chain (each repeated K times)
    resample_gens: list[torch.Generator]  # one per image
    total_steps: int
    stat: torch.Tensor = field(init=False)
    logw: torch.Tensor = field(init=False)
    started: bool = field(init=False, default=False)
    resamples: torch.Tensor = field(init=False)
    ess_trace: list[torch.Tensor] = field(init=False, default_factory=list)
    last_reward: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        n = len(self.indices) // self.cfg.particles
        self.stat = torch.zeros(n, self.cfg.particles, dtype=torch.float64)
        self.logw = torch.zeros_like(self.stat)
        self.resamples = torch.zeros(n, dtype=torch.long)

    def evaluates(self, i: int, t: int) -> bool:
        """Whether step number i (at schedule index t) scores the particles. The last step always does: the
        kept particle is chosen on the final image's reward."""
        if i == self.total_steps - 1:
            return True
        inside = self.cfg.window is None or self.cfg.window[1] <= t <= self.cfg.window[0]
        return inside and (i + 1) % self.cfg.every == 0

    def __call__(self, i: int, t: int, t_prev: int, chain: Chain) -> None:
        if not self.evaluates(i, t):
            return
        final = i == self.total_steps - 1
        x0 = chain.x.clamp(-1, 1) if final else chain.x0
        r = self.reward(x0, self.indices).double().view_as(self.stat).cpu()
        if not bool(torch.isfinite(r).any(dim=1).all()):
            raise UserError("every particle of an image got a NaN or -inf potential: the guiding heads' "
                            "log-probabilities are not finite (check the heads and --potential-scale)")
        r = torch.nan_to_num(r, nan=-math.inf)
        self.last_reward = r
        new = self._statistic(r)
        base = self.stat if self.started else torch.zeros_like(self.stat)
        self.logw = self.logw + self.cfg.scale * torch.nan_to_num(new - base, nan=0.0, neginf=-1e30)
        self.stat, self.started = new, True
        if final:
            return
        ess = effective_sample_size(self.logw)
        self.ess_trace.append(ess)
        k = self.cfg.particles
        for b in range(self.stat.shape[0]):
            if self.cfg.adaptive and ess[b] >= k / 2:
                continue
            parent = systematic_resample(self.logw[b], self.resample_gens[b])
            rows = b * k + parent.to(chain.x.device)
            chain.x[b * k:(b + 1) * k] = chain.x[rows]  # each slot keeps its own noise generator
            self.stat[b] = self.stat[b, parent]
            self.logw[b] = 0.0
            self.resamples[b] += 1

    def _statistic(self, r: torch.Tensor) -> torch.Tensor:
        if not self.started or self.cfg.potential == "diff":
            return r
        if self.cfg.potential == "max":
            return torch.maximum(self.stat, r)
        return self.stat + r  # sum

    def chosen(self) -> torch.Tensor:
        """Per image, the particle kept: the highest reward on the final image."""
        assert self.last_reward is not None
        return self.last_reward.argmax(dim=1)

TwistGradient = Callable[[torch.Tensor, torch.Tensor], tuple[Prediction, torch.Tensor, torch.Tensor]]


@dataclass
class Twisting(ParticleColumns):
    """The twisted diffusion sampler over ``images x K`` chains: a denoiser wrapper that evaluates the twist and its
    gradient at each x_t, and a transition wrapper that weighs, resamples and proposes.

    ``twist(x, t) -> (prediction, log p, grad_x log p)`` is the guides' log-likelihood of x0_hat(x_t) with its
    gradient (``guidance.guidance_gradient``); ``final(x0) -> (N,)`` is their log-likelihood of finished images.
    ``cfg.scale`` is the twist's exponent, ``lam`` the proposal's step (1: TDS's own proposal; the weights are
    exact for any). Per image the weights of its K chains are kept in log space (float64)."""

    cfg: SteeringConfig
    lam: float
    twist: TwistGradient
    final: Callable[[torch.Tensor], torch.Tensor]
    indices: list[int]  # image index of every chain (each repeated K times)
    resample_gens: list[torch.Generator]  # one per image
    logw: torch.Tensor = field(init=False)
    resamples: torch.Tensor = field(init=False)
    ess_trace: list[torch.Tensor] = field(init=False, default_factory=list)
    _at: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None)  # (log twist, its gradient)
    _prev: torch.Tensor | None = field(init=False, default=None)  # the last step's log twist, per chain
    _pending: torch.Tensor | None = field(init=False, default=None)  # log p/q of the last proposal, per chain
    _chosen: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        n = len(self.indices) // self.cfg.particles
        self.logw = torch.zeros(n, self.cfg.particles, dtype=torch.float64)
        self.resamples = torch.zeros(n, dtype=torch.long)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        """The inner prediction at x_t, unchanged; the twist and its gradient are kept for the transition."""
        pred, logp, grad = self.twist(x, t)
        self._at = (torch.nan_to_num(self.cfg.scale * logp.double(), nan=-math.inf).cpu(), self.cfg.scale * grad)
        return pred

    def wrap(self, transition: Any) -> _Twisted:
        return _Twisted(self, transition)

    def _weigh(self, twist: torch.Tensor) -> None:
        """w_t = w_{t+1} * p(x_t | x_{t+1}) p~_t / (q(x_t | x_{t+1}) p~_{t+1}); the first weight is p~_T."""
        if self._prev is None:
            increment = twist
        else:
            increment = twist - self._prev + self._pending
        self.logw = self.logw + torch.nan_to_num(increment, nan=-math.inf).view_as(self.logw)
        if not bool(torch.isfinite(self.logw).any(dim=1).all()):
            raise UserError("every particle of an image has weight 0 (the guiding heads' log-probabilities are "
                            "-inf or NaN): check the heads and --potential-scale")

    def _resample(self, t: int, chain: Chain, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Resample the chains of each image whose ESS is below K/2 (inside the window); ``rows`` (per-chain
        tensors: eps, x0, the twist...) follow their chains."""
        ess = effective_sample_size(self.logw)
        self.ess_trace.append(ess)
        if self.cfg.window is not None and not self.cfg.window[1] <= t <= self.cfg.window[0]:
            return rows
        k, order = self.cfg.particles, torch.arange(len(self.indices))
        for b in range(self.logw.shape[0]):
            if ess[b] >= k / 2:
                continue
            order[b * k:(b + 1) * k] = b * k + systematic_resample(self.logw[b], self.resample_gens[b])
            self.logw[b] = torch.logsumexp(self.logw[b], 0) - math.log(k)  # equal weights, their mean kept
            self.resamples[b] += 1
        if bool((order == torch.arange(len(order))).all()):
            return rows
        chain.x[:] = chain.x[order.to(chain.x.device)]  # each slot keeps its own noise generator
        return [r if r is None else r[order.to(r.device)] for r in rows]

    def chosen(self) -> torch.Tensor:
        """Per image, the particle kept: drawn from the final weights (a sample of the twisted target)."""
        assert self._chosen is not None
        return self._chosen

@dataclass
class _Twisted:
    """A transition under TDS: weigh the chains at x_t, resample, then draw x_{t-1} from the twisted proposal
    ``N(mean + lam sigma^2 grad, sigma^2)`` and keep ``log p/q`` of the draw for the next weight."""

    tds: Twisting
    inner: Any

    @property
    def steps(self) -> list[tuple[int, int]]:
        return self.inner.steps

    def step(self, chain: Chain, t: int, t_prev: int, eps: torch.Tensor, x0: torch.Tensor,
             var: torch.Tensor | None) -> torch.Tensor:
        tds = self.tds
        assert tds._at is not None, "the TDS transition runs after its denoiser"
        twist, grad = tds._at
        tds._weigh(twist)
        eps, x0, var, grad, twist = tds._resample(t, chain, [eps, x0, var, grad, twist])
        mean, std = self.inner.mean_std(chain, t, t_prev, eps, x0, var)
        if std is None:  # the last step is deterministic: p and q agree
            x, pending = mean, torch.zeros_like(twist)
        else:
            z = per_image_randn(mean.shape[1:], chain.generators, mean.device)
            x = mean + tds.lam * std**2 * grad + std * z
            # log N(x; mean, std^2) - log N(x; mean + lam std^2 grad, std^2), summed over each image's pixels
            log_pq = -tds.lam * std * z * grad - 0.5 * (tds.lam * std * grad) ** 2
            pending = log_pq.flatten(1).double().sum(dim=1).cpu()
        tds._prev, tds._pending = twist, pending
        if t_prev < 0:  # w_0 holds the heads' p(y | x_0) itself in place of the last twist
            final = torch.nan_to_num(tds.cfg.scale * tds.final(x.clamp(-1, 1)).double().cpu(), nan=-math.inf)
            tds._weigh(final)
            tds._chosen = torch.stack([torch.multinomial(torch.softmax(w, 0), 1, generator=g)[0]
                                       for w, g in zip(tds.logw, tds.resample_gens)])
        return x


def sphere_neighbours(z: torch.Tensor, step: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One neighbour of noise ``z`` (1, C, H, W) per generator on the sphere of z's radius: the pivot moved by
    ``step`` times a fresh Gaussian direction, then rescaled to the pivot's norm (Ma et al.'s zero-order search)."""
    d = torch.stack([torch.randn(tuple(z.shape[1:]), generator=g) for g in generators]).to(z.device, z.dtype)
    moved = z + step * d
    norm = z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return moved / moved.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * norm
