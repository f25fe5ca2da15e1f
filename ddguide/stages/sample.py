"""`ddguide sample`: images from a model — unconditional, guided by heads, class-conditional with or without CFG,
with or without a rejection head — written as a samples folder (PNGs, index.csv, grid.png).

One loop serves every mode. For each batch it builds the denoiser by composition (the base denoiser of the model,
wrapped by CFG, wrapped by head guidance), runs the sampler, and asks the accept test (rejection) which images
to keep (:func:`batches`, which writes nothing: :func:`sample` writes what it yields, :func:`generate` returns
it for the Python API). Image k is drawn with generator ``seed + k`` (see ``sampling.py``), so any batch size or
split of the work gives the same images; with rejection, the batch schedule (which class each draw is for) follows
the per-class quotas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ddguide.core.data import read_mask, to_uint8
from ddguide.core.defaults import GUIDE_FLOOR
from ddguide.core.diffusion import sampling_timesteps
from ddguide.core.errors import UserError
from ddguide.core.model import Model, denoiser, load_model
from ddguide.core.outputs import samples_folder, staged_folder
from ddguide.core.runtime import Shard, resolve_device, resolve_shard
from ddguide.core.samples import (
    GRID,
    GRID_IMAGES,
    image_name,
    merge_shards,
    part_name,
    write_grid,
    write_index,
    write_png,
)
from ddguide.core.sampling import (
    DDIM,
    DDPM,
    Chain,
    Denoiser,
    Segment,
    StepHook,
    Transition,
    image_generators,
    per_image_randn,
    run_chain,
)
from ddguide.method.guidance import (
    Guide,
    classifier_free,
    classifier_free_uncond,
    conditional,
    guidance_gradient,
    head_guidance,
    head_input,
    log_likelihood,
)
from ddguide.method.heads import check_compatible, load_head
from ddguide.method.particles import (
    SEARCHES,
    Steering,
    SteeringConfig,
    Twisting,
    particle_generators,
    particle_seed,
    prune_schedule,
    sphere_neighbours,
)
from ddguide.method.plugins import PluginGuide, as_plugin, guide_weight, is_plugin_spec, load_plugin
from ddguide.method.rejection import Rejector, check_threshold

SAMPLERS = ("ddim", "ddpm")
SMC = ("fk", "tds")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GUIDE_GRADS = ("full", "x0")
Progress = Callable[[int, int], None]


@dataclass
class RejectSpec:
    """``--reject HEAD``: keep a draw of class c when the head (on the unconditional model's features) gives
    p(c) >= threshold; draw until every class has its quota."""

    head: str
    threshold: float = 0.2
    model: str | None = None  # the unconditional model the head reads (default: the shipped one)
    max_draws: int = 50  # per accepted image, before giving up on a class


@dataclass
class SampleConfig:
    out: str
    model: str | None = None
    n: int = 16  # images (with rejection: accepted images per class)
    steps: int = 50
    sampler: str = "ddpm"  # measured best on the shipped model at 50 steps (README model card)
    eta: float | None = None  # DDIM eta (None: 0, or 1 for particle samplers, which need stochastic steps)
    seed: int = 0
    batch: int = 16
    device: str = "auto"
    precision: str = "fp32"
    start: int = 0  # first image index
    guides: list[Any] = field(default_factory=list)  # HEAD[:weight[:target]], module:function[:weight], callables
    target: str | None = None
    mask: str | None = None
    lam: float = 1.0
    guide_grad: str = "full"
    guide_window: tuple[int, int] | None = None
    guide_model: str | None = None  # the model whose features the heads read (default: --model)
    classes: list[str] = field(default_factory=list)  # names or ids; ["all"] cycles through every class
    cfg_scale: float | None = None
    cfg_uncond: str | None = None  # an unconditional model whose eps is CFG's null branch (models without a null class)
    reject: RejectSpec | None = None
    guide_every: int = 1  # guide every k-th sampling step
    particles: int = 1  # K chains per image (Feynman-Kac steering when K > 1)
    smc: str | None = None  # "fk" or "tds"
    potential: str = "max"
    potential_scale: float = 1.0
    resample_every: int = 5
    resample_window: tuple[int, int] | None = None
    adaptive: bool = True
    search: str | None = None  # "best-of-n", "zero-order" or "prune"
    candidates: int = 4  # N
    rounds: int = 2  # zero-order rounds after the first N candidates
    search_step: float = 0.5
    prune_at: list[tuple[int, int]] = field(default_factory=list)  # (T, K): --search prune keeps K after timestep T
    verifier: list[Any] = field(default_factory=list)  # like guides (default: the guides)
    normalize_grad: bool = False  # rescale each image's guidance gradient to unit RMS before lambda
    shard: str | None = None  # "i/n": this process draws the i-th of n consecutive slices of the images

    def validate(self) -> None:
        """Every option on its own and in combination, before any file is read."""
        if self.n < 1 or self.batch < 1 or self.steps < 1:
            raise UserError("--num-images, --batch and --steps must be >= 1")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise UserError(f"--eta must be in [0, 1], got {self.eta}")
        self._validate_selection()
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r} ({', '.join(PRECISIONS)})")
        if self.reject is not None:
            check_threshold(self.reject.threshold)
            if self.shard is not None:
                raise UserError("--reject runs in one process (its draws depend on what was accepted): give no "
                                "--shard")
        elif self.cfg_scale is not None and not self.classes:
            raise UserError("--cfg needs --class")
        if self.cfg_uncond is not None and not self.cfg_scale:
            raise UserError("--cfg-uncond is the null branch of classifier-free guidance: give --cfg W too")
        if not self.guides:
            if (self.target, self.mask, self.guide_window, self.guide_model) != (None,) * 4 or self.normalize_grad:
                raise UserError("--target, --mask, --guide-window, --guide-model and --normalize-grad need at least "
                                "one --guide HEAD")
            return
        if self.lam < 0:
            raise UserError(f"--lambda must be >= 0, got {self.lam}")
        if self.guide_grad not in GUIDE_GRADS:
            raise UserError(f"unknown --guide-grad {self.guide_grad!r} (full, x0)")
        for spec in self.guides:
            check_guide_spec(spec)

    def _validate_selection(self) -> None:
        """Particle and search options: counts, names, and a head to score with."""
        if self.guide_every < 1:
            raise UserError(f"--guide-every must be >= 1, got {self.guide_every}")
        if self.particles < 1:
            raise UserError(f"--particles must be >= 1, got {self.particles}")
        if self.smc not in (None, *SMC):
            raise UserError(f"unknown --smc {self.smc!r} (choose from {', '.join(SMC)})")
        if self.search not in (None, *SEARCHES):
            raise UserError(f"unknown --search {self.search!r} (choose from {', '.join(SEARCHES)})")
        if self.search and self.selecting:
            raise UserError("--search and --particles/--smc are two ways to select samples: choose one")
        if self.search and (self.candidates < 1 or self.rounds < 0 or not 0 < self.search_step <= 10):
            raise UserError("--candidates must be >= 1, --rounds >= 0 and --search-step in (0, 10]")
        if self.prune_at and self.search != "prune":
            raise UserError("--prune-at is the schedule of --search prune: give --search prune")
        if any(k < 1 or t < 0 for t, k in self.prune_at):
            raise UserError("--prune-at takes T:K pairs with a timestep T >= 0 and K >= 1 candidates kept")
        if (self.search or self.selecting) and not (self.verifier or self.guides):
            raise UserError("--search and --particles need a head to score with: --guide HEAD or --verifier HEAD")
        if self.verifier and not (self.search or self.selecting):
            raise UserError("--verifier scores candidates or particles: give --search or --particles")
        if self.smc == "tds":
            self._validate_tds()
        for spec in self.verifier:
            check_guide_spec(spec)

    @property
    def selecting(self) -> bool:
        """Whether particles are steered (K > 1 or --smc fk)."""
        return self.particles > 1 or self.smc is not None

    def _validate_tds(self) -> None:
        """TDS twists with the guides' gradient and weighs by a stochastic kernel's density."""
        if not self.guides:
            raise UserError("--smc tds twists the sampler with the --guide heads (differentiable): give --guide HEAD")
        if self.verifier:
            raise UserError("--smc tds weighs its particles by the --guide heads, its twist; --verifier is for "
                            "--smc fk and --search")
        if self.sampler == "ddim" and self.eta == 0:
            raise UserError("--smc tds needs a stochastic sampler (its weights are ratios of the kernel's "
                            "densities): --sampler ddpm, or --eta > 0 with ddim")
        if self.guide_every > 1 or self.guide_window is not None or self.normalize_grad:
            raise UserError("--guide-every, --guide-window and --normalize-grad do not apply to --smc tds (its "
                            "twist is evaluated at every step and its weights need the plain gradient)")

    @property
    def eta_value(self) -> float:
        return self.eta if self.eta is not None else (1.0 if self.selecting and self.sampler == "ddim" else 0.0)

    @property
    def wanted(self) -> list[str]:
        """The classes asked for (rejection samples every class when none is named)."""
        return list(self.classes) or (["all"] if self.reject is not None else [])


@dataclass
class SampleResult:
    out: Path
    kept: int  # images written
    total: int  # images drawn
    per_class: dict[str, tuple[int, int]] | None = None  # with rejection: class -> (accepted, drawn)
    kept_images: Generated | None = None  # with keep=True: the written images in memory too
    joined: bool = True  # a shard: whether index.csv and grid.png now cover every shard's images


# ------------------------------------------------------------------------------------------- the options


def parse_guide(text: str) -> tuple[str, float, str | None]:
    """``HEAD[:weight[:target]]`` -> (path, weight, target)."""
    path, _, rest = text.partition(":")
    weight_text, _, target = rest.partition(":")
    return path, guide_weight(weight_text, text, "':'"), target or None


def check_guide_spec(spec: Any) -> None:
    """A guide's spec on its own, before any file is read: a head's weight, or a plug-in's shape of spec."""
    if not isinstance(spec, str):
        as_plugin(spec)
    elif not is_plugin_spec(spec):
        parse_guide(spec)


def load_guides(cfg: SampleConfig, specs: Sequence[Any] | None = None) -> list[Guide | PluginGuide]:
    """The heads of ``--guide`` (or ``specs``), each with its weight and target (a class, or the ``--mask`` of a
    segmentation head), and the plug-in guides (``module:function`` specs, or callables from Python)."""
    experts: list[Guide | PluginGuide] = []
    for text in cfg.guides if specs is None else specs:
        if not isinstance(text, str) or is_plugin_spec(text):
            experts.append(as_plugin(text) if not isinstance(text, str) else load_plugin(text))
            continue
        path, weight, own_target = parse_guide(text)
        head = load_head(path)
        if head.cfg.dense:
            experts.append(Guide(head, weight, _mask_target(cfg.mask, path, head.cfg.image_size,
                                                            len(head.cfg.classes))))
        else:  # no target: a two-class head guides towards its positive class
            experts.append(Guide(head, weight, head.target_index(own_target or cfg.target)))
    return experts


def _mask_target(mask: str | None, head_path: str, size: int, classes: int) -> torch.Tensor:
    if mask is None:
        raise UserError(f"{head_path}: a segmentation head needs --mask PNG")
    m = torch.from_numpy(read_mask(mask))
    if tuple(m.shape) != (size, size):
        raise UserError(f"{mask}: mask is {m.shape[1]}x{m.shape[0]}, the head expects {size}x{size}")
    if m.min() < 0 or m.max() >= classes:
        raise UserError(f"{mask}: mask ids {int(m.min())}..{int(m.max())} outside the head's 0..{classes - 1}")
    return m.long()  # (H, W)


def check_guides(guides: Sequence[Guide | PluginGuide], model: Model, sampled: Model | None = None) -> None:
    """Every head must read ``model``'s features at its size; ``sampled`` (when another model is sampled, e.g. a
    class-conditional one) must share its schedule and size, since the heads read its x0_hat."""
    if sampled is not None and sampled is not model:
        if not torch.equal(sampled.abar, model.abar) or sampled.image_size != model.image_size:
            raise UserError(f"{model.source_path}: --guide-model must have the sampled model's diffusion schedule "
                            f"and image size ({sampled.image_size} px)")
    for g in guides:
        if isinstance(g, PluginGuide):  # reads x0_hat itself, on the sampled model's device
            continue
        lineage = model.info.get("finetuned_from")
        if not g.head.reads_pixels and g.head.fingerprint == lineage and g.head.fingerprint != model.fingerprint:
            raise UserError(f"{g.head.path}: reads the features of model {lineage}, which {model.source_path} was "
                            f"fine-tuned from; pass that model with --guide-model")
        check_compatible(g.head, model.fingerprint, model.source_path, model.net.cfg.in_channels)
        if g.head.cfg.image_size != model.image_size:
            raise UserError(f"{g.head.path}: trained on {g.head.cfg.image_size} px images, the model makes "
                            f"{model.image_size} px")
        if g.head.spec is not None:
            g.head.spec.check(model)
        g.head.to(model.device)


def null_class(model: Model) -> int | None:
    """The label that means 'no class': the last embedding row of a fine-tuned model; None for a model without
    one (a converted guided-diffusion model, whose last row is a real class)."""
    if model.labels is None:
        raise UserError("--class and --cfg need a class-conditional model (see `ddguide finetune`)")
    return model.null_label


def class_ids(model: Model, classes: Sequence[str]) -> list[int]:
    """Class names or ids -> ids (``all``: every class of the model, in order)."""
    null_class(model)  # refuses unconditional models
    names = model.classes or []
    count = model.num_classes or 0  # the null row, when there is one, is no class to draw
    if list(classes) == ["all"]:
        return list(range(len(names) or count))
    ids = []
    for c in classes:
        if isinstance(c, str) and not c.isdigit():
            if c not in names:
                raise UserError(f"class {c!r} is not in the model; it knows {', '.join(names) or 'no class names'}")
            ids.append(names.index(c))
        else:
            ids.append(int(c))
    known = len(names) if names else count
    for i in ids:
        if not 0 <= i < known:
            raise UserError(f"class id {i} is out of range: the model has {known} classes")
    return ids


def class_name(model: Model, c: int) -> str | int:
    return model.classes[c] if model.classes else c


def default_guide_window(model: Model) -> tuple[int, int]:
    """Where `sample` guides without --guide-window: (T - 1, GUIDE_FLOOR * T), i.e. t >= 200 of 1000 steps
    (:data:`ddguide.core.defaults.GUIDE_FLOOR`)."""
    steps = model.diffusion.steps
    return steps - 1, int(round(GUIDE_FLOOR * steps))


def timesteps_for(model: Model, steps: int, sampler: str) -> list[int]:
    """Kept timesteps: DDIM uses guided-diffusion's integer stride when it fits, else the fractional spacing."""
    return sampling_timesteps(model.diffusion.steps, steps, sampler)


# ------------------------------------------------------------------------------------------- drawing


def check_finite_images(x: torch.Tensor, indices: Sequence[int]) -> None:
    """A sampling step that gave NaN or inf stops the run (before any of its images is written)."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"sampling gave NaN or infinite values (images {indices[0]}..{indices[-1]}): the guidance "
                        "scale (--lambda, --cfg or a --guide weight) is likely too large, or the model's or a head's "
                        "weights are broken; no image was written")


def draw(model: Model, den: Denoiser, indices: Sequence[int], seed: int, steps: Sequence[int],
         sampler: str = "ddim", eta: float = 0.0, callback: Callable[[int, int], None] | None = None,
         after_step: StepHook | None = None, generators: list[torch.Generator] | None = None,
         x: torch.Tensor | None = None, wrap: Callable[[Transition], Transition] | None = None) -> torch.Tensor:
    """Sample the images with the given indices; returns float (N, C, H, W) in [-1, 1]. ``generators`` (one per
    chain; default: image k's ``seed + k``) draw the starting noise unless ``x`` gives it, and the steps' noise.
    ``wrap`` wraps the sampler's transition (the twisted diffusion sampler weighs and proposes there)."""
    gens = generators if generators is not None else image_generators(seed, indices)
    size = model.image_size
    if x is None:
        x = per_image_randn((model.net.cfg.in_channels, size, size), gens, model.device)
    transition = DDIM(model.abar, steps, eta) if sampler == "ddim" else DDPM(model.abar, steps)
    return run_chain(den, x, wrap(transition) if wrap else transition, model.abar, generators=gens,
                     callback=callback, after_step=after_step)


def plain_denoiser(model: Model, precision: str = "fp32") -> Denoiser:
    """The unconditional model as a denoiser."""
    base = denoiser(model, precision=precision)
    return lambda x, t: base(x, t)


@dataclass
class Sampling:
    """Everything the loop needs once the files are read: the model, the composition of denoisers for a batch,
    what each image's index row reports, and the accept test."""

    cfg: SampleConfig
    model: Model
    guides: list[Guide | PluginGuide]
    features: Model  # the model whose features the heads read (``model`` unless --guide-model)
    ids: list[int] | None  # the chosen class ids (None: unconditional model)
    uncond: Model | None = None  # CFG's null branch when it is another model (--cfg-uncond)
    rejector: Rejector | None = None
    targets: dict[int, int] = field(default_factory=dict)  # class id -> rejection head's class index
    verifiers: list[Guide | PluginGuide] = field(default_factory=list)  # scores particles, candidates (default: guides)
    steps: list[int] = field(default_factory=list)  # the sampler's kept timesteps
    prune: list[tuple[int, int]] = field(default_factory=list)  # --search prune: (step number, candidates kept)

    def denoiser_for(self, labels: torch.Tensor | None, indices: Sequence[int]) -> Denoiser:
        """The base denoiser, then CFG (when classes are sampled), then head guidance (when heads guide)."""
        cfg, model = self.cfg, self.model
        base = denoiser(model, precision=cfg.precision)
        if labels is None:
            den: Denoiser = lambda x, t: base(x, t)  # noqa: E731
        elif cfg.cfg_scale and self.uncond is not None:
            den = classifier_free_uncond(base, denoiser(self.uncond, precision=cfg.precision), labels, cfg.cfg_scale)
        elif cfg.cfg_scale:
            den = classifier_free(base, labels, null_class(model), cfg.cfg_scale)  # type: ignore[arg-type]
        else:
            den = conditional(base, labels)
        if self.guides and cfg.smc != "tds":  # TDS shifts the kernel's mean itself (method.particles.Twisting)
            guided = set(sorted(self.steps, reverse=True)[::cfg.guide_every]) if cfg.guide_every > 1 else None
            den = head_guidance(den, self.features, self.guides, cfg.lam, indices, grad=cfg.guide_grad,
                                window=cfg.guide_window or default_guide_window(model), precision=cfg.precision,
                                only=guided,
                                normalize=cfg.normalize_grad)
        return den

    # -- drawing a batch: plain, steered particles, or a search over noise ----------------------------------

    def draw_batch(self, indices: list[int], labels: list[int] | None,
                   callback: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The batch's images (float, [-1, 1]) and the index columns the selection adds."""
        cfg = self.cfg
        if cfg.search:
            return self._search(indices, labels)
        k = cfg.particles if cfg.selecting else 1
        chains, den = self._chains(indices, labels, k)
        if not cfg.selecting:
            return self._draw(den, chains, None, callback), [{} for _ in indices]
        if cfg.smc == "tds":
            return self._twisted(den, indices, chains, callback)
        steering = Steering(SteeringConfig(k, cfg.potential, cfg.potential_scale, cfg.resample_every,
                                           cfg.resample_window, cfg.adaptive), self.reward, chains,
                            [torch.Generator().manual_seed(particle_seed(cfg.seed, i, 0, stream=1)) for i in indices],
                            len(self.steps))
        x = self._draw(den, chains, particle_generators(cfg.seed, indices, k), callback, after_step=steering)
        chosen = steering.chosen()
        picked = torch.stack([x[b * k + int(chosen[b])] for b in range(len(indices))])
        return picked, [steering.summary(b) for b in range(len(indices))]

    def _twisted(self, den: Denoiser, indices: list[int], chains: list[int],
                 callback: Callable[[int, int], None] | None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The twisted diffusion sampler: K chains per image, the image drawn from their final weights."""
        cfg, k = self.cfg, self.cfg.particles

        def twist(x: torch.Tensor, t: torch.Tensor):
            return guidance_gradient(den, self.features, self.guides, x, t, chains, grad=cfg.guide_grad,
                                     precision=cfg.precision)

        def final(x0: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return log_likelihood(self.features, self.guides, head_input(x0), chains, cfg.precision)[0]

        tds = Twisting(SteeringConfig(k, scale=cfg.potential_scale, window=cfg.resample_window), cfg.lam, twist,
                       final, chains, [torch.Generator().manual_seed(particle_seed(cfg.seed, i, 0, stream=1))
                                       for i in indices])
        x = self._draw(tds.denoiser, chains, particle_generators(cfg.seed, indices, k), callback, wrap=tds.wrap)
        chosen = tds.chosen()
        picked = torch.stack([x[b * k + int(chosen[b])] for b in range(len(indices))])
        return picked, [tds.summary(b) for b in range(len(indices))]

    def _chains(self, indices: list[int], labels: list[int] | None, k: int) -> tuple[list[int], Denoiser]:
        """Image indices of k chains per image (image-major) and the denoiser composed for them."""
        chains = [i for i in indices for _ in range(k)]
        repeated = None if labels is None else torch.tensor([c for c in labels for _ in range(k)])
        return chains, self.denoiser_for(repeated, chains)

    def _draw(self, den: Denoiser, chains: list[int], generators: list[torch.Generator] | None,
              callback: Callable[[int, int], None] | None = None, after_step: StepHook | None = None,
              x: torch.Tensor | None = None, wrap: Callable[[Transition], Transition] | None = None) -> torch.Tensor:
        cfg = self.cfg
        return draw(self.model, den, chains, cfg.seed, self.steps, cfg.sampler, cfg.eta_value, callback, after_step,
                    generators, x, wrap)

    def reward(self, x0: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """sum_g w_g log p_g(y_g | features(x0)) of the verifiers: the potential of particles and candidates."""
        with torch.no_grad():
            total, _ = log_likelihood(self.features, self.verifiers, head_input(x0), indices, self.cfg.precision)
        return total

    def _search(self, indices: list[int], labels: list[int] | None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Best of N candidates per image, then (zero-order) rounds of N neighbours of the best starting noise."""
        cfg, n, b = self.cfg, self.cfg.candidates, len(indices)
        if cfg.search == "prune":
            return self._pruned(indices, labels)
        chains, den = self._chains(indices, labels, n)
        noise, _ = self._candidates(indices, n)
        rounds = cfg.rounds if cfg.search == "zero-order" else 0
        best_x = best_z = None
        best_score = torch.full((b,), -math.inf, dtype=torch.float64)
        chosen = [""] * b
        image = torch.arange(b)
        for rnd in range(rounds + 1):
            if rnd:  # neighbours of each image's best noise so far
                noise = torch.cat([sphere_neighbours(best_z[j:j + 1], cfg.search_step,  # type: ignore[index]
                                                     particle_generators(cfg.seed, [indices[j]], n, stream=1 + rnd))
                                   for j in range(b)])
            steps_gens = particle_generators(cfg.seed, indices, n, stream=100 + rnd)  # the steps' noise (eta > 0)
            x = self._draw(den, chains, steps_gens, x=noise)
            score = self.reward(x.clamp(-1, 1), chains).view(b, n).double().cpu()
            score = torch.nan_to_num(score, nan=-math.inf)
            top = score.argmax(dim=1)
            rows, top_score = image * n + top, score[image, top]
            better = top_score > best_score
            if best_x is None:
                best_x, best_z = x[rows].clone(), noise[rows].clone()
            best_x[better], best_z[better] = x[rows][better], noise[rows][better]
            best_score = torch.where(better, top_score, best_score)
            chosen = [f"{rnd}:{int(top[j])}" if better[j] else chosen[j] for j in range(b)]
        if not bool(torch.isfinite(best_score).all()):
            raise UserError("the verifier gave no candidate a finite score (NaN or -inf log-probabilities)")
        extra = [{"candidates": n * (rounds + 1), "chosen": chosen[j], "verifier_logp": round(float(best_score[j]), 4)}
                 for j in range(b)]
        return best_x, extra  # type: ignore[return-value]

    def _candidates(self, indices: list[int], n: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The starting noise of n search candidates per image (image-major) and their generators."""
        gens = particle_generators(self.cfg.seed, indices, n)
        size = self.model.image_size
        return per_image_randn((self.model.net.cfg.in_channels, size, size), gens, self.model.device), gens

    def _pruned(self, indices: list[int], labels: list[int] | None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """N candidates per image (those of best-of-n); after each pruning step the verifier scores the live
        candidates' x0_hat and each image's best K go on; the best final image is kept."""
        n, b = self.cfg.candidates, len(indices)
        x, gens = self._candidates(indices, n)
        alive = torch.arange(n).repeat(b, 1)  # (images, live candidates): candidate numbers
        start = 0
        for stop, keep in [(step + 1, k) for step, k in self.prune] + [(len(self.steps), 0)]:
            m = alive.shape[1]
            chains, den = self._chains(indices, labels, m)
            live = [gens[j * n + int(c)] for j in range(b) for c in alive[j]]
            seen: dict[str, torch.Tensor] = {}

            def keep_x0(i: int, t: int, t_prev: int, chain: Chain, last: int = stop - start - 1) -> None:
                if i == last:
                    seen["x0"] = chain.x0  # type: ignore[assignment]

            x = self._draw(den, chains, live, x=x, after_step=keep_x0,
                           wrap=lambda transition, a=start, z=stop: Segment(transition, a, z))
            scored = x.clamp(-1, 1) if not keep else seen["x0"].clamp(-1, 1)
            score = torch.nan_to_num(self.reward(scored, chains).view(b, m).double().cpu(), nan=-math.inf)
            if not bool(torch.isfinite(score).any(dim=1).all()):
                raise UserError("the verifier gave no candidate a finite score (NaN or -inf log-probabilities)")
            best = score.argsort(dim=1, descending=True, stable=True)[:, :max(keep, 1)]
            rows = (torch.arange(b).unsqueeze(1) * m + best).flatten()
            x, alive, start = x[rows.to(x.device)], alive.gather(1, best), stop
        top = score.gather(1, best)[:, 0]
        extra = [{"candidates": n, "chosen": int(alive[j, 0]), "verifier_logp": round(float(top[j]), 4)}
                 for j in range(b)]
        return x, extra

    def rows(self, x: torch.Tensor, labels: list[int] | None, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Index columns beyond file/index/seed: class, guidance, head probabilities."""
        cfg = self.cfg
        tags = ([f"cfg:{cfg.cfg_scale or 0}"] if labels is not None else []) + (
            [("tds" if cfg.smc == "tds" else "heads") + f":lambda={cfg.lam}:{cfg.guide_grad}"
             + (":unit" if cfg.normalize_grad else "")]
            if self.guides else [])  # TDS: lambda scales its proposal's shift, eps itself is not changed
        rows: list[dict[str, Any]] = [{} for _ in indices]
        if labels is not None:
            for row, c in zip(rows, labels):
                row["class"] = class_name(self.model, c)
        if tags:
            for row in rows:
                row["guidance"] = "+".join(tags)
        if self.guides:
            with torch.no_grad():
                _, probs = log_likelihood(self.features, self.guides, x, indices, cfg.precision)
            names = [("guide_logp" if isinstance(g, PluginGuide) else "head_prob") + (f"_{k + 1}" if k else "")
                     for k, g in enumerate(self.guides)]  # a plug-in reports its log p, a head its p(y)
            for i, row in enumerate(rows):
                row.update({name: round(float(p[i]), 4) for name, p in zip(names, probs)})
        return rows

    def accept(self, images: np.ndarray, labels: list[int] | None, indices: Sequence[int]) -> list[float] | None:
        """The rejection head's p(class) of each image (None: every image is kept)."""
        if self.rejector is None or labels is None:
            return None
        return self.rejector.probabilities(images, [self.targets[c] for c in labels], indices).tolist()


def prepare(cfg: SampleConfig, model: Model | None = None) -> Sampling:
    """Read and cross-check every file the options name (heads, masks, models) before anything is written;
    ``model`` (already loaded, from Python) is sampled in place of ``cfg.model``."""
    cfg.validate()
    guides = load_guides(cfg)
    device = model.device if model is not None and cfg.device == "auto" else resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.model, device)
    model = model.to(device).requires_grad_(False)  # guidance needs input gradients only
    features = model
    if cfg.guide_model or _read_the_shipped_parent(guides, model):
        features = load_model(cfg.guide_model, device).requires_grad_(False)
    check_guides(guides, features, model)
    wanted = cfg.wanted
    ids = class_ids(model, wanted) if wanted else None
    sampling = Sampling(cfg, model, guides, features, ids, steps=timesteps_for(model, cfg.steps, cfg.sampler))
    if cfg.cfg_scale and ids is not None:
        sampling.uncond = _cfg_uncond(cfg, model, device)
    if cfg.verifier:
        sampling.verifiers = load_guides(cfg, cfg.verifier)
        check_guides(sampling.verifiers, features, model)
    else:
        sampling.verifiers = guides
    if cfg.search == "prune" and cfg.candidates > 1:
        sampling.prune = prune_schedule(cfg.prune_at, sampling.steps, cfg.candidates)
    if cfg.selecting:
        SteeringConfig(cfg.particles, cfg.potential, cfg.potential_scale, cfg.resample_every, cfg.resample_window,
                       cfg.adaptive).validate(sampling.steps)
    if cfg.reject is not None:
        _add_rejector(sampling, cfg.reject, device)
    return sampling


def _cfg_uncond(cfg: SampleConfig, model: Model, device: torch.device) -> Model | None:
    """The model of CFG's null branch: ``--cfg-uncond`` (an unconditional model of the sampled model's image size,
    channels and schedule), else None, the sampled model's own null class, which it must have."""
    name = cfg.model or "the model"
    if cfg.cfg_uncond is None:
        if model.null_label is None:
            raise UserError(f"{name} has no null class (its {model.labels} class rows are all real classes): --cfg "
                            "needs --cfg-uncond MODEL, an unconditional model of the same image size and schedule")
        return None
    uncond = load_model(cfg.cfg_uncond, device).requires_grad_(False)
    if uncond.labels is not None:
        raise UserError(f"{cfg.cfg_uncond}: --cfg-uncond needs an unconditional model, this one has "
                        f"{uncond.labels} class rows")
    mine = (model.image_size, model.net.cfg.in_channels)
    theirs = (uncond.image_size, uncond.net.cfg.in_channels)
    if theirs != mine or not torch.equal(uncond.abar, model.abar):
        raise UserError(f"{cfg.cfg_uncond}: --cfg-uncond must match {name}'s image size, channels and diffusion "
                        f"schedule ({mine[0]} px, {mine[1]} channels, {model.diffusion.schedule} "
                        f"{model.diffusion.steps}; it has {theirs[0]} px, {theirs[1]} channels, "
                        f"{uncond.diffusion.schedule} {uncond.diffusion.steps})")
    return uncond


def _read_the_shipped_parent(guides: Sequence[Guide | PluginGuide], model: Model) -> bool:
    """Whether the heads read the shipped model's features and ``model`` was fine-tuned from it: then the shipped
    model is the feature model without a --guide-model (any other parent has to be named)."""
    from ddguide.core import artifacts
    from ddguide.core.model import default_model_path

    parent = model.info.get("finetuned_from")
    guides = [g for g in guides if isinstance(g, Guide)]  # plug-ins read no model's features
    if not parent or not guides or any(g.head.reads_pixels or g.head.fingerprint != parent for g in guides):
        return False
    return artifacts.read_metadata(default_model_path()).get("ddguide.fingerprint") == parent


def _add_rejector(sampling: Sampling, spec: RejectSpec, device: torch.device) -> None:
    model = sampling.model
    rejector = Rejector.load(spec.head, spec.model, device)
    lineage = model.info.get("finetuned_from")
    if lineage and lineage != rejector.model.fingerprint:
        raise UserError(f"{sampling.cfg.model} was fine-tuned from model {lineage}, the rejection head reads model "
                        f"{rejector.model.fingerprint}")
    if not model.classes:
        raise UserError(f"{sampling.cfg.model or 'the model'} has no class names: rejection sampling needs a model "
                        "from `ddguide finetune`")
    sampling.rejector = rejector
    sampling.targets = {c: rejector.class_index(model.classes[c]) for c in sampling.ids or []}


# ------------------------------------------------------------------------------------------- the loop


class Quotas:
    """Which draws to make next. Without rejection: this process's share of images start..start+n-1, image k
    of class ``ids[k % len(ids)]``. With rejection: batches cycling through the classes that still need images,
    until each has ``n`` accepted (or ``max_draws * n`` draws)."""

    def __init__(self, cfg: SampleConfig, ids: list[int] | None, rejecting: bool,
                 name: Callable[[int], Any] = lambda c: c):
        self.cfg, self.ids, self.rejecting, self.name = cfg, ids, rejecting, name
        self.accepted = {c: 0 for c in ids or []}
        self.seen = {c: 0 for c in ids or []}

    def batches(self, rank: int, world: int) -> Iterator[tuple[list[int], list[int] | None]]:
        cfg = self.cfg
        if not self.rejecting:
            lo, hi = Shard(rank, world).bounds(cfg.n)  # image k is the same on any shard
            mine = list(range(cfg.start + lo, cfg.start + hi))
            for first in range(0, len(mine), cfg.batch):
                indices = mine[first:first + cfg.batch]
                yield indices, None if self.ids is None else [self.ids[k % len(self.ids)] for k in indices]
            return
        next_index = cfg.start
        while any(self.accepted[c] < cfg.n for c in self.accepted):
            limit = self.cfg.reject.max_draws * cfg.n  # type: ignore[union-attr]
            todo = [c for c in self.accepted if self.accepted[c] < cfg.n and self.seen[c] < limit]
            if not todo:
                low = [c for c in self.accepted if self.accepted[c] < cfg.n]
                raise UserError(f"gave up after {limit} draws for {', '.join(str(self.name(c)) for c in low)}: "
                                f"lower --threshold or fine-tune longer")
            labels = [todo[i % len(todo)] for i in range(cfg.batch)]
            yield list(range(next_index, next_index + len(labels))), labels
            next_index += len(labels)

    def keep(self, c: int | None, p: float | None) -> bool:
        """Count a draw and say whether to keep it."""
        if c is None or not self.rejecting:
            return True
        self.seen[c] += 1
        if p is not None and p >= self.cfg.reject.threshold and self.accepted[c] < self.cfg.n:  # type: ignore
            self.accepted[c] += 1
            return True
        return False


@dataclass
class Batch:
    """One batch of the loop: the kept images (float in [-1, 1] and uint8 HWC) with their index rows, and how
    many images were drawn for it."""

    x: torch.Tensor
    images: np.ndarray
    rows: list[dict[str, Any]]
    drawn: int


def batches(run: Sampling, quotas: Quotas, rank: int = 0, world: int = 1,
            progress: Progress | None = None) -> Iterator[Batch]:
    """The loop of every mode, writing nothing: draw each batch the quotas ask for, check it, and keep what the
    accept test takes. ``sample`` writes what it yields; ``generate`` returns it."""
    cfg, steps, rejecting = run.cfg, run.steps, run.rejector is not None
    lo, hi = Shard(rank, world).bounds(cfg.n)
    total = (cfg.n * len(run.ids or [])) if rejecting else hi - lo
    drawn = 0
    for indices, labels in quotas.batches(rank, world):
        cb = None
        if progress and not rejecting:
            cb = lambda i, _k, d=drawn * len(steps), b=len(indices): progress(d + i * b, total * len(steps))  # noqa: E731
        x, chosen_rows = run.draw_batch(indices, labels, cb)
        check_finite_images(x, indices)
        drawn += len(indices)
        extra = [{**a, **b} for a, b in zip(run.rows(x, labels, indices), chosen_rows)]
        images = to_uint8(x)
        probs = run.accept(images, labels, indices)
        kept, rows = [], []
        for j, (k, more) in enumerate(zip(indices, extra)):
            p = None if probs is None else probs[j]
            if not quotas.keep(None if labels is None else labels[j], p):
                continue
            kept.append(j)
            rows.append({"file": image_name(k), "index": k, "seed": cfg.seed + k, **more,
                         **({} if p is None else {"reject_prob": round(p, 4)})})
        yield Batch(x[kept], images[kept], rows, len(indices))
        if progress and rejecting:
            progress(sum(quotas.accepted.values()), total)


def _quotas(run: Sampling, world: int) -> Quotas:
    rejecting = run.rejector is not None
    if rejecting and world > 1:
        raise UserError("--reject runs in one process (its draws depend on what was accepted); run it without "
                        "torchrun or --shard")
    return Quotas(run.cfg, run.ids, rejecting, name=lambda c: class_name(run.model, c))


def _per_class(run: Sampling, quotas: Quotas) -> dict[str, tuple[int, int]] | None:
    if run.rejector is None:
        return None
    return {str(class_name(run.model, c)): (quotas.accepted[c], quotas.seen[c]) for c in quotas.accepted}


@dataclass
class Generated:
    """What ``generate`` returns: the kept images in order, float (N, C, H, W) in [-1, 1] on the CPU, and uint8
    (N, H, W, C) as ``sample`` writes them, with the rows its index.csv would hold."""

    x: torch.Tensor
    images: np.ndarray
    rows: list[dict[str, Any]]
    total: int  # images drawn
    per_class: dict[str, tuple[int, int]] | None = None


def generate(cfg: SampleConfig, progress: Progress | None = None, model: Model | None = None) -> Generated:
    """Sample in memory, every image in this process, writing no file (``cfg.out`` is not used)."""
    run = prepare(cfg, model)
    quotas = _quotas(run, 1)
    return _gathered(run, quotas, list(batches(run, quotas, 0, 1, progress)))


def _gathered(run: Sampling, quotas: Quotas, parts: list[Batch]) -> Generated:
    size, channels = run.model.image_size, run.model.net.cfg.in_channels
    x = torch.cat([b.x.cpu() for b in parts]) if parts else torch.zeros(0, channels, size, size)
    images = np.concatenate([b.images for b in parts]) if parts else np.zeros((0, size, size, channels), np.uint8)
    return Generated(x, images, [r for b in parts for r in b.rows], sum(b.drawn for b in parts),
                     _per_class(run, quotas))


def sample(cfg: SampleConfig, progress: Progress | None = None, *, model: Model | None = None,
           keep: bool = False) -> SampleResult:
    """Sample into ``cfg.out`` (PNGs, index.csv, grid.png); returns what was written (with ``keep``, also the
    images in memory). ``model``: an already loaded model in place of ``cfg.model``."""
    shard = resolve_shard(cfg.shard)
    run = prepare(cfg, model)
    rank, world = shard.rank, shard.world
    quotas = _quotas(run, world)
    rows: list[dict[str, Any]] = []
    shown: list[np.ndarray] = []
    drawn, joined = 0, True
    # staged: the folder appears (or replaces an earlier samples folder) only once every image and the index are
    # written; shards (torchrun or --shard) write in place and the last one to finish joins the index
    with staged_folder(cfg.out, "samples", own=samples_folder, in_place=world > 1) as out:
        kept: list[Batch] = []
        for batch in batches(run, quotas, rank, world, progress):
            drawn += batch.drawn
            if keep:
                kept.append(batch)
            for image, row in zip(batch.images, batch.rows):
                write_png(out / row["file"], image)
                rows.append(row)
                if len(shown) < GRID_IMAGES:
                    shown.append(image)
        if world == 1:
            write_index(out, rows)
            write_grid(out / GRID, shown)
        else:
            write_index(out, rows, name=part_name(rank, world))
            joined = merge_shards(out, world)
    return SampleResult(Path(cfg.out), len(rows), drawn, _per_class(run, quotas),
                        _gathered(run, quotas, kept) if keep else None, joined=joined)
