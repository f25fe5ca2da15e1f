"""Analogs of the paper's Tables 3 and 4 (§5.3) on the shapes domain: Classification Accuracy Score.

    python benchmarks/cas_tables.py [--workdir W] [--per-class 25] [--finetune-steps 400] [--epochs 10]
                                    [--seeds 0 1 2]

The pipeline runs once: real train/test splits -> `finetune` of the unconditional model on the real train split
-> synthetic training sets from the fine-tuned model (no guidance; classifier-free guidance with weight --cfg;
CFG + rejection by a head on the *unconditional* model's mid features at T=300, 800 with threshold 0.2: two
independent accepted sets of the real set's size, used alone (1x) or together (2x)). Then a ResNet-18 is trained
from scratch on each training set, once per seed, and tested on the real test split.

Table 3 analog: synthetic-only training sets vs real data. Table 4 analog: real data alone vs real + 1x and + 2x
CFG + rejection samples, with and without mixup/cutmix. Figures are top-1 accuracy, mean ± std over the
classifier seeds (the data, the fine-tuned model and the synthetic sets are shared by all seeds).

Every stage writes into --workdir and is skipped when its result is there, so a stopped run continues
(fine-tuning and classifier training also resume from their own checkpoints).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ddguide.core import artifacts
from ddguide.core.model import load_model
from ddguide.shapes.dataset import CLASS_NAMES, ShapesConfig
from ddguide.shapes.dataset import generate as generate_shapes
from ddguide.stages.cas import CasConfig, cas
from ddguide.stages.extract import ExtractConfig, extract
from ddguide.stages.finetune import FinetuneConfig, finetune, finetune_recipe
from ddguide.stages.sample import RejectSpec, SampleConfig, sample
from ddguide.stages.train_head import TrainHeadConfig, train_head


def stage(name: str, done: Path, run) -> None:
    """Run one stage unless ``done`` shows it has finished before; print its wall time."""
    if done.exists():
        print(f"  {name}: done before ({done.name})", flush=True)
        return
    start = time.time()
    note = run()  # a string worth printing, or whatever the stage returns
    print(f"  {name}: {time.time() - start:.0f} s{f'  ({note})' if isinstance(note, str) else ''}", flush=True)


def build_sets(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The real splits and the synthetic training sets, shared by every classifier seed."""
    n_real = args.per_class * len(CLASS_NAMES)
    real, test = root / "real", root / "test"
    size = load_model(args.model).image_size
    stage("real train split", real / "attributes.csv",
          lambda: generate_shapes(real, ShapesConfig(n=n_real, size=size, seed=args.data_seed, split="train")))
    stage("real test split", test / "attributes.csv",
          lambda: generate_shapes(test, ShapesConfig(n=args.test_per_class * len(CLASS_NAMES), size=size,
                                                     seed=args.data_seed, split="test")))

    # the fine-tuned model, and the rejection head on the unconditional model's own features
    cond, feats, head = root / "cond.safetensors", root / "rej-feats.safetensors", root / "rejection.safetensors"
    stage(f"fine-tuning ({args.finetune_steps} steps)", cond,
          lambda: finetune(FinetuneConfig(data=str(real), out=str(cond), model=args.model, device=args.device,
                                          recipe=finetune_recipe(steps=args.finetune_steps, batch=args.batch_finetune,
                                                                 seed=args.data_seed))))
    stage("rejection features (mid @ 300, 800)", feats,
          lambda: extract(ExtractConfig(data=str(real / "images"), out=str(feats), model=args.model,
                                        blocks=("mid",), timesteps=(300, 800), device=args.device)))
    stage("rejection head", head, lambda: _head_note(train_head(
        TrainHeadConfig(str(feats), str(head), kind="rejection", seed=args.data_seed))))

    def synthetic(name: str, w: float | None, reject: bool, seed_offset: int = 0) -> Path:
        out = root / name
        n = args.per_class if reject else n_real
        cfg = SampleConfig(out=str(out), model=str(cond), n=n, steps=args.steps, sampler=args.sampler,
                           seed=args.data_seed * 100000 + seed_offset, batch=64, device=args.device,
                           classes=["all"], cfg_scale=w,
                           reject=RejectSpec(str(head), args.threshold, args.model) if reject else None)

        def run():
            if reject:
                r = sample(cfg)
                return f"{r.kept} kept of {r.total} drawn: acceptance {r.kept / r.total:.2f}"
            sample(cfg)
            return f"{n} images"

        stage(f"synthetic set {name}", out / "index.csv", run)
        return out

    return {
        "real": real / "images", "test": test / "images",
        "ft": synthetic("ft", None, False), "cfg": synthetic("cfg", args.cfg, False),
        # two independent accepted sets of the real set's size: the second doubles the synthetic data
        "cfg_rej": synthetic("cfg_rej", args.cfg, True), "cfg_rej_b": synthetic("cfg_rej_b", args.cfg, True, 50000),
    }


