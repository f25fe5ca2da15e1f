"""Guided sampling methods side by side on the shipped model, judged by the shapes oracle (never by the head).

For each attribute: a head from 50 + 50 labelled images (the default taps, as `extract` picks them), then n samples
per seed and method, all through `ddguide.stages.sample.sample` (what `ddguide sample` runs), DDIM 25 steps. The
methods that guide by Eq. 13 guide at every step (`--guide-window 999 0`, as they were measured before sample's
default window, t >= 200, existed; `eq13-x0-w999-200` is that default):

    unguided        plain sampling
    eq13-x0         Eq. 13, --lambda 3 --guide-grad x0
    eq13-full       Eq. 13, --lambda 3 --guide-grad full (the paper's gradient, through the denoiser too)
    best-of-N       N candidates, the head as verifier keeps the best (--search best-of-n)
    fk-K            Feynman-Kac steering with K particles, potentials from the head (--particles K)
    fk-K+eq13       FK whose proposal is the Eq. 13 step (--particles K --lambda 1 --guide-grad x0)
    zero-order      --search zero-order --candidates 2 --rounds 1
    prune-N         N candidates; the verifier's best 3/8 go on after 7 of 25 steps, its best one after 16
                    (--search prune --candidates N, the default schedule)
    tds-K           the twisted diffusion sampler with K particles (--smc tds --particles K --lambda 1
                    --guide-grad x0; DDIM eta 1)
    prune-N+eq13    the pruned search over Eq. 13 trajectories (--search prune --candidates N --lambda 1
                    --guide-grad x0); N = 2, 3 under sample's default window, N = 4, 8 at every step;
                    -every2[-lambdaL]: Eq. 13 at every 2nd step (--guide-every 2), lambda L (default 1)

Reported per method: the oracle's share of images with the attribute, the share of valid images, the Frechet
distance (denoiser `mid` features, as `ddguide fid --features denoiser`) to real images that have the attribute,
the cost per image in U-Net passes (full forwards, truncated feature passes, backward passes, counted by hooks)
and wall time, mean and spread over seeds.

    python benchmarks/guidance.py --attributes has_red has_circle --seeds 0 1 2 --n 64 --out runs/guidance.json
    python benchmarks/guidance.py --attributes has_red --methods unguided prune-8 --steps 50 --sampler ddpm \
        --out runs/guidance-ddpm.json          # sample's default sampler
Rows are appended to --out as they are measured; a rerun skips the rows already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lambda_curve import head_for, labelled_pool  # noqa: E402

from ddguide.core.data import load_image  # noqa: E402
from ddguide.core.model import load_model  # noqa: E402
from ddguide.core.samples import read_samples  # noqa: E402
from ddguide.core.unet import UNetModel  # noqa: E402
from ddguide.metrics.fid import DenoiserFeatures, frechet_distance  # noqa: E402
from ddguide.shapes import oracles  # noqa: E402
from ddguide.shapes.dataset import ShapesConfig, generate  # noqa: E402
from ddguide.stages.extract import ExtractConfig  # noqa: E402
from ddguide.stages.sample import SampleConfig, sample  # noqa: E402
from ddguide.stages.tapsweep import extract_auto  # noqa: E402
from ddguide.stages.train_head import TrainHeadConfig, train_head  # noqa: E402

METHODS = {
    "unguided": {},
    "eq13-x0": {"lam": 3.0, "guide_grad": "x0", "guide_window": (999, 0)},
    "eq13-full": {"lam": 3.0, "guide_grad": "full", "guide_window": (999, 0)},  # the paper's gradient
    "best-of-4": {"search": "best-of-n", "candidates": 4, "lam": 0.0},
    "best-of-8": {"search": "best-of-n", "candidates": 8, "lam": 0.0},
    "fk-4": {"particles": 4, "lam": 0.0},
    "fk-8": {"particles": 8, "lam": 0.0},
    "fk-4+eq13": {"particles": 4, "lam": 1.0, "guide_grad": "x0", "guide_window": (999, 0)},
    "zero-order": {"search": "zero-order", "candidates": 2, "rounds": 1, "lam": 0.0},
    "tds-2": {"particles": 2, "smc": "tds", "lam": 1.0, "guide_grad": "x0"},
    "tds-4": {"particles": 4, "smc": "tds", "lam": 1.0, "guide_grad": "x0"},
    "tds-8": {"particles": 8, "smc": "tds", "lam": 1.0, "guide_grad": "x0"},
    "tds-4-scale3": {"particles": 4, "smc": "tds", "lam": 1.0, "guide_grad": "x0", "potential_scale": 3.0},
    "tds-4-lambda3": {"particles": 4, "smc": "tds", "lam": 3.0, "guide_grad": "x0"},
    "best-of-16": {"search": "best-of-n", "candidates": 16, "lam": 0.0},
    "prune-4": {"search": "prune", "candidates": 4, "lam": 0.0},  # ~2x an unguided sample (default schedule)
    "prune-8": {"search": "prune", "candidates": 8, "lam": 0.0},  # ~4x
    "prune-16": {"search": "prune", "candidates": 16, "lam": 0.0},  # ~8x
    "prune-32": {"search": "prune", "candidates": 32, "lam": 0.0},  # ~15x
    # the pruned search over Eq. 13 trajectories
    "prune-4+eq13": {"search": "prune", "candidates": 4, "lam": 1.0, "guide_grad": "x0", "guide_window": (999, 0)},
    "prune-8+eq13": {"search": "prune", "candidates": 8, "lam": 1.0, "guide_grad": "x0", "guide_window": (999, 0)},
    "fk-16": {"particles": 16, "lam": 0.0},
    # under sample's default window (t >= 200): Eq. 13 at lambda 1, and the pruned search over 2 or 3 such trajectories
    "eq13-x0-lambda1": {"lam": 1.0, "guide_grad": "x0"},
    "prune-2+eq13": {"search": "prune", "candidates": 2, "lam": 1.0, "guide_grad": "x0"},
    "prune-3+eq13": {"search": "prune", "candidates": 3, "lam": 1.0, "guide_grad": "x0"},
    "prune-3+eq13-every2": {"search": "prune", "candidates": 3, "lam": 1.0, "guide_grad": "x0", "guide_every": 2},
    "prune-3+eq13-every2-lambda2": {"search": "prune", "candidates": 3, "lam": 2.0, "guide_grad": "x0",
                                    "guide_every": 2},
    "prune-2+eq13-lambda3": {"search": "prune", "candidates": 2, "lam": 3.0, "guide_grad": "x0"},
    "prune-3+eq13-every2-lambda3": {"search": "prune", "candidates": 3, "lam": 3.0, "guide_grad": "x0",
                                    "guide_every": 2},
    "prune-3+eq13-every2-lambda4": {"search": "prune", "candidates": 3, "lam": 4.0, "guide_grad": "x0",
                                    "guide_every": 2},
    # Eq. 13 only on the noisy half (t >= 500), where it lifts has_circle (eq13-x0-w999-500 vs -w500-0)
    "prune-3+eq13-w500-lambda3": {"search": "prune", "candidates": 3, "lam": 3.0, "guide_grad": "x0",
                                  "guide_window": (999, 500)},
    "prune-3+eq13-w500-every2-lambda4": {"search": "prune", "candidates": 3, "lam": 4.0, "guide_grad": "x0",
                                         "guide_window": (999, 500), "guide_every": 2},
    "prune-4+eq13-every3-lambda3": {"search": "prune", "candidates": 4, "lam": 3.0, "guide_grad": "x0",
                                    "guide_every": 3},
    "prune-3+eq13-every3-lambda4": {"search": "prune", "candidates": 3, "lam": 4.0, "guide_grad": "x0",
                                    "guide_every": 3},
    "eq13-x0-every2": {"lam": 3.0, "guide_grad": "x0", "guide_every": 2, "guide_window": (999, 0)},
    "eq13-x0-w999-500": {"lam": 3.0, "guide_grad": "x0", "guide_window": (999, 500)},  # the noisy half only
    "eq13-x0-w999-200": {"lam": 3.0, "guide_grad": "x0", "guide_window": (999, 200)},  # sample's default window
    "eq13-x0-w500-0": {"lam": 3.0, "guide_grad": "x0", "guide_window": (500, 0)},  # the clean half only
}


class Counter:
    """Images through the U-Net's full forward, through truncated feature passes, and backward passes."""

    def __init__(self) -> None:
        self.forward = self.features = self.backward = 0
        self._forward, self._features, self._grad = UNetModel.forward, UNetModel.features, torch.autograd.grad

    def __enter__(self) -> "Counter":
        counter = self

        def forward(net, x, *a, **k):
            counter.forward += len(x)
            return counter._forward(net, x, *a, **k)

        def features(net, x, *a, **k):
            counter.features += len(x)
            return counter._features(net, x, *a, **k)

        def grad(outputs, inputs, *a, **k):
            counter.backward += len(inputs[0] if isinstance(inputs, (list, tuple)) else inputs)
            return counter._grad(outputs, inputs, *a, **k)

        UNetModel.forward, UNetModel.features, torch.autograd.grad = forward, features, grad
        return self

    def __exit__(self, *_: object) -> None:
        UNetModel.forward, UNetModel.features, torch.autograd.grad = self._forward, self._features, self._grad


