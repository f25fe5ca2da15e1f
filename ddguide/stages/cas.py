"""`ddguide cas`: Classification Accuracy Score (Ravuri & Vinyals 2019; paper §5.3, Tables 3-4).

A classifier is trained from scratch on one or more training sets - real labelled folders or ddguide samples
folders (``index.csv`` with ``file`` and ``class``) - and tested on a REAL labelled set. Classes are matched by
name, so synthetic data of a fine-tuned model is scored against the real classes it was made for.

Recipe: a torchvision-identical ResNet (``ddguide.metrics.resnet``), Adam with the learning rate multiplied by 0.1 at
each milestone epoch, random horizontal flips (unless ``hflip`` is off), and optionally mixup or cutmix (one of the two, evenly) on a
batch with probability ``p``. A checkpoint beside the report is written after every epoch; rerunning the same
command resumes from it (and only re-evaluates once training has finished). Once the report is written the
checkpoint is removed (the ResNet-18's is ~134 MB) unless ``keep_checkpoint`` is set.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ddguide.core import artifacts
from ddguide.core.checkpoint import RunState, checkpoint_path, restore_checkpoint, save_checkpoint
from ddguide.core.data import labelled_images, load_images, open_image, to_tensor
from ddguide.core.errors import UserError
from ddguide.core.runtime import autocast
from ddguide.metrics.resnet import ARCHITECTURES, ResNet, build
from ddguide.stages.training import check_finite_loss, run_identity, setup_device

Progress = Callable[[int, int, str], None]
STEMS = ("auto", "small", "imagenet")


@dataclass
class CasConfig:
    train: list[str]
    test: str
    out: str = "cas_report.safetensors"
    arch: str = "resnet18"
    epochs: int = 40
    batch: int = 256
    lr: float = 1e-3
    milestones: list[int] = field(default_factory=lambda: [20, 30])
    mixup_cutmix: float = 0.0
    stem: str = "auto"  # auto: the small-input stem for images of 64 px or less
    image_size: int | None = None  # None: the side of the test images
    resize: str = "refuse"
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    hflip: bool = True  # random horizontal flips (wrong for digits and text)
    keep_checkpoint: bool = False  # keep the classifier's checkpoint once the report is written

    def validate(self) -> None:
        if not self.train:
            raise UserError("give at least one --train folder")
        if self.epochs < 1 or self.batch < 2:
            raise UserError("--epochs must be >= 1 and --batch >= 2")
        if self.arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture {self.arch!r}; choose from {', '.join(ARCHITECTURES)}")
        if self.stem not in STEMS:
            raise UserError(f"unknown stem {self.stem!r} ({', '.join(STEMS)})")
        if not 0.0 <= self.mixup_cutmix <= 1.0:
            raise UserError(f"--mixup-cutmix must be in [0, 1], got {self.mixup_cutmix}")

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must agree with to be resumed (not the epoch count, device or precision)."""
        return run_identity(self, ("train", "test", "arch", "batch", "lr", "milestones", "mixup_cutmix", "stem",
                                   "image_size", "resize", "seed") + (("hflip",) if not self.hflip else ()))

    def milestone_warning(self) -> str | None:
        """A sentence when a learning-rate milestone lies beyond the last epoch (its decay never happens)."""
        late = [m for m in self.milestones if m >= self.epochs]
        if not late:
            return None
        return (f"--milestones {' '.join(map(str, self.milestones))}: {' and '.join(map(str, late))} "
                f"{'is' if len(late) == 1 else 'are'} not reached within --epochs {self.epochs}, so the learning "
                f"rate is decayed {len(self.milestones) - len(late)} time(s), not {len(self.milestones)}")


@dataclass
class CasResult:
    top1: float
    top5: float  # top-k with k = min(5, classes)
    k: int
    per_class: dict[str, float]  # test class name -> accuracy
    n_train: int
    n_test: int
    epoch_losses: list[float]
    report: Path


@dataclass
class LabelledSet:
    images: torch.Tensor  # (N, H, W, 3) uint8
    labels: torch.Tensor  # (N,) class ids of the classifier


# --- data ------------------------------------------------------------------------------------------------------


