"""`ddguide train`: an unconditional epsilon-prediction model from an image folder, resumable after a kill.

Checkpoints (a ``checkpoint`` artifact beside the output) hold the weights, the EMA weights, Adam's state, the
random generator state and the loss history; rerunning the same command continues from the last one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ddguide import artifacts
from ddguide.data import list_images, load_image, to_tensor
from ddguide.diffusion import DiffusionConfig, alphas_cumprod, q_sample, split_output
from ddguide.errors import UserError
from ddguide.models import (Model, all_gather, autocast, is_main_process, join_process_group, process_shard,
                            resolve_device, resolve_precision, save_model)
from ddguide.unet import UNetModel, get_preset

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, loss and speed)


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "shapes32"
    steps: int = 20000
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    lr_final: float | None = None  # cosine decay of the learning rate to this by the last step (None: constant)
    schedule: str | None = None  # None: the preset's schedule
    precision: str = "bf16"
    seed: int = 0
    checkpoint_every: int = 250
    device: str = "auto"
    resize: str = "refuse"
    threads: int | None = None
    init: str | None = None  # start from this model artifact's weights (a fresh optimiser)
    p2_gamma: float = 0.0  # perception-prioritised loss weight 1 / (p2_k + SNR(t))^p2_gamma (0: L_simple)
    p2_k: float = 1.0
    compile: bool = False  # torch.compile the network for the optimisation steps (same run, not part of identity)

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree with to be resumed: not the device, nor the step count unless the
        learning rate decays over it."""
        keep = ["data", "preset", "batch", "lr", "warmup", "ema_decay", "grad_clip", "schedule", "seed", "init"]
        if self.lr_final is not None:
            keep += ["lr_final", "steps"]
        if self.p2_gamma:
            keep += ["p2_gamma", "p2_k"]
        # `init`, `lr_final` and P2 joined later: leaving them out when unset keeps older checkpoints resumable
        return {k: v for k, v in asdict(self).items() if k in keep and not (k == "init" and v is None)}


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".ckpt.safetensors")


def load_dataset(folder: str, size: int, resize: str) -> torch.Tensor:
    """All training images as uint8 (N, H, W, 3); training sets here are small (10k images = 30 MB)."""
    files = list_images(folder)
    return torch.from_numpy(np.stack([load_image(f, size, resize) for f in files]))


@dataclass
class _State:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def train(cfg: TrainConfig, progress: Progress | None = None) -> Path:
    """Train (or resume) and write the EMA weights as a ``model`` artifact at ``cfg.out``."""
    if cfg.steps < 1 or cfg.batch < 1 or cfg.checkpoint_every < 1:
        raise UserError("--steps, --batch and --checkpoint-every must be >= 1")
    if cfg.p2_gamma < 0 or cfg.p2_k <= 0:
        raise UserError(f"--p2-gamma must be >= 0 and --p2-k > 0 (got {cfg.p2_gamma:g} and {cfg.p2_k:g})")
    if not cfg.lr > 0 or (cfg.lr_final is not None and not 0 <= cfg.lr_final <= cfg.lr):
        raise UserError("--lr must be > 0 and --lr-final between 0 and --lr")
    preset = get_preset(cfg.preset)
    diffusion = DiffusionConfig(preset.diffusion.steps, cfg.schedule or preset.diffusion.schedule,
                                preset.diffusion.rescale_timesteps)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # the network drawn from its own seed, so initialisation does not depend on the global generator
    init = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=init)))
        net = UNetModel(preset.unet)
    if cfg.init:
        _warm_start(net, cfg.init)
    recipe = Recipe(cfg.steps, cfg.batch, cfg.lr, cfg.warmup, cfg.ema_decay, cfg.grad_clip, cfg.precision,
                    cfg.checkpoint_every, cfg.lr_final, cfg.compile, cfg.p2_gamma, cfg.p2_k)
    ema, state = fit(net.to(device), diffusion, recipe, checkpoint_path(cfg.out), cfg,
                     torch.Generator().manual_seed(cfg.seed),
                     lambda: (load_dataset(cfg.data, preset.unet.image_size, cfg.resize), None), device, progress)

    # the artifact (written once, by rank 0 under torchrun): EMA weights plus the full training config
    if not is_main_process():
        return Path(cfg.out)
    model = Model(UNetModel(preset.unet), diffusion, info={"preset": cfg.preset, "train": asdict(cfg),
                                                            "trained_steps": state.step})
    save_model(cfg.out, model, state_dict=ema)
    write_loss_curve(Path(cfg.out).with_suffix(".loss.png"), state.losses)
    return Path(cfg.out)