def auto_head(work: Path, attribute: str, seed: int = 0) -> tuple[Path, tuple[str, ...]]:
    """The head of `extract --blocks auto --timesteps 300` on the same 50 + 50 labelled images as the default-taps
    head (the pool of ``head_for``), and the blocks the k-fold probe picked."""
    head, picked = work / f"{attribute}-auto-300-s{seed}.head.safetensors", work / f"{attribute}-auto-s{seed}.json"
    if head.exists() and picked.exists():
        return head, tuple(json.loads(picked.read_text()))
    folder, table = labelled_pool(work, attribute, seed)
    feats = work / f"{attribute}-auto-300-s{seed}.features.safetensors"
    path, rows = extract_auto(ExtractConfig(data=str(folder), out=str(feats), timesteps=(300,), labels=str(table),
                                            label=attribute), auto_blocks=True, auto_times=False)
    train_head(TrainHeadConfig(features=str(path), out=str(head), seed=seed))
    feats.unlink()
    picked.write_text(json.dumps(list(rows[0].blocks)))
    return head, tuple(rows[0].blocks)


def real_features(work: Path, attribute: str, extractor: DenoiserFeatures, n: int = 512) -> np.ndarray:
    """Denoiser features of n fresh real images that have the attribute."""
    cache = work / f"real-{attribute}.npy"
    if cache.exists():
        return np.load(cache)
    pool = work / "real-pool"
    if not (pool / "dataset.json").exists():
        generate(pool, ShapesConfig(n=3 * n, size=32, seed=4242, split="test"))
    images = np.stack([load_image(r.path) for r in read_samples(pool)])
    keep = images[oracles.predict_attributes(images)[attribute] == 1][:n]
    feats = features_of(keep, extractor)
    np.save(cache, feats)
    return feats