def match_classes(train: list[tuple[list[int], list[str]]], test_names: list[str]) -> list[str]:
    """The classifier's classes: every training class name, sorted. Test classes must all be among them."""
    classes = sorted({name for labels, names in train for name in {names[i] for i in labels}})
    if not classes:
        raise UserError("the training set is empty")
    if len(classes) < 2:
        raise UserError(f"the training set has a single class ({classes[0]}); a classifier needs two or more")
    missing = sorted(set(test_names) - set(classes))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UserError(f"test classes missing from the training set: {shown}")
    return classes


def image_side(path: Path) -> int:
    """The side of a square image (the test set fixes the classifier's input size)."""
    w, h = open_image(path).size  # the size limit applies before the side is trusted
    if w != h:
        raise UserError(f"{path}: test image is {w}x{h}, not square; pass --image-size (and --resize)")
    return w


def _relabel(labels: list[int], names: list[str], classes: list[str]) -> torch.Tensor:
    ids = {name: i for i, name in enumerate(classes)}
    return torch.tensor([ids[names[i]] for i in labels], dtype=torch.long)


# --- augmentation ------------------------------------------------------------------------------------------------


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2. (N, C, H, W) -> (N, C, H, W)"""
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(3), x)


def mixup_cutmix(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al.) or cutmix (Yun et al.), evenly, with lambda ~ Beta(1, 1) (uniform on [0, 1]).

    Returns the mixed batch, the permutation giving each image its partner, and the weight ``lam`` of the
    image's own label: the loss is ``lam * CE(y) + (1 - lam) * CE(y[perm])``.
    """
    lam = float(torch.rand((), generator=gen))
    perm = torch.randperm(len(x), generator=gen)
    use_mixup = bool(torch.rand((), generator=gen) < 0.5)
    cy, cx = (float(v) for v in torch.rand(2, generator=gen))
    if use_mixup:
        return lam * x + (1 - lam) * x[perm.to(x.device)], perm, lam
    # cutmix: a box of area (1 - lam) H W centred uniformly, clipped at the border; lam follows the clipped box
    h, w = x.shape[-2:]
    bh, bw = h * math.sqrt(1 - lam), w * math.sqrt(1 - lam)
    y0, y1 = int(np.clip(round(cy * h - bh / 2), 0, h)), int(np.clip(round(cy * h + bh / 2), 0, h))
    x0, x1 = int(np.clip(round(cx * w - bw / 2), 0, w)), int(np.clip(round(cx * w + bw / 2), 0, w))
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm.to(x.device)][:, :, y0:y1, x0:x1]
    return mixed, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


# --- training and evaluation ---------------------------------------------------------------------------------------


