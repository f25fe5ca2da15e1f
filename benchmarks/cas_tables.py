"""Analogs of the paper's Tables 3 and 4 (§5.3) on the shapes domain: Classification Accuracy Score.

    python benchmarks/cas_tables.py [--per-class 100] [--finetune-steps 2000] [--epochs 15] [--seeds 0 1 2]

Pipeline per seed: real train/test splits -> `finetune` of the unconditional model on the real train split ->
synthetic sets from the fine-tuned model (no guidance, classifier-free guidance with weight --cfg, and CFG +
rejection by a head on the unconditional model's mid features at T=300, 800 with threshold 0.2) -> a ResNet-18
trained from scratch on each training set and tested on the real test split.

Table 3 analog: synthetic-only training sets vs real data. Table 4 analog: real data alone vs real + 1x and + 2x
CFG + rejection samples, with and without mixup/cutmix. Figures are top-1 accuracy, mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from ddguide.cas import CasConfig, cas
from ddguide.features import ExtractConfig, extract
from ddguide.filter import RejectionSampling, sample_with_rejection
from ddguide.finetune import FinetuneConfig, finetune
from ddguide.generate import SampleConfig, generate
from ddguide.guidance import class_sampling
from ddguide.heads import TrainHeadConfig, train_head
from ddguide.models import load_model
from ddguide.shapes import CLASS_NAMES, ShapesConfig
from ddguide.shapes import generate as generate_shapes


def top1(train: list[Path], test: Path, out: Path, args: argparse.Namespace, seed: int, mix: float = 0.0) -> float:
    result = cas(CasConfig(train=[str(t) for t in train], test=str(test), out=str(out), epochs=args.epochs,
                           batch=args.batch, milestones=[int(args.epochs * 0.5), int(args.epochs * 0.75)],
                           mixup_cutmix=mix, seed=seed, device="cpu"))
    return result.top1


def one_seed(root: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    n_real = args.per_class * len(CLASS_NAMES)
    real, test = root / "real", root / "test"
    size = load_model(args.model).image_size
    generate_shapes(real, ShapesConfig(n=n_real, size=size, seed=seed, split="train"))
    generate_shapes(test, ShapesConfig(n=args.test_per_class * len(CLASS_NAMES), size=size, seed=seed, split="test"))

    # the fine-tuned model, and the rejection head on the unconditional model's own features
    cond = root / "cond.safetensors"
    finetune(FinetuneConfig(data=str(real), out=str(cond), model=args.model, steps=args.finetune_steps,
                            batch=args.batch_finetune, seed=seed, device="cpu"))
    feats = extract(ExtractConfig(data=str(real / "images"), out=str(root / "rej-feats.safetensors"),
                                  model=args.model, blocks=("mid",), timesteps=(300, 800), device="cpu"))
    head = train_head(TrainHeadConfig(str(feats), str(root / "rejection.safetensors"), kind="rejection", seed=seed))

    def synthetic(name: str, w: float | None, reject: bool, copies: int) -> Path:
        out = root / name
        cfg = SampleConfig(out=str(out), model=str(cond), n=args.per_class * copies if reject else n_real * copies,
                           steps=args.steps, seed=seed * 100000, batch=64, device="cpu")
        if reject:
            sample_with_rejection(cfg, RejectionSampling(str(head), args.threshold, args.model, ["all"], w))
        else:
            generate(cfg, class_sampling(["all"], w, "fp32"))
        return out

    plain, cfg_set = synthetic("ft", None, False, 1), synthetic("cfg", args.cfg, False, 1)
    rejected, rejected2 = synthetic("cfg_rej", args.cfg, True, 1), synthetic("cfg_rej2", args.cfg, True, 2)
    scores = {
        "T3 fine-tuned, no guidance": top1([plain], test / "images", root / "r1.safetensors", args, seed),
        f"T3 CFG w={args.cfg}": top1([cfg_set], test / "images", root / "r2.safetensors", args, seed),
        f"T3 CFG w={args.cfg} + rejection": top1([rejected], test / "images", root / "r3.safetensors", args, seed),
        "T3 real data": top1([real], test / "images", root / "r4.safetensors", args, seed),
    }
    for mix in (0.0, args.mixup_cutmix):
        tag = f" (mixup/cutmix {mix})" if mix else ""
        scores[f"T4 real{tag}"] = top1([real], test / "images", root / f"m0{mix}.safetensors", args, seed, mix)
        scores[f"T4 real + 1x synthetic{tag}"] = top1([real, rejected], test / "images",
                                                       root / f"m1{mix}.safetensors", args, seed, mix)
        scores[f"T4 real + 2x synthetic{tag}"] = top1([real, rejected2], test / "images",
                                                       root / f"m2{mix}.safetensors", args, seed, mix)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="unconditional model (default: the shipped one)")
    parser.add_argument("--per-class", type=int, default=100, help="real training images per class")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--finetune-steps", type=int, default=2000)
    parser.add_argument("--batch-finetune", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--cfg", type=float, default=0.01, help="classifier-free guidance weight (paper: 0.01)")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mixup-cutmix", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_seed(Path(tmp), args, seed))
    print(f"\nCAS on the shapes domain: {args.per_class} real images per class, {len(CLASS_NAMES)} classes, "
          f"fine-tuned {args.finetune_steps} steps, ResNet-18 {args.epochs} epochs; top-1 on the real test split")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"  {name:<48}{np.mean(values):.3f} ± {np.std(values):.3f}")


if __name__ == "__main__":
    main()