def features_of(images: np.ndarray, extractor: DenoiserFeatures) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return np.concatenate([extractor(x[i:i + 128]).numpy() for i in range(0, len(x), 128)]).astype(np.float64)


def fd(a: np.ndarray, b: np.ndarray) -> float:
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def measure(head: Path, attribute: str, method: str, seed: int, n: int, steps: int, batch: int,
            real: np.ndarray, extractor: DenoiserFeatures, sampler: str = "ddim",
            verifiers: list[Path] | None = None) -> dict:
    options = dict(METHODS[method])
    guided = method != "unguided"
    if verifiers and ("search" in options or "particles" in options) and options.get("smc") != "tds":
        options["verifier"] = [str(v) for v in verifiers]
    with tempfile.TemporaryDirectory() as tmp, Counter() as count:
        start = time.perf_counter()
        cfg = SampleConfig(out=str(Path(tmp) / "s"), n=n, steps=steps, sampler=sampler, seed=1000 * seed, batch=batch,
                           device="cpu",
                           precision="auto", guides=[str(head)] if guided else [], **options)
        sample(cfg)
        wall = time.perf_counter() - start
        images = np.stack([load_image(r.path) for r in read_samples(Path(tmp) / "s")])
    attrs = oracles.predict_attributes(images)
    return {"attribute": attribute, "method": method, "seed": seed, "n": n, "steps": steps,
            "share": float((attrs[attribute] == 1).mean()), "valid": float(oracles.is_valid(images).mean()),
            "fd_to_real_with_attribute": fd(features_of(images, extractor), real),
            "forward_per_image": count.forward / n, "feature_passes_per_image": count.features / n,
            "backward_per_image": count.backward / n, "seconds_per_image": wall / n}


# what a row was measured with beyond its method and seed, and the value a row that lacks the key had
SETTINGS = {"sampler": "ddim", "taps": "default", "verifier": "guide", "head": None}


def setting(row: dict) -> tuple:
    return tuple(row.get(k, v) for k, v in SETTINGS.items())


def summarise(rows: list[dict]) -> None:
    print(f"\n{'attribute':12s} {'method':11s} {'share':>13s} {'valid':>6s} {'FD':>7s} {'fwd':>5s} {'feat':>5s} "
          f"{'bwd':>5s} {'s/img':>6s} seeds")
    keys = sorted({(r["attribute"], r["method"]) for r in rows}, key=lambda k: (k[0], list(METHODS).index(k[1])))
    for attribute, method in keys:
        rs = [r for r in rows if r["attribute"] == attribute and r["method"] == method]
        share = np.array([r["share"] for r in rs])
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        print(f"{attribute:12s} {method:11s} {share.mean():.3f} ± {share.std():.3f} {mean('valid'):6.3f} "
              f"{mean('fd_to_real_with_attribute'):7.2f} {mean('forward_per_image'):5.0f} "
              f"{mean('feature_passes_per_image'):5.0f} {mean('backward_per_image'):5.0f} "
              f"{mean('seconds_per_image'):6.2f} {len(rs)} x n={rs[0]['n']}")