def learning_rate(cfg: CasConfig, epoch: int) -> float:
    """Step decay: ``lr * 0.1 ** (number of milestones reached)``."""
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch; a last batch of one image is left out (BatchNorm cannot train on it)."""
    order = torch.randperm(n, generator=gen)
    return [b for b in order.split(batch) if len(b) > 1]


def _new_classifier(cfg: CasConfig, num_classes: int, size: int) -> ResNet:
    small = cfg.stem == "small" or (cfg.stem == "auto" and size <= 64)
    with torch.random.fork_rng(devices=[]):  # initialisation from --seed without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return build(cfg.arch, num_classes, small_input=small)


@torch.no_grad()
def predict_topk(net: ResNet, images: torch.Tensor, k: int, batch: int, device: torch.device, precision: str,
                 progress: Progress | None = None) -> torch.Tensor:
    """The ``k`` most likely classes of each image, best first. (N, H, W, 3) uint8 -> (N, k)"""
    net.eval()
    out = []
    for first in range(0, len(images), batch):
        x = to_tensor(images[first:first + batch].numpy()).to(device)
        with autocast(device, precision):
            logits = net(x).float()
        out.append(logits.topk(k, dim=1).indices.cpu())
        if progress:
            progress(min(first + batch, len(images)), len(images), "testing")
    return torch.cat(out)


def scores(top: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> tuple[float, float, torch.Tensor]:
    """Top-1, top-5 (top-k for fewer than 5 classes) and per-class top-1 for every class present in ``labels``
    (in the order of ``classes``, absent classes left out)."""
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(dim=1)
    present = sorted(set(labels.tolist()))
    per_class = torch.tensor([hit1[labels == c].float().mean().item() for c in present])
    return hit1.float().mean().item(), hit5.float().mean().item(), per_class


def cas(cfg: CasConfig, progress: Progress | None = None) -> CasResult:
    """Train the classifier on ``cfg.train`` (or resume), test it on ``cfg.test``, write the report."""
    cfg.validate()
    device = setup_device(cfg.device, cfg.threads)

    # 1. the sets: class names matched across folders; the test images fix the input size
    train_sets = [labelled_images(folder) for folder in cfg.train]
    test_files, test_ids, test_names = labelled_images(cfg.test, split="val")
    classes = match_classes([(labels, names) for _, labels, names in train_sets],
                            sorted({test_names[i] for i in test_ids}))
    size = cfg.image_size or image_side(test_files[0])

    # 2. classifier, optimiser, generator: fresh, or restored from the last finished epoch
    net = _new_classifier(cfg, len(classes), size).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = RunState()  # step counts finished epochs, losses holds one mean loss per epoch
    identity, ckpt = {**cfg.identity(), "classes": classes}, checkpoint_path(cfg.out)  # a classifier has no EMA
    if ckpt.exists():
        restore_checkpoint(ckpt, identity, net, None, opt, gen, state, device)

    # 3. every image in memory at the classifier's size, read after the checks above
    read = (lambda done, total: progress(done, total, "reading images")) if progress else None
    train_files = [f for files, _, _ in train_sets for f in files]
    train = LabelledSet(torch.from_numpy(load_images(train_files, size, cfg.resize, read)),
                        torch.cat([_relabel(labels, names, classes) for _, labels, names in train_sets]))
    test = LabelledSet(torch.from_numpy(load_images(test_files, size, cfg.resize, read)),
                       _relabel(test_ids, test_names, classes))

    # 4. the loop: flips, optional mixup/cutmix, cross-entropy, step decay at the milestones
    n = len(train.images)
    per_epoch = n // cfg.batch + (n % cfg.batch > 1)  # batches of _batches
    while state.step < cfg.epochs:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, state.step)
        net.train()
        losses, t_last = [], time.time()
        for i, idx in enumerate(_batches(n, cfg.batch, gen)):
            x = to_tensor(train.images[idx].numpy()).to(device)  # (B, 3, H, W)
            if cfg.hflip:
                x = random_flip(x, gen)
            y = train.labels[idx].to(device)
            perm, lam = None, 1.0
            if cfg.mixup_cutmix and bool(torch.rand((), generator=gen) < cfg.mixup_cutmix):
                x, perm, lam = mixup_cutmix(x, gen)
            with autocast(device, cfg.precision):
                logits = net(x).float()  # (B, classes)
            loss = lam * F.cross_entropy(logits, y)
            if perm is not None:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm.to(device)])
            check_finite_loss(loss, state.step + 1, learning_rate(cfg, state.step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress:
                now = time.time()
                progress(state.step * per_epoch + i + 1, cfg.epochs * per_epoch,
                         f"epoch {state.step + 1}/{cfg.epochs}  loss {np.mean(losses[-20:]):.3f}  "
                         f"{len(idx) / max(now - t_last, 1e-9):.0f} img/s")
                t_last = now
        state.step += 1
        state.losses.append(float(np.mean(losses)))
        save_checkpoint(ckpt, identity, net, None, opt, gen, state)

    # 5. test on the real set and write the report
    k = min(5, len(classes))
    top = predict_topk(net, test.images, k, cfg.batch, device, cfg.precision, progress)
    top1, top5, per_class = scores(top, test.labels, classes)
    present = [classes[c] for c in sorted(set(test.labels.tolist()))]
    metrics = {"top1": top1, "top5": top5, "n_train": len(train.images), "n_test": len(test.images),
               "top5_k": k, "epochs": state.step}
    config = {"cas": asdict(cfg), "metrics": metrics, "classes": present, "train_classes": classes}
    artifacts.save(cfg.out, {"per_class_accuracy": per_class,
                             "epoch_loss": torch.tensor(state.losses, dtype=torch.float32)},
                   kind="report", config=config, fingerprint="")
    if not cfg.keep_checkpoint:  # the classifier served the report; its checkpoint is only for resuming
        ckpt.unlink(missing_ok=True)
    return CasResult(top1, top5, k, dict(zip(present, per_class.tolist())), len(train.images), len(test.images),
                     list(state.losses), Path(cfg.out))