def _head_note(path: Path) -> str:
    metrics = artifacts.load(path, "head").config.get("metrics", {})
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def top1(root: Path, sets: dict[str, Path], train: list[str], args: argparse.Namespace, seed: int,
         mix: float = 0.0) -> float:
    out = root / f"cas-{'+'.join(train)}-mix{mix}-seed{seed}.safetensors"
    start = time.time()
    result = cas(CasConfig(train=[str(sets[t]) for t in train], test=str(sets["test"]), out=str(out),
                           epochs=args.epochs, batch=args.batch, milestones=[int(args.epochs * 0.5),
                                                                             int(args.epochs * 0.75)],
                           mixup_cutmix=mix, seed=seed, stem=args.stem, precision=args.precision, device=args.device))
    print(f"  ResNet-18 on {'+'.join(train)}{f' mixup/cutmix {mix}' if mix else ''}, seed {seed}: "
          f"top-1 {result.top1:.3f} ({result.n_train} images, {time.time() - start:.0f} s)", flush=True)
    return result.top1


def one_seed(root: Path, sets: dict[str, Path], args: argparse.Namespace, seed: int) -> dict[str, float]:
    real = top1(root, sets, ["real"], args, seed)
    scores = {
        "T3 fine-tuned, no guidance": top1(root, sets, ["ft"], args, seed),
        f"T3 CFG w={args.cfg}": top1(root, sets, ["cfg"], args, seed),
        f"T3 CFG w={args.cfg} + rejection": top1(root, sets, ["cfg_rej"], args, seed),
        "T3 real data": real,
    }
    for mix in (0.0, args.mixup_cutmix):
        tag = f" (mixup/cutmix {mix})" if mix else ""
        scores[f"T4 real{tag}"] = real if not mix else top1(root, sets, ["real"], args, seed, mix)
        scores[f"T4 real + 1x synthetic{tag}"] = top1(root, sets, ["real", "cfg_rej"], args, seed, mix)
        scores[f"T4 real + 2x synthetic{tag}"] = top1(root, sets, ["real", "cfg_rej", "cfg_rej_b"], args, seed, mix)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="unconditional model (default: the shipped one)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep every stage here (default: a temp dir)")
    parser.add_argument("--per-class", type=int, default=25, help="real training images per class")
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data, fine-tuning and sampling")
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--batch-finetune", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--sampler", default="ddpm", choices=("ddim", "ddpm"),
                        help="ddpm: ancestral sampling, which gives the shipped model cleaner samples than DDIM")
    parser.add_argument("--cfg", type=float, default=0.01, help="classifier-free guidance weight (paper: 0.01)")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, auto (CUDA when present) or cuda")
    parser.add_argument("--precision", default="fp32", help="of the ResNet training (fp32 is faster here)")
    parser.add_argument("--stem", default="imagenet", choices=("imagenet", "small"),
                        help="ResNet stem: torchvision's stride-4 one (cheaper on a CPU) or the 3x3 small-input one")
    parser.add_argument("--mixup-cutmix", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    args = parser.parse_args()

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"stages in {root}:", flush=True)
        sets = build_sets(root, args)
        runs = [one_seed(root, sets, args, seed) for seed in args.seeds]
    print(f"\nCAS on the shapes domain: {args.per_class} real images per class, {len(CLASS_NAMES)} classes, "
          f"fine-tuned {args.finetune_steps} steps, ResNet-18 ({args.stem} stem) {args.epochs} epochs, "
          f"seeds {args.seeds}; "
          f"top-1 on {args.test_per_class * len(CLASS_NAMES)} real test images; {time.time() - start:.0f} s in all")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"  {name:<48}{np.mean(values):.3f} ± {np.std(values):.3f}")


if __name__ == "__main__":
    main()