def summarise_heads(per_head: list[list[dict]]) -> None:
    """Per attribute and method, the mean over heads of each head's mean over seeds (share with its min-max,
    validity, FD)."""
    print(f"\nover {len(per_head)} heads:")
    keys = sorted({(r["attribute"], r["method"]) for rs in per_head for r in rs})
    for attribute, method in keys:
        means = [[float(np.mean([r[k] for r in rs if (r["attribute"], r["method"]) == (attribute, method)]))
                  for k in ("share", "valid", "fd_to_real_with_attribute")]
                 for rs in per_head if any((r["attribute"], r["method"]) == (attribute, method) for r in rs)]
        a = np.array(means)
        print(f"{attribute:12s} {method:11s} share {a[:, 0].mean():.3f} (heads {a[:, 0].min():.3f}-{a[:, 0].max():.3f})"
              f" valid {a[:, 1].mean():.3f} FD {a[:, 2].mean():.2f}  {len(means)} heads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attributes", nargs="+", default=["has_red", "has_circle"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="sample seeds (default 0 1 2; with --summary: every seed in the files unless given)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"),
                    help="ddim (eta 0; the rows in README) or ddpm (sample's default sampler)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--taps", default="default", choices=("default", "auto"),
                    help="the head's taps: extract's default (the rows in README unless they say otherwise) or "
                         "`extract --blocks auto` on the same labelled images (rows keyed \"taps\": \"auto\")")
    ap.add_argument("--head", type=Path, nargs="+", default=None,
                    help="guide with this head file instead of the one trained here (one attribute; rows keyed "
                         "\"head\": its file name); with --summary, several: one table per head and their mean")
    ap.add_argument("--verifier", default="guide", choices=("guide", "auto", "both"),
                    help="what scores candidates and particles: the guiding head (sample's default), the head of "
                         "`extract --blocks auto` on the same labelled images, or both together (the sum of their "
                         "log-probabilities); rows keyed \"verifier\"")
    ap.add_argument("--work", type=Path, default=Path("runs/guidance"))
    ap.add_argument("--out", type=Path, default=Path("runs/guidance.json"))
    ap.add_argument("--summary", nargs="+", type=Path, metavar="JSON",
                    help="measure nothing: the table over the seeds of these files' rows (a row measured twice "
                         "counts once) for --attributes, --methods, --n, --steps, --sampler, --taps, --verifier, "
                         "--head and --seeds")
    args = ap.parse_args()
    wanted = {"sampler": args.sampler, "taps": args.taps, "verifier": args.verifier}
    if args.summary:
        merged: dict[tuple, dict] = {}
        for path in args.summary:
            for r in json.loads(path.read_text()):
                merged.setdefault((r["attribute"], r["method"], r["seed"], r["n"], r["steps"], setting(r)), r)
        per_head = []
        for head in args.head or [None]:
            want = setting({**wanted, "head": head.name if head else None})
            rs = [r for r in merged.values() if r["attribute"] in args.attributes and r["method"] in args.methods
                  and r["n"] == args.n and r["steps"] == args.steps and setting(r) == want
                  and (args.seeds is None or r["seed"] in args.seeds)]
            if head:
                print(f"head {head.name}:")
            summarise(rs)
            per_head.append(rs)
        if len(per_head) > 1:
            summarise_heads(per_head)
        return
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    if args.head and len(args.head) > 1:
        ap.error("--head: one head file when measuring (several only with --summary)")
    given = args.head[0] if args.head else None
    args.seeds = args.seeds or [0, 1, 2]
    wanted["head"] = given.name if given else None
    model = load_model()
    extractor = DenoiserFeatures(model, "cpu")
    for attribute in args.attributes:
        if given:
            head = given
        elif args.taps == "auto":
            head, blocks = auto_head(args.work, attribute)
            print(f"{attribute}: --blocks auto picked {' '.join(blocks)}", flush=True)
        else:
            head = head_for(args.work, attribute, tuple(model.net.default_taps()), (300,), 0)
        verifiers = None if args.verifier == "guide" else \
            ([head] if args.verifier == "both" else []) + [auto_head(args.work, attribute)[0]]
        real = real_features(args.work, attribute, extractor)
        for seed in args.seeds:
            for method in args.methods:
                key = (attribute, method, seed, args.n, args.steps, setting(wanted))
                if any((r["attribute"], r["method"], r["seed"], r["n"], r["steps"], setting(r)) == key for r in rows):
                    continue
                row = measure(head, attribute, method, seed, args.n, args.steps, args.batch, real, extractor,
                              args.sampler, verifiers)
                row.update({k: v for k, v in wanted.items() if k == "sampler" or v != SETTINGS[k]})
                rows.append(row)
                args.out.write_text(json.dumps(rows, indent=1))
                print(json.dumps(row), flush=True)
    summarise([r for r in rows if setting(r) == setting(wanted)])


if __name__ == "__main__":
    main()
