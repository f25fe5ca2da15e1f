"""The training engine that ``train`` and ``finetune`` share: a :class:`Recipe`, the loop :func:`fit` (EMA, DDP
under ``torchrun``, resumable checkpoints) and the epilogue :func:`write_model`.

A stage builds the network and says how to read its images; the engine optimises the epsilon-prediction
objective (Ho et al.'s L_simple, or P2-weighted) and returns the EMA weights. The configs of the stages hold a
``Recipe`` and derive the identity a checkpoint must match with :func:`run_identity`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from ddguide.core import artifacts
from ddguide.core.checkpoint import RunState, restore_checkpoint, save_checkpoint, seed_device_stream
from ddguide.core.data import pixels_to_unit, to_tensor
from ddguide.core.diffusion import DiffusionConfig, alphas_cumprod, q_sample, split_output
from ddguide.core.errors import UserError
from ddguide.core.model import Model, save_model
from ddguide.core.runtime import (
    all_gather,
    autocast,
    is_main_process,
    join_process_group,
    process_shard,
    resolve_device,
    resolve_precision,
)
from ddguide.core.unet import UNetConfig, UNetModel

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, loss and speed)
Labels = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # batch indices -> class ids (on the CPU)
Reader = Callable[[], tuple[torch.Tensor, Labels | None]]  # -> uint8 (N, H, W, C) images, labels or None
OnCheckpoint = Callable[[dict[str, torch.Tensor], "RunState"], None]  # (EMA weights, state) after each save


@dataclass(kw_only=True)
class Recipe:
    """How one run optimises: what ``train`` and ``finetune`` share. ``steps``, ``lr`` and ``warmup`` have no
    default because each stage has its own (``train.TRAIN_RECIPE``, ``finetune.FINETUNE_RECIPE``).

    ``warmup`` ramps the learning rate linearly over its first steps (0: none); after it the rate stays at ``lr``,
    or with ``lr_final`` follows a half cosine from ``lr`` down to ``lr_final`` at ``steps``. ``compile`` runs the
    steps through ``torch.compile``: the same optimisation (the first step pays for the compilation), so a run
    may be resumed with or without it; ``fit`` refuses it with bf16 on the CPU. ``p2_gamma`` > 0 weights each
    image's squared error by ``loss_weights`` (P2, Choi et al. 2022). ``seed`` seeds the stage's generator.

    ``device_stream`` draws each step's t and noise on the device from a generator of the run's own (seeded from
    the stage's, saved in the checkpoint) and keeps the losses there, reading them back every ``report_every``
    steps, before each checkpoint and at the end: no copy of noise and no wait for the device at each step. None
    (the default) turns it on for CUDA and off for the CPU, whose runs are the same as before it existed; True on
    the CPU runs the same code with a CPU generator in the device's place (for tests). The two modes draw other
    noise, so they train other (equally good) weights; a checkpoint of either resumes in the other."""

    steps: int
    lr: float
    warmup: int
    batch: int = 64
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "bf16"
    checkpoint_every: int = 250
    lr_final: float | None = None
    compile: bool = False
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    seed: int = 0
    device_stream: bool | None = None
    report_every: int = 50

    def validate(self) -> None:
        """Refuse counts below 1, a learning rate that is not positive and P2 settings out of range."""
        if self.steps < 1 or self.batch < 1 or self.checkpoint_every < 1:
            raise UserError("--steps, --batch and --checkpoint-every must be >= 1")
        if self.report_every < 1:
            raise UserError(f"report_every must be >= 1 (got {self.report_every})")
        if self.p2_gamma < 0 or self.p2_k <= 0:
            raise UserError(f"--p2-gamma must be >= 0 and --p2-k > 0 (got {self.p2_gamma:g} and {self.p2_k:g})")
        if not self.lr > 0 or (self.lr_final is not None and not 0 <= self.lr_final <= self.lr):
            raise UserError("--lr must be > 0 and --lr-final between 0 and --lr")

    def optional_keys(self) -> list[str]:
        """The recipe options that join a run's identity only when set (a decay ties the run to its step count),
        so that checkpoints written before the options existed stay resumable."""
        keys = ["lr_final", "steps"] if self.lr_final is not None else []
        return keys + (["p2_gamma", "p2_k"] if self.p2_gamma else [])

    def loss_weights(self, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor | None:
        """Per-image loss weights 1 / (k + SNR(t))^gamma, SNR = abar / (1 - abar) (Choi et al., "Perception
        Prioritized Training of Diffusion Models", Eq. 8): they shift the objective from the low-noise steps, which
        refine imperceptible detail, towards the steps that lay out content. None for L_simple (gamma 0)."""
        if not self.p2_gamma:
            return None
        a = abar[t].double()
        return ((self.p2_k + a / (1 - a)) ** -self.p2_gamma).float()

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that ends step ``step + 1``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_final is None:
            return self.lr
        done = (step + 1 - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr_final + (self.lr - self.lr_final) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def flat_config(cfg: Any) -> dict[str, Any]:
    """A stage config as one JSON object, its ``recipe`` fields alongside its own (the form models record)."""
    d = asdict(cfg)
    recipe = d.pop("recipe", {})
    return {**d, **recipe}


def run_identity(cfg: Any, keep: Iterable[str]) -> dict[str, Any]:
    """The options named in ``keep`` (the config's own or its recipe's): what a checkpoint must agree with to be
    resumed."""
    keep = set(keep)
    return {k: v for k, v in flat_config(cfg).items() if k in keep}


def setup_device(device: str, threads: int | None) -> torch.device:
    """The device a stage runs on, with torch's CPU threads set when asked."""
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    return dev


def fit(net: UNetModel, diffusion: DiffusionConfig, recipe: Recipe, ckpt: Path, identity: dict[str, Any],
        gen: torch.Generator, read: Reader, device: torch.device,
        progress: Progress | None = None, *, on_checkpoint: OnCheckpoint | None = None,
        export: bool = False) -> tuple[dict[str, torch.Tensor], RunState]:
    """Optimise ``net`` (or resume from ``ckpt``) and return its EMA weights and the run's state.

    ``on_checkpoint`` runs on rank 0 after each checkpoint is saved (``train`` draws its preview grid there; it
    must not touch ``gen``). ``export`` trains no further: the checkpoint's EMA weights are returned as they are,
    so a stopped run can be written as a model.

    ``identity`` is what a checkpoint must match to be resumed. ``read`` gives the training images as
    uint8 (N, H, W, C) and, for a class-conditional net, a function drawing each batch's labels; it is called
    after the checkpoint is accepted, so a refused run reads no images. Each step draws, in this order, the
    batch indices, the labels, t and the noise from ``gen``: a resumed run continues the same sequence.

    With the recipe's device stream (on by default for CUDA) the indices and labels still come from ``gen``, a
    few integers on the CPU, but t and the noise are drawn on the device from a generator seeded from ``gen`` at
    the start and saved in the checkpoint beside it; images that fit (up to 2 GiB) are copied to the device once.
    The losses stay on the device until the next read (every ``recipe.report_every`` steps, before each
    checkpoint, at the end), which is also when progress is reported and a NaN or inf loss stops the run, naming
    the step it first appeared at, before the next checkpoint is saved.

    Under ``torchrun`` every process draws ``batch / WORLD_SIZE`` images from its own stream (rank 0 keeps
    ``gen``'s, so one process is the same run as before) and DDP averages the gradients; the checkpoint keeps
    every rank's generator states and only rank 0 writes files and reports progress.
    """
    rank, world = process_shard()
    recipe = replace(recipe, precision=resolve_precision(recipe.precision, device, compile=recipe.compile))
    _check_run(recipe, device, world)
    if rank:
        gen.manual_seed(_rank_seed(gen.initial_seed(), rank, 0))
    stream = device_generator(recipe, device)  # None: everything drawn from `gen`, as before the device stream
    if stream is not None:
        seed_device_stream(stream, gen)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    state = RunState()

    # Resume.
    if ckpt.exists():
        if not restore_checkpoint(ckpt, identity, net, ema, opt, gen, state, device, rank, device_gen=stream):
            gen.manual_seed(_rank_seed(gen.initial_seed(), rank, state.step))  # a rank the last run did not have
            if stream is not None:
                seed_device_stream(stream, gen)
    if export:
        if not ckpt.exists():
            raise UserError(f"--export: no checkpoint {ckpt} to write a model from (train first)")
        return ema, state
    images, labels = read()
    if stream is not None and images.numel() * images.element_size() <= DEVICE_IMAGES_BYTES:
        images = images.to(device)  # once, so that a step copies no pixels
    abar = alphas_cumprod(diffusion).to(device)
    batch = recipe.batch // world
    model = _training_module(net, recipe, device, world)
    net.train()
    pending: list[torch.Tensor] = []  # the device stream's losses not yet read back, one 0-d tensor per step
    t_last, reported = time.time(), state.step
    while state.step < recipe.steps:
        # Train.
        if stream is None:
            idx = torch.randint(0, len(images), (batch,), generator=gen)
            x0 = to_tensor(images[idx].numpy()).to(device)  # (B, C, H, W) in [-1, 1]
            y = labels(idx, gen).to(device) if labels else None  # (B,) or None
            t = torch.randint(0, diffusion.steps, (batch,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
        else:
            x0, y, t, noise = stream_batch(images, labels, gen, stream, diffusion.steps, batch, device)
        loss = _loss(model, diffusion, recipe, abar, x0, y, t, noise, device)
        if stream is None:
            check_finite_loss(loss, state.step + 1, recipe.lr)
        _step(net, opt, loss, recipe, state.step)
        ema_update(ema, net, recipe.ema_decay, state.step)
        state.step += 1
        if stream is None:
            state.losses.append(_mean_over_ranks(loss.detach(), world))
        else:
            pending.append(loss.detach())

        # Read the losses back (the device stream), checkpoint, then report: a stop during the report loses no
        # finished step.
        saving = state.step % recipe.checkpoint_every == 0 or state.step == recipe.steps
        reading = stream is None or saving or state.step % recipe.report_every == 0
        if pending and reading:
            read_losses(pending, state, world, recipe.lr)
        if saving:
            rngs = all_gather((gen.get_state(), stream.get_state() if stream is not None else None), device)
            if rank == 0:
                device_rngs = [d for _, d in rngs] if stream is not None else []
                save_checkpoint(ckpt, identity, net, ema, opt, gen, state, [r for r, _ in rngs[1:]], device_rngs)
                if on_checkpoint:
                    on_checkpoint(ema, state)
        if progress and rank == 0 and reading:
            now = time.time()
            speed = recipe.batch * (state.step - reported) / max(now - t_last, 1e-9)
            progress(state.step, recipe.steps, f"loss {np.mean(state.losses[-50:]):.4f}  {speed:.0f} img/s")
            t_last, reported = now, state.step
    return ema, state


DEVICE_IMAGES_BYTES = 2 * 2**30  # the device stream copies a training set up to this size to the device once


def device_generator(recipe: Recipe, device: torch.device) -> torch.Generator | None:
    """The generator of the recipe's device stream on ``device`` (unseeded), or None where the run draws
    everything from the stage's generator on the CPU (the default off CUDA)."""
    on = recipe.device_stream if recipe.device_stream is not None else device.type == "cuda"
    return torch.Generator(device=device) if on else None


def stream_batch(images: torch.Tensor, labels: Labels | None, gen: torch.Generator, stream: torch.Generator,
                 steps: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One step's x0 (B, C, H, W) in [-1, 1], labels (B,) or None, t (B,) and noise for the device stream: the
    indices and labels from ``gen`` on the CPU, t and the noise from ``stream`` on the device. ``images`` may be
    on the device already; nothing here waits for it."""
    idx = torch.randint(0, len(images), (batch,), generator=gen)
    y = to_device(labels(idx, gen), device) if labels else None
    x0 = pixels_to_unit(to_device(images.index_select(0, to_device(idx, images.device)), device))
    t = torch.randint(0, steps, (batch,), generator=stream, device=device)
    noise = torch.randn(x0.shape, generator=stream, device=device)
    return x0, y, t, noise


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; from the CPU to CUDA through pinned memory, asynchronously, so the host does not wait
    for the device's queue to drain (a plain copy from pageable memory does)."""
    if device.type != "cuda" or x.is_cuda:
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def read_losses(pending: list[torch.Tensor], state: RunState, world: int, lr: float) -> None:
    """Move the device stream's ``pending`` losses (averaged over the ranks) to ``state.losses`` in one read, the
    values a read at every step gives; the first NaN or inf among them stops the run."""
    values = torch.stack(pending)
    if world > 1:
        dist.all_reduce(values)
        values /= world
    first = state.step - len(pending) + 1
    pending.clear()
    losses = values.tolist()
    check_finite_losses(losses, first, lr)
    state.losses.extend(losses)


def _check_run(recipe: Recipe, device: torch.device, world: int) -> None:
    """Refuse, before anything is read, a compiled run the CPU cannot do and a batch that does not split."""
    if recipe.compile and device.type == "cpu":
        if not cpp_compiler_found():  # without one the first step would fail deep inside inductor
            raise UserError(f"--compile on the CPU needs a C++ compiler: {os.environ.get('CXX', 'g++')} is not on "
                            "the PATH (install g++, set CXX, or leave --compile out)")
        if recipe.precision == "bf16":
            # torch 2.13's compiled backward under bf16 autocast gives every block below the U-Net's first
            # downsampling a zero gradient (benchmarks/compile_grads.py): the run goes on and its samples drift
            raise UserError("--compile with --precision bf16 trains wrongly on the CPU (the compiled backward "
                            "drops the deeper blocks' gradients): use --precision fp32 with --compile, or leave "
                            "--compile out")
    if recipe.batch % world:
        raise UserError(f"--batch {recipe.batch} does not split evenly over {world} processes")


def _training_module(net: UNetModel, recipe: Recipe, device: torch.device, world: int) -> torch.nn.Module:
    """What the steps call: ``net`` itself, wrapped in DDP under torchrun and compiled when asked. ``net`` keeps
    the plain module, so state_dict keys, EMA and clipping are unchanged."""
    if world > 1:
        join_process_group(device)
    model = ddp_module(net, device) if world > 1 else net
    return torch.compile(model) if recipe.compile else model


def _loss(model: torch.nn.Module, diffusion: DiffusionConfig, recipe: Recipe, abar: torch.Tensor,
          x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor,
          device: torch.device) -> torch.Tensor:
    """The (P2-weighted) mean squared error of the predicted noise at x_t = q_sample(x0, t, noise) (Eq. 5)."""
    x_t = q_sample(x0, t, noise, abar)
    with autocast(device, recipe.precision):
        out = model(x_t, diffusion.model_time(t), y)
    eps, _ = split_output(out.float(), x0.shape[1])
    weights = recipe.loss_weights(t, abar)
    if weights is None:
        return (eps - noise).pow(2).mean()
    return (weights * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, recipe: Recipe, step: int) -> None:
    """One clipped Adam update at the schedule's learning rate."""
    opt.zero_grad(set_to_none=True)
    loss.backward()  # DDP leaves every rank with the mean gradient
    torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
    for group in opt.param_groups:
        group["lr"] = recipe.lr_at(step)
    opt.step()


def ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float, step: int) -> None:
    """Move ``ema`` towards ``net``'s weights (integer buffers are copied), with a short ramp so the average is
    not dominated by the random initialisation in short runs. One fused update over all floating tensors instead
    of two operations per tensor: the same values (benchmarks/train_speed.py times both and compares them)."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        floats, targets = [], []
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                floats.append(v)
                targets.append(ema[k])
            else:
                ema[k].copy_(v)
        torch._foreach_mul_(targets, d)
        torch._foreach_add_(targets, floats, alpha=1 - d)


def write_model(out: str | Path, net_cfg: UNetConfig, diffusion: DiffusionConfig, ema: dict[str, torch.Tensor],
                state: RunState, info: dict[str, Any], classes: list[str] | None = None) -> Path:
    """The EMA weights as a ``model`` artifact at ``out`` (``info`` plus the steps trained) and the loss curve
    beside it; written once, by rank 0 under torchrun."""
    if is_main_process():
        with torch.device("meta"):  # only its config is written: the weights are ``ema``
            net = UNetModel(net_cfg)
        model = Model(net, diffusion, classes=classes, info={**info, "trained_steps": state.step})
        save_model(out, model, state_dict=ema)
        write_loss_curve(Path(out).with_suffix(".loss.png"), state.losses)
    return Path(out)


def preview_grid(path: str | Path, net_cfg: UNetConfig, diffusion: DiffusionConfig, ema: dict[str, torch.Tensor],
                 device: torch.device, n: int = 16, steps: int = 25) -> None:
    """``n`` samples of the EMA weights as one PNG grid (DDIM ``steps`` steps, eta 0, image k from seed k: the
    same noise at every checkpoint, so successive grids show what training changed). Drawn with generators of
    its own, and the network is built on the meta device holding the EMA tensors themselves (no random
    initialisation: torch's global generator, which dropout draws from, is untouched too)."""
    from ddguide.core.data import to_uint8
    from ddguide.core.diffusion import sampling_timesteps
    from ddguide.core.model import denoiser, network_with
    from ddguide.core.samples import write_grid
    from ddguide.core.sampling import image_generators, per_image_randn, sample_ddim

    model = Model(network_with(net_cfg, ema, "the EMA weights"), diffusion).eval()
    kept = sampling_timesteps(diffusion.steps, min(steps, diffusion.steps), "ddim")
    size, channels = net_cfg.image_size, net_cfg.in_channels
    x = per_image_randn((channels, size, size), image_generators(0, range(n)), device)
    with torch.no_grad():
        images = sample_ddim(denoiser(model), x, kept, alphas_cumprod(diffusion).to(device))
    write_grid(Path(path), list(to_uint8(images.cpu())))


def check_finite_loss(loss: torch.Tensor, step: int, lr: float) -> None:
    """A step whose loss is NaN or inf stops the run before it updates anything (the last checkpoint stays, no
    model is written), with the likely cause."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise UserError(_loss_error(value, step, lr, "nothing was written for this step"))


def check_finite_losses(losses: list[float], first: int, lr: float) -> None:
    """The losses of steps ``first``, ``first + 1``, ... read back together: the first NaN or inf stops the run
    before the next checkpoint is saved (the last one stays, no model is written), naming its step."""
    for step, value in enumerate(losses, start=first):
        if not math.isfinite(value):
            raise UserError(_loss_error(value, step, lr, "nothing was written after the last checkpoint"))


def _loss_error(value: float, step: int, lr: float, written: str) -> str:
    return (f"the loss is {value} at step {step}: the learning rate (--lr {lr:g}) is likely too high, or the "
            f"images or the starting weights are broken; {written}")


def cpp_compiler_found() -> bool:
    """Whether the compiler torch.compile builds its CPU kernels with ($CXX, default g++) is on the PATH."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def write_loss_curve(path: Path, losses: list[float], width: int = 640, height: int = 320) -> None:
    """A plain loss-vs-step plot (log-scale loss, 50-step moving average) as PNG."""
    from PIL import Image, ImageDraw

    if len(losses) < 2:
        return
    y = np.log10(np.convolve(np.asarray(losses), np.ones(min(50, len(losses))) / min(50, len(losses)), "valid"))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = float(y.min()), float(y.max()) + 1e-9
    pts = [(40 + i * (width - 50) / max(len(y) - 1, 1), 10 + (hi - v) * (height - 40) / (hi - lo))
           for i, v in enumerate(y)]
    draw.line(pts, fill=(30, 90, 200), width=2)
    draw.text((45, 12), f"loss (log10, moving avg): {10**hi:.4f} .. {10**lo:.4f}", fill="black")
    draw.text((45, height - 20), f"steps 0 .. {len(losses)}", fill="black")
    artifacts.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _rank_seed(seed: int, rank: int, step: int) -> int:
    return (seed + 1_000_003 * rank + 7919 * step) % 2**63


def ddp_module(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` wrapped in DistributedDataParallel, which averages its gradients over torchrun's processes."""
    from torch.nn.parallel import DistributedDataParallel

    join_process_group(device)
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return loss.item()
