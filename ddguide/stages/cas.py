"""`ddguide cas`: Classification Accuracy Score (Ravuri & Vinyals 2019; paper §5.3, Tables 3-4).

A classifier is trained from scratch on one or more training sets - real labelled folders or ddguide samples
folders (``index.csv`` with ``file`` and ``class``) - and tested on a REAL labelled set. Classes are matched by
name, so synthetic data of a fine-tuned model is scored against the real classes it was made for.

Recipe: a torchvision-identical ResNet (``ddguide.metrics.resnet``), Adam with the learning rate multiplied by 0.1
at each milestone epoch, random horizontal flips (unless ``hflip`` is off), and optionally mixup or cutmix (one of
the two, evenly) on a batch with probability ``p``. A checkpoint beside the report is written after every epoch;
rerunning the same command resumes from it (and only re-evaluates once training has finished). Once the report is
written the checkpoint is removed (the ResNet-18's is ~134 MB) unless ``keep_checkpoint`` is set.

Many processes: under ``torchrun`` the ranks train one classifier with DDP (each batch is the one a single process
draws, cut into consecutive slices, one per rank) and test consecutive slices of the test set, whose predictions
rank 0 gathers into the report. ``--shard i/n`` (job arrays, no communication) only tests: it needs the finished
checkpoint, writes its slice's predictions as a report part, and the last shard to finish joins the parts
(:func:`join_report`, also ``ddguide merge``) into the report one process writes.
"""

from __future__ import annotations

import json
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
from ddguide.core.outputs import join_when_complete
from ddguide.core.runtime import (
    Shard,
    all_gather,
    autocast,
    barrier,
    broadcast_from_main,
    part_path,
    resolve_shard,
    sum_over_ranks,
)
from ddguide.metrics.resnet import ARCHITECTURES, ResNet, build
from ddguide.stages.training import check_finite_loss, ddp_module, run_identity, setup_device

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
    shard: str | None = None  # "i/n": test the i-th of n slices of the test set with the trained classifier

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
    report: Path  # with --shard: this shard's part until the parts are joined
    joined: bool = True  # with --shard: whether the report now covers every shard's test images


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


def _batches(n: int, batch: int, gen: torch.Generator, least: int = 2) -> list[torch.Tensor]:
    """A shuffled epoch; a last batch of fewer than ``least`` images is left out (BatchNorm cannot train on one
    image, and under torchrun each rank trains on a slice of every batch)."""
    order = torch.randperm(n, generator=gen)
    return [b for b in order.split(batch) if len(b) >= least]


def check_split(batch: int, world: int) -> None:
    """Under torchrun each of ``world`` ranks trains on a slice of every batch: each needs two images."""
    if batch < 2 * world:
        raise UserError(f"--batch {batch} leaves some of the {world} processes fewer than 2 images of a batch "
                        f"(BatchNorm needs 2): use --batch {2 * world} or more")


def _new_classifier(cfg: CasConfig, num_classes: int, size: int) -> ResNet:
    small = cfg.stem == "small" or (cfg.stem == "auto" and size <= 64)
    with torch.random.fork_rng(devices=[]):  # initialisation from --seed without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return build(cfg.arch, num_classes, small_input=small)


