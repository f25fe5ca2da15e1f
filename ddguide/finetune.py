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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ddguide.data import labelled_images, load_images
from ddguide.errors import UserError
from ddguide.models import Model, is_main_process, load_model, resolve_device, save_model
from ddguide.train import Labels, Progress, Recipe, checkpoint_path, fit, write_loss_curve
from ddguide.unet import UNetModel

@dataclass
class FinetuneConfig:
    data: str
    out: str
    model: str | None = None  # None: the model shipped with ddguide
    steps: int = 10000
    batch: int = 64
    lr: float = 1e-4
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "bf16"
    seed: int = 0
    checkpoint_every: int = 250
    device: str = "auto"
    resize: str = "refuse"
    threads: int | None = None
    compile: bool = False  # torch.compile the network for the optimisation steps (not part of identity)

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.checkpoint_every < 1:
            raise UserError("--steps, --batch and --checkpoint-every must be >= 1")
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree with to be resumed (not the step count, device or precision)."""
        keep = ("data", "batch", "lr", "label_dropout", "ema_decay", "grad_clip", "seed", "resize")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class _RunKey:
    """What a checkpoint must match: the options, the unconditional model's fingerprint (not its path) and the
    class names."""

    cfg: FinetuneConfig
    base: str
    classes: list[str]

    def identity(self) -> dict[str, Any]:
        return {**self.cfg.identity(), "finetuned_from": self.base, "classes": self.classes}


def conditional_net(base: Model, num_classes: int, generator: torch.Generator) -> UNetModel:
    """The unconditional network with a new class embedding of ``num_classes + 1`` rows (the last is null).

    Every other weight is copied from ``base``; the embedding is drawn from N(0, 1), ``nn.Embedding``'s own
    initialisation, which guided-diffusion's class-conditional models start from.
    """
    if base.net.cfg.num_classes is not None:
        raise UserError("the model is already class-conditional; fine-tune an unconditional model")
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
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = load_model(cfg.model, "cpu")
    if base.net.cfg.num_classes is not None:
        raise UserError(f"{cfg.model or 'the shipped model'}: already class-conditional; "
                        "fine-tune an unconditional model")
    files, labels_list, names = labelled_images(cfg.data)
    if len(names) < 2:
        raise UserError(f"{cfg.data}: only one class ({names[0]}); class-conditional fine-tuning needs two or more")

    # the unconditional weights with a new class embedding; each batch's labels dropped to null with probability p
    gen = torch.Generator().manual_seed(cfg.seed)
    net = conditional_net(base, len(names), gen).to(device)
    null = len(names)  # the last embedding row

    def read() -> tuple[torch.Tensor, Labels]:
        report = (lambda done, total: progress(done, total, "reading images")) if progress else None
        images = torch.from_numpy(load_images(files, base.image_size, cfg.resize, report))  # (N, H, W, 3) uint8
        labels = torch.tensor(labels_list, dtype=torch.long)  # (N,)
        return images, lambda idx, g: drop_labels(labels[idx], cfg.label_dropout, null, g)

    recipe = Recipe(cfg.steps, cfg.batch, cfg.lr, 0, cfg.ema_decay, cfg.grad_clip, cfg.precision,
                    cfg.checkpoint_every, compile=cfg.compile)
    ema, state = fit(net, base.diffusion, recipe, checkpoint_path(cfg.out), _RunKey(cfg, base.fingerprint, names),
                     gen, read, device, progress)

    # the artifact (written once, by rank 0 under torchrun): EMA weights, class names and the model's origin
    if not is_main_process():
        return Path(cfg.out)
    model = Model(UNetModel(net.cfg), base.diffusion, classes=names,
                  info={"finetuned_from": base.fingerprint, "finetune": asdict(cfg), "trained_steps": state.step})
    save_model(cfg.out, model, state_dict=ema)
    write_loss_curve(Path(cfg.out).with_suffix(".loss.png"), state.losses)
    return Path(cfg.out)