@dataclass
class Recipe:
    """How one run of the epsilon-prediction objective (Ho et al.'s L_simple) optimises: what ``train`` and
    ``finetune`` share. ``warmup`` ramps the learning rate linearly over its first steps (0: none); after it the
    rate stays at ``lr``, or with ``lr_final`` follows a half cosine from ``lr`` down to ``lr_final`` at ``steps``.
    ``compile`` runs the steps through ``torch.compile``: the same optimisation (the first step pays for the
    compilation), so a run may be resumed with or without it; ``fit`` refuses it with bf16 on the CPU.
    ``p2_gamma`` > 0 weights each image's squared error by ``loss_weights`` (P2, Choi et al. 2022)."""

    steps: int
    batch: int
    lr: float
    warmup: int
    ema_decay: float
    grad_clip: float
    precision: str
    checkpoint_every: int
    lr_final: float | None = None
    compile: bool = False
    p2_gamma: float = 0.0
    p2_k: float = 1.0

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


Labels = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # batch indices -> class ids for the batch


def fit(net: UNetModel, diffusion: DiffusionConfig, recipe: Recipe, ckpt: Path, key: Any, gen: torch.Generator,
        read: Callable[[], tuple[torch.Tensor, Labels | None]], device: torch.device,
        progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], _State]:
    """Optimise ``net`` (or resume from ``ckpt``) and return its EMA weights and the run's state.

    ``key.identity()`` is what a checkpoint must match to be resumed. ``read`` gives the training images as
    uint8 (N, H, W, 3) and, for a class-conditional net, a function drawing each batch's labels; it is called
    after the checkpoint is accepted, so a refused run reads no images. Each step draws, in this order, the
    batch indices, the labels, t and the noise from ``gen``: a resumed run continues the same sequence.

    Under ``torchrun`` every process draws ``batch / WORLD_SIZE`` images from its own stream (rank 0 keeps
    ``gen``'s, so one process is the same run as before) and DDP averages the gradients; the checkpoint keeps
    every rank's generator state and only rank 0 writes files and reports progress.
    """
    rank, world = process_shard()
    recipe = replace(recipe, precision=resolve_precision(recipe.precision, device, compile=recipe.compile))
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
    if rank:
        gen.manual_seed(_rank_seed(gen.initial_seed(), rank, 0))
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    state = _State()
    if ckpt.exists():
        if not _restore(ckpt, key, net, ema, opt, gen, state, device, rank):
            gen.manual_seed(_rank_seed(gen.initial_seed(), rank, state.step))  # a rank the last run did not have
    images, labels = read()
    abar = alphas_cumprod(diffusion).to(device)
    batch = recipe.batch // world

    if world > 1:
        join_process_group(device)
    model = _ddp(net, device) if world > 1 else net
    if recipe.compile:
        model = torch.compile(model)  # `net` keeps the plain module: state_dict keys, EMA and clipping are unchanged
    net.train()
    t_last = time.time()
    while state.step < recipe.steps:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0 = to_tensor(images[idx].numpy()).to(device)  # (B, 3, H, W) in [-1, 1]
        y = labels(idx, gen).to(device) if labels else None  # (B,) or None
        t = torch.randint(0, diffusion.steps, (batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = q_sample(x0, t, noise, abar)  # Eq. 5
        with autocast(device, recipe.precision):
            out = model(x_t, diffusion.model_time(t), y)
        eps, _ = split_output(out.float(), x0.shape[1])
        weights = recipe.loss_weights(t, abar)
        if weights is None:
            loss = (eps - noise).pow(2).mean()
        else:
            loss = (weights * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        check_finite_loss(loss, state.step + 1, recipe.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP leaves every rank with the mean gradient
        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(state.step)
        opt.step()
        _ema_update(ema, net, recipe.ema_decay, state.step)
        state.step += 1
        state.losses.append(_mean_over_ranks(loss.detach(), world))

        # checkpoint, then report: a stop during the report loses no finished step
        if state.step % recipe.checkpoint_every == 0 or state.step == recipe.steps:
            rngs = all_gather(gen.get_state(), device)
            if rank == 0:
                _save_checkpoint(ckpt, key, net, ema, opt, gen, state, rngs[1:])
        if progress and rank == 0:
            now = time.time()
            progress(state.step, recipe.steps, f"loss {np.mean(state.losses[-50:]):.4f}  "
                                               f"{recipe.batch / max(now - t_last, 1e-9):.0f} img/s")
            t_last = now
    return ema, state


def check_finite_loss(loss: torch.Tensor, step: int, lr: float) -> None:
    """A step whose loss is NaN or inf stops the run before it updates anything (the last checkpoint stays, no
    model is written), with the likely cause."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise UserError(f"the loss is {value} at step {step}: the learning rate (--lr {lr:g}) is likely too high, "
                        "or the images or the starting weights are broken; nothing was written for this step")


def cpp_compiler_found() -> bool:
    """Whether the compiler torch.compile builds its CPU kernels with ($CXX, default g++) is on the PATH."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def _rank_seed(seed: int, rank: int, step: int) -> int:
    return (seed + 1_000_003 * rank + 7919 * step) % 2**63


def _ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return loss.item()


def _warm_start(net: UNetModel, path: str) -> None:
    """Continue from a model artifact of the same architecture (e.g. the shipped model) with a new optimiser."""
    art = artifacts.load(path, "model")
    if art.config.get("unet") != net.cfg.to_dict():
        raise UserError(f"{path}: --init needs a model of the same architecture as preset {net.cfg}")
    net.load_state_dict(art.tensors)


def _ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float, step: int) -> None:
    # a short ramp so the average is not dominated by the random initialisation in short runs
    # one fused update over all floating tensors instead of two operations per tensor; the same values
    # (benchmarks/train_speed.py times both and compares them)
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


def _save_checkpoint(path: Path, key: Any, net, ema, opt, gen: torch.Generator, state: _State,
                     other_rngs: list[torch.Tensor] = ()) -> None:
    """Weights, EMA, Adam's state, the loss history and the generator state (``rng``; ``rng.<r>`` for the other
    ranks of a torchrun group)."""
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    names = [n for n, _ in net.named_parameters()]
    for i, p in enumerate(net.parameters()):
        for slot, value in opt.state.get(p, {}).items():
            tensors[f"adam.{names[i]}.{slot}"] = value.reshape(-1) if value.ndim == 0 else value
    tensors["rng"] = gen.get_state()
    tensors.update({f"rng.{r}": rng for r, rng in enumerate(other_rngs, start=1)})
    tensors["losses"] = torch.tensor(state.losses, dtype=torch.float32)
    meta = {"identity": key.identity(), "step": state.step}
    artifacts.save(path, tensors, kind="checkpoint", config=meta, fingerprint="")


def _restore(path: Path, key: Any, net, ema, opt, gen: torch.Generator, state: _State,
             device: torch.device, rank: int = 0) -> bool:
    """Load a checkpoint of the same run; False when it holds no generator state for ``rank``."""
    art = artifacts.load(path, "checkpoint")
    if art.config.get("identity") != key.identity():
        raise UserError(f"{path}: a checkpoint of a different training run "
                        f"({json.dumps(art.config.get('identity'))}); delete it or choose another --out")
    t = art.tensors
    _check_checkpoint(art, net, ema)
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(t[f"ema.{k}"])
    for name, p in net.named_parameters():
        if f"adam.{name}.step" in t:
            opt.state[p] = {"step": t[f"adam.{name}.step"].reshape(()),
                            "exp_avg": t[f"adam.{name}.exp_avg"].to(device),
                            "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].to(device)}
    state.step = int(art.config["step"])
    state.losses = t["losses"].tolist()
    rng = t.get("rng" if rank == 0 else f"rng.{rank}")
    if rng is not None:
        gen.set_state(rng)
    return rng is not None


def _check_checkpoint(art: artifacts.Artifact, net: torch.nn.Module, ema: dict[str, torch.Tensor]) -> None:
    """A checkpoint must hold the whole state it resumes: weights and EMA weights of this network's shapes, the
    step reached, the loss history (one value per step) and the generator state."""
    t, path = art.tensors, art.path
    step = art.config.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{path}: a checkpoint without the step it reached; delete it to start over")
    for prefix, names in (("model.", net.state_dict()), ("ema.", ema)):
        for k, v in names.items():
            if f"{prefix}{k}" not in t or tuple(t[f"{prefix}{k}"].shape) != tuple(v.shape):
                raise UserError(f"{path}: checkpoint lacks {prefix}{k} of this network's shape; delete it to "
                                "start over or choose another --out")
    losses = t.get("losses")
    if losses is None or losses.ndim != 1 or len(losses) != step:
        raise UserError(f"{path}: a checkpoint without its loss history ({step} steps); delete it to start over")
    if "rng" not in t or t["rng"].dtype != torch.uint8:
        raise UserError(f"{path}: a checkpoint without its generator state; delete it to start over")


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