def _augmented(cfg: CasConfig, train: LabelledSet, idx: torch.Tensor, gen: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Batch ``idx`` as the classifier sees it: flipped, perhaps mixed. Returns the images (B, 3, H, W), their
    labels (B,), the mixing partners' labels (B,) or None, and the weight ``lam`` of each image's own label."""
    x = to_tensor(train.images[idx].numpy()).to(device)  # (B, 3, H, W)
    if cfg.hflip:
        x = random_flip(x, gen)
    y = train.labels[idx].to(device)
    if cfg.mixup_cutmix and bool(torch.rand((), generator=gen) < cfg.mixup_cutmix):
        x, perm, lam = mixup_cutmix(x, gen)
        return x, y, y[perm.to(device)], lam
    return x, y, None, 1.0


def train_epochs(cfg: CasConfig, net: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                 state: RunState, train: LabelledSet, device: torch.device, *, shard: Shard = Shard(),
                 checkpoint: Callable[[], None] | None = None, progress: Progress | None = None) -> None:
    """Train ``net`` from epoch ``state.step`` to ``cfg.epochs``; ``checkpoint`` runs after each epoch (rank 0).

    Under torchrun (``shard`` linked) every rank holds the same generator and draws what one process draws (the
    epoch's order, the flips, the mixing), then runs its consecutive slice of each batch. Each slice's mean loss
    is weighted by its share of the batch, so the gradient DDP averages is the gradient of the batch's mean loss:
    the batches are those of one process whatever the number of ranks, and only BatchNorm's batch statistics are
    taken per rank (rank 0's running statistics are kept)."""
    shard = shard if shard.linked else Shard()  # training is never split without communication
    world = shard.world
    model = ddp_module(net, device) if world > 1 else net
    least = 2 * world  # images in a batch: two or more for BatchNorm in each rank
    n = len(train.images)
    per_epoch = n // cfg.batch + (n % cfg.batch >= least)  # batches of _batches
    while state.step < cfg.epochs:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, state.step)
        net.train()
        losses, t_last = [], time.time()
        for i, idx in enumerate(_batches(n, cfg.batch, gen, least)):
            # flips, optional mixup/cutmix, cross-entropy on this rank's slice [lo, hi) of the batch
            x, y, partner, lam = _augmented(cfg, train, idx, gen, device)  # the whole batch, on every rank
            lo, hi = shard.bounds(len(idx))
            with autocast(device, cfg.precision):
                logits = model(x[lo:hi]).float()  # (hi - lo, classes)
            loss = lam * F.cross_entropy(logits, y[lo:hi])
            if partner is not None:
                loss = loss + (1 - lam) * F.cross_entropy(logits, partner[lo:hi])
            share = (hi - lo) / len(idx)  # 1.0 in one process
            batch_loss = sum_over_ranks(loss.detach() * share, device)  # the mean loss of the whole batch
            check_finite_loss(batch_loss, state.step + 1, learning_rate(cfg, state.step))
            opt.zero_grad(set_to_none=True)
            (loss * (share * world)).backward()  # DDP averages the ranks' gradients
            opt.step()
            losses.append(batch_loss.item())
            if progress:
                now = time.time()
                progress(state.step * per_epoch + i + 1, cfg.epochs * per_epoch,
                         f"epoch {state.step + 1}/{cfg.epochs}  loss {np.mean(losses[-20:]):.3f}  "
                         f"{len(idx) / max(now - t_last, 1e-9):.0f} img/s")
                t_last = now
        state.step += 1
        state.losses.append(float(np.mean(losses)))
        if checkpoint and shard.rank == 0:
            checkpoint()
    if world > 1:  # each rank moved BatchNorm's running statistics by its own slices: all test with rank 0's
        broadcast_from_main(net.buffers(), device)


@torch.no_grad()
def predict_topk(net: ResNet, images: torch.Tensor, k: int, batch: int, device: torch.device, precision: str,
                 progress: Progress | None = None) -> torch.Tensor:
    """The ``k`` most likely classes of each image, best first. (N, H, W, 3) uint8 -> (N, k)"""
    net.eval()
    out = [torch.empty(0, k, dtype=torch.long)]  # a shard may have no test image
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
    """Train the classifier on ``cfg.train`` (or resume), test it on ``cfg.test``, write the report.

    Under torchrun the ranks train together and rank 0 writes the report (every rank returns the result). With
    ``cfg.shard`` the classifier must be trained already: the shard tests its slice of the test set and writes a
    report part, and the last shard to finish joins the parts (its result is then the whole report's)."""
    cfg.validate()
    shard = resolve_shard(cfg.shard)
    apart = not (shard.alone or shard.linked)  # --shard i/n: testing only, with the classifier trained before
    if shard.linked:
        check_split(cfg.batch, shard.world)
        progress = progress if shard.rank == 0 else None  # rank 0 reports for the group
    device = setup_device(cfg.device, cfg.threads)

    # 1. the sets: class names matched across folders; the test images fix the input size
    train_sets = [labelled_images(folder) for folder in cfg.train]
    test_files, test_ids, test_names = labelled_images(cfg.test, split="val")
    classes = match_classes([(labels, names) for _, labels, names in train_sets],
                            sorted({test_names[i] for i in test_ids}))
    size = cfg.image_size or image_side(test_files[0])

    # 2. classifier, optimiser, generator: fresh, or restored from the last finished epoch (the same on every rank)
    net = _new_classifier(cfg, len(classes), size).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = RunState()  # step counts finished epochs, losses holds one mean loss per epoch
    identity, ckpt = {**cfg.identity(), "classes": classes}, checkpoint_path(cfg.out)  # a classifier has no EMA
    if ckpt.exists():
        restore_checkpoint(ckpt, identity, net, None, opt, gen, state, device)
    if apart and state.step < cfg.epochs:
        where = f"reached epoch {state.step} of {cfg.epochs}" if ckpt.exists() else "is not there"
        raise UserError(f"--shard {shard}: the classifier's checkpoint {ckpt} {where}; train first: rerun without "
                        "--shard, or under torchrun (with --keep-checkpoint, which keeps it beside the report)")

    # 3. images in memory at the classifier's size, read after the checks above: this shard's test slice, and the
    # training set when there is training left
    read = (lambda done, total: progress(done, total, "reading images")) if progress else None
    lo, hi = shard.bounds(len(test_files))
    test_images = torch.from_numpy(load_images(test_files[lo:hi], size, cfg.resize, read))
    test_labels = _relabel(test_ids, test_names, classes)  # (N,) every test image's class
    n_train = sum(len(files) for files, _, _ in train_sets)
    if state.step < cfg.epochs:
        train_files = [f for files, _, _ in train_sets for f in files]
        train = LabelledSet(torch.from_numpy(load_images(train_files, size, cfg.resize, read)),
                            torch.cat([_relabel(labels, names, classes) for _, labels, names in train_sets]))

        # 4. the loop: flips, optional mixup/cutmix, cross-entropy, step decay at the milestones (DDP under torchrun)
        train_epochs(cfg, net, opt, gen, state, train, device, shard=shard, progress=progress,
                     checkpoint=lambda: save_checkpoint(ckpt, identity, net, None, opt, gen, state))

    # 5. test on the real set: this shard's slice, gathered under torchrun, a report part with --shard
    top = predict_topk(net, test_images, min(5, len(classes)), cfg.batch, device, cfg.precision, progress)
    if apart:
        return _write_part(cfg, shard, artifacts.fingerprint(net.state_dict()), top, test_labels, classes, state,
                           n_train)
    top = torch.cat(all_gather(top, device))  # (N, k) in rank order
    result = _report(cfg.out, asdict(cfg), top, test_labels, classes, state.losses, n_train, write=shard.rank == 0)
    if shard.rank == 0 and not cfg.keep_checkpoint:  # the classifier served the report; its checkpoint resumes
        ckpt.unlink(missing_ok=True)
    barrier(device)  # every rank returns once the report is there
    return result


def _report(out: str | Path, cas_config: dict[str, Any], top: torch.Tensor, labels: torch.Tensor,
            classes: list[str], losses: list[float], n_train: int, *, write: bool = True) -> CasResult:
    """Score the predictions ``top`` (N, k) of the test images against their ``labels`` (N,) and, when ``write``,
    write the report: the scores, per-class accuracy, the loss per epoch and every test image's predictions."""
    k = top.shape[1]
    top1, top5, per_class = scores(top, labels, classes)
    present = [classes[c] for c in sorted(set(labels.tolist()))]
    if write:
        metrics = {"top1": top1, "top5": top5, "n_train": n_train, "n_test": len(labels), "top5_k": k,
                   "epochs": len(losses)}
        config = {"cas": cas_config, "metrics": metrics, "classes": present, "train_classes": classes}
        artifacts.save(out, {"per_class_accuracy": per_class, "epoch_loss": torch.tensor(losses, dtype=torch.float32),
                             "predictions": top, "labels": labels}, kind="report", config=config, fingerprint="")
    return CasResult(top1, top5, k, dict(zip(present, per_class.tolist())), n_train, len(labels), list(losses),
                     Path(out))


def _write_part(cfg: CasConfig, shard: Shard, classifier: str, top: torch.Tensor, labels: torch.Tensor,
                classes: list[str], state: RunState, n_train: int) -> CasResult:
    """``--shard``: this shard's predictions as a report part beside ``cfg.out`` (its fingerprint names the
    classifier); the last shard to finish joins the parts. The result is the whole report's once joined, else
    this shard's slice's."""
    lo, hi = shard.bounds(len(labels))
    part = shard.part(cfg.out)
    config = {"cas": {**asdict(cfg), "shard": None}, "part": str(shard), "n_test": len(labels), "n_train": n_train,
              "train_classes": classes}
    artifacts.save(part, {"predictions": top, "labels": labels[lo:hi],
                          "epoch_loss": torch.tensor(state.losses, dtype=torch.float32)},
                   kind="report", config=config, fingerprint=classifier)
    out, joined = Path(cfg.out), []
    if join_when_complete(out, shard.parts(out), lambda: joined.append(join_report(out, shard.world))):
        return joined[0]
    result = _report(part, config["cas"], top, labels[lo:hi], classes, state.losses, n_train, write=False)
    result.joined = False
    return result


def join_report(out: str | Path, world: int) -> CasResult:
    """Join the ``world`` report parts beside ``out`` (the predictions of consecutive slices of the test set by one
    classifier) into the report one process writes; then remove the parts, and the classifier's checkpoint
    unless a shard was told to keep it."""
    out = Path(out)
    parts = [part_path(out, r, world) for r in range(world)]
    arts = [artifacts.load(p, "report") for p in parts]
    for r, (path, art) in enumerate(zip(parts, arts)):
        if art.config.get("part") != f"{r}/{world}" or not isinstance(art.config.get("cas"), dict) or \
                not {"predictions", "labels", "epoch_loss"} <= set(art.tensors):
            raise UserError(f"{path}: not part {r}/{world} of a cas report")
        if _part_key(art) != _part_key(arts[0]):
            raise UserError(f"{path} and {parts[0]} come from different cas runs (another classifier, test set or "
                            "options); rerun every shard with the same options and checkpoint")
    first = arts[0].config
    top = torch.cat([a.tensors["predictions"] for a in arts])  # (N, k)
    labels = torch.cat([a.tensors["labels"] for a in arts])  # (N,)
    if len(labels) != first["n_test"]:
        raise UserError(f"{out}: the parts hold {len(labels)} of the {first['n_test']} test images")
    result = _report(out, {**first["cas"], "out": str(out)}, top, labels, first["train_classes"],
                     arts[0].tensors["epoch_loss"].tolist(), first["n_train"])
    for path in parts:
        path.unlink(missing_ok=True)
    if not any(a.config["cas"].get("keep_checkpoint") for a in arts):  # kept for the shards until now
        checkpoint_path(out).unlink(missing_ok=True)
    return result


def _part_key(art: artifacts.Artifact) -> tuple[str, str]:
    """What the parts of one report share: the classifier and every option but the part, the output's path (parts
    may be written apart and gathered), the device, threads and whether the checkpoint is kept."""
    config = {k: v for k, v in art.config.items() if k != "part"}
    config["cas"] = {k: v for k, v in config["cas"].items() if k not in ("out", "device", "threads",
                                                                         "keep_checkpoint")}
    return art.fingerprint, json.dumps(config, sort_keys=True)
