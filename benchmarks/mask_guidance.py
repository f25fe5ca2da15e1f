"""Mask-guided sampling, every selection method beside Eq. 13, judged by the shapes oracle's segmentation.

A segmentation head on 20 labelled images (decoder taps out.5 out.8 at T_f = 500, as README's Table 2 analog);
per seed 4 target masks of held-out images, n samples each (`sample --guide seg.safetensors --mask M`), DDIM 25
steps. Reported per method: the mIoU between the target mask and the oracle's mask of each sample (averaged over
samples), the share of valid images, and the cost per image (U-Net forwards, feature passes and backward passes
counted by hooks; wall time), mean and spread over seeds. The head never judges.

    python benchmarks/mask_guidance.py --seeds 0 1 2 --n 16 --threads 1
Rows are appended to --out as they are measured; a rerun skips them. `--augment adv` measures heads trained with
`train-head --augment adv` instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from guidance import Counter  # noqa: E402

from ddguide.core.data import load_image, read_mask  # noqa: E402
from ddguide.core.samples import read_samples  # noqa: E402
from ddguide.metrics.miou import miou  # noqa: E402
from ddguide.shapes import oracles  # noqa: E402
from ddguide.shapes.dataset import MASK_CLASSES, ShapesConfig, generate  # noqa: E402
from ddguide.stages.extract import ExtractConfig, extract  # noqa: E402
from ddguide.stages.sample import SampleConfig, sample  # noqa: E402
from ddguide.stages.train_head import TrainHeadConfig, train_head  # noqa: E402

METHODS = {
    "unguided": None,
    "eq13-full": {"lam": 0.5, "guide_grad": "full", "guide_window": (999, 0)},  # README's mask pipeline
    "best-of-4": {"search": "best-of-n", "candidates": 4, "lam": 0.0},
    "fk-4": {"particles": 4, "lam": 0.0},
    "fk-4+eq13": {"particles": 4, "lam": 0.5, "guide_grad": "x0", "guide_window": (999, 0)},
    "prune-8": {"search": "prune", "candidates": 8, "lam": 0.0},
    "prune-8+eq13": {"search": "prune", "candidates": 8, "lam": 0.5, "guide_grad": "x0", "guide_window": (999, 0)},
    "eq13-full-w999-200": {"lam": 0.5, "guide_grad": "full", "guide_window": (999, 200)},
    "prune-32": {"search": "prune", "candidates": 32, "lam": 0.0},  # ~15x
    "prune-3+eq13": {"search": "prune", "candidates": 3, "lam": 0.5, "guide_grad": "x0"},  # sample's default window
    "prune-2+eq13": {"search": "prune", "candidates": 2, "lam": 0.5, "guide_grad": "x0"},
    "fk-16": {"particles": 16, "lam": 0.0},  # 16x
}


def head_name(augment: str, eps: float) -> str:
    """The rows' "head" key: ``none`` for the plain heads, ``adv-e{eps}`` for `train-head --augment adv` ones."""
    return "none" if augment == "none" else f"adv-e{eps}"


def head_and_targets(work: Path, seed: int, augment: str = "none", eps: float = 0.25) -> tuple[Path, list[Path]]:
    pool = work / f"pool-s{seed}"
    if not (pool / "dataset.json").exists():
        generate(pool, ShapesConfig(n=200, size=32, seed=seed, split="val"))
    name = head_name(augment, eps)
    head = work / (f"seg-s{seed}.safetensors" if name == "none" else f"seg-s{seed}-{name}.safetensors")
    if not head.exists():
        train_dir = work / f"train-s{seed}"
        train_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted((pool / "images").rglob("*.png"))[:20]:
            shutil.copyfile(f, train_dir / f.name)
        feats = extract(ExtractConfig(data=str(train_dir), out=str(work / f"f-s{seed}-{name}.safetensors"),
                                      blocks=("out.5", "out.8"), timesteps=(500,), masks=str(pool / "masks"),
                                      device="cpu"))
        train_head(TrainHeadConfig(str(feats), str(head), kind="segmentation", seed=seed, augment=augment,
                                   adv_eps=eps))
        Path(feats).unlink()
    return head, sorted((pool / "masks").glob("*.png"))[100:104]


def measure(head: Path, targets: list[Path], method: str, seed: int, n: int, steps: int) -> dict:
    options = METHODS[method]
    scores, valid, count_n = [], [], 0
    with Counter() as count:
        start = time.perf_counter()
        for j, target in enumerate(targets):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = SampleConfig(out=str(Path(tmp) / "s"), n=n, steps=steps, sampler="ddim",
                                   seed=1000 * seed + 100 * j, batch=n, device="cpu", precision="auto",
                                   guides=[str(head)] if options is not None else [],
                                   mask=str(target) if options is not None else None, **(options or {}))
                sample(cfg)
                images = np.stack([load_image(r.path) for r in read_samples(Path(tmp) / "s")])
            wanted = read_mask(target)
            pred = oracles.predict_masks(images)
            scores += [miou(p, wanted, len(MASK_CLASSES)) for p in pred]
            valid += list(oracles.is_valid(images))
            count_n += len(images)
        wall = time.perf_counter() - start
    return {"method": method, "seed": seed, "n": count_n, "steps": steps, "miou": float(np.mean(scores)),
            "valid": float(np.mean(valid)), "forward_per_image": count.forward / count_n,
            "feature_passes_per_image": count.features / count_n, "backward_per_image": count.backward / count_n,
            "seconds_per_image": wall / count_n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=16, help="samples per target mask (4 masks per seed)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/masks"))
    ap.add_argument("--out", type=Path, default=Path("runs/masks.json"))
    ap.add_argument("--augment", default="none", choices=("none", "adv"), help="the heads' train-head --augment")
    ap.add_argument("--adv-eps", type=float, default=0.25, help="their --adv-eps (--augment adv)")
    args = ap.parse_args()
    name = head_name(args.augment, args.adv_eps)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for seed in args.seeds:
        head, targets = head_and_targets(args.work, seed, args.augment, args.adv_eps)
        for method in args.methods:
            key = {"method": method, "seed": seed, "steps": args.steps, "head": name}
            if any(all(r.get(k, "none") == v for k, v in key.items()) and r["n"] == 4 * args.n for r in rows):
                continue
            row = {**measure(head, targets, method, seed, args.n, args.steps), "head": name}
            rows.append(row)
            args.out.write_text(json.dumps(rows, indent=1))
            print(json.dumps(row), flush=True)
    print(f"\n{'method':11s} {'mIoU':>13s} {'valid':>6s} {'fwd':>5s} {'feat':>5s} {'bwd':>5s} {'s/img':>6s}")
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method and r["n"] == 4 * args.n and r.get("head", "none") == name]
        if rs:
            m = np.array([r["miou"] for r in rs])
            mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
            print(f"{method:11s} {m.mean():.3f} ± {m.std():.3f} {mean('valid'):6.3f} {mean('forward_per_image'):5.0f} "
                  f"{mean('feature_passes_per_image'):5.0f} {mean('backward_per_image'):5.0f} "
                  f"{mean('seconds_per_image'):6.2f} {len(rs)} seeds x n={rs[0]['n']}")


if __name__ == "__main__":
    main()
