"""`ddguide finetune`: a class-conditional model from an unconditional one (paper §4.2, §5.3).

The unconditional weights are copied unchanged and a new, randomly initialised class embedding is added to the
time embedding (guided-diffusion's ``label_emb``, ``nn.Embedding(K + 1, 4 * model_channels)``). Row ``K`` - the
last - is the null class: with label dropout (Ho & Salimans) each training label becomes the null class with
probability ``p``, so the one network learns both ``eps(x, c)`` and ``eps(x)`` and samples with classifier-free
guidance ``eps = (1 + w) eps(x, c) - w eps(x)`` (``ddguide sample --class C --cfg 0.01``).

Training resumes like ``ddguide train``: a ``checkpoint`` artifact beside the output holds the weights, the EMA
weights, Adam's state, the generator state and the loss history, and rerunning the same command continues.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddguide.core.checkpoint import checkpoint_path
from ddguide.core.data import labelled_images, load_images
from ddguide.core.errors import UserError
from ddguide.core.model import Model, load_model
from ddguide.core.unet import UNetModel
from ddguide.stages.training import Labels, Progress, Recipe, fit, flat_config, run_identity, setup_device, write_model

# `ddguide finetune`'s defaults: 2000 steps take ~20 min on 2 CPU cores with the shipped model (batch 64, bf16,
# ~0.6 s a step); class conditioning keeps improving with more steps, which a GPU affords
FINETUNE_RECIPE = Recipe(steps=2000, lr=1e-4, warmup=0)


def finetune_recipe(**overrides: Any) -> Recipe:
    """``finetune``'s default recipe with ``overrides`` (any :class:`Recipe` field)."""
    return dataclasses.replace(FINETUNE_RECIPE, **overrides)


@dataclass
class FinetuneConfig:
    data: str
    out: str
    model: str | None = None  # None: the model shipped with ddguide
    recipe: Recipe = field(default_factory=finetune_recipe)
    label_dropout: float = 0.1
    resize: str = "refuse"
    threads: int | None = None
    device: str = "auto"
    export: bool = False  # write the model from the last checkpoint without training further

    def validate(self) -> None:
        self.recipe.validate()
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree with to be resumed (not the step count, device or precision,
        unless a recipe option that is off by default ties the run to them)."""
        keep = ["data", "batch", "lr", "label_dropout", "ema_decay", "grad_clip", "seed", "resize"]
        keep += (["warmup"] if self.recipe.warmup else []) + self.recipe.optional_keys()
        return run_identity(self, keep)


def conditional_net(base: Model, num_classes: int, generator: torch.Generator, name: str = "the model") -> UNetModel:
    """The unconditional network with a new class embedding of ``num_classes + 1`` rows (the last is null).

    Every other weight is copied from ``base``; the embedding is drawn from N(0, 1), ``nn.Embedding``'s own
    initialisation, which guided-diffusion's class-conditional models start from. A ``base`` that is already
    class-conditional is refused naming it as ``name``.
    """
    if not isinstance(base.net, UNetModel):
        raise UserError(f"{name}: a diffusers UNet2DModel; finetune adds a class embedding to ddguide's ADM U-Nets "
                        "only")
    if base.net.cfg.num_classes is not None:
        raise UserError(f"{name}: already class-conditional; fine-tune an unconditional model")
    net = UNetModel(dataclasses.replace(base.net.cfg, num_classes=num_classes + 1))
    missing, unexpected = net.load_state_dict(base.net.state_dict(), strict=False)
    assert missing == ["label_emb.weight"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        net.label_emb.weight.copy_(torch.randn(net.label_emb.weight.shape, generator=generator))
    return net


def drop_labels(labels: torch.Tensor, p: float, null: int, generator: torch.Generator) -> torch.Tensor:
    """Label dropout: each label is replaced by the null class with probability ``p``. Returns a new tensor;
    ``labels`` is never written to (the reference code overwrote its label tensor in place)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def finetune(cfg: FinetuneConfig, progress: Progress | None = None) -> Path:
    """Fine-tune (or resume) and write the EMA weights as a class-conditional ``model`` artifact at ``cfg.out``."""
    cfg.validate()
    device = setup_device(cfg.device, cfg.threads)
    base = load_model(cfg.model, "cpu")
    files, labels_list, names = labelled_images(cfg.data)
    if len(names) < 2:
        raise UserError(f"{cfg.data}: only one class ({names[0]}); class-conditional fine-tuning needs two or more")

    # the unconditional weights with a new class embedding; each batch's labels dropped to null with probability p
    gen = torch.Generator().manual_seed(cfg.recipe.seed)
    net = conditional_net(base, len(names), gen, cfg.model or "the shipped model").to(device)
    null = len(names)  # the last embedding row

    def read() -> tuple[torch.Tensor, Labels]:
        report = (lambda done, total: progress(done, total, "reading images")) if progress else None
        channels = base.net.cfg.in_channels  # a 1-channel model reads grey images, a 3-channel one RGB
        images = torch.from_numpy(load_images(files, base.image_size, cfg.resize, report, channels))  # (N, H, W, C)
        labels = torch.tensor(labels_list, dtype=torch.long)  # (N,)
        return images, lambda idx, g: drop_labels(labels[idx], cfg.label_dropout, null, g)

    # what a checkpoint must match: the options, the unconditional model's fingerprint (not its path), the classes
    identity = {**cfg.identity(), "finetuned_from": base.fingerprint, "classes": names}
    ema, state = fit(net, base.diffusion, cfg.recipe, checkpoint_path(cfg.out), identity, gen, read, device, progress,
                     export=cfg.export)
    info = {"finetuned_from": base.fingerprint, "finetune": flat_config(cfg)}
    return write_model(cfg.out, net.cfg, base.diffusion, ema, state, info, classes=names)
