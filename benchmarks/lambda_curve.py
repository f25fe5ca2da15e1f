"""What `sample --guide HEAD --lambda L` does on the shipped model: the oracle's attribute share against lambda.

For one attribute: 50 + 50 labelled images, `extract` with the given taps, `train-head` with its defaults, then
N samples (DDIM, the same seeds for every point) per lambda and gradient mode, judged by the shapes oracle (never by
the head): the share with the attribute and the share of valid images of the domain. `--clamps` also compares how
x0_hat's clamp to [-1, 1] is treated before the head (ddguide.method.guidance.head_input): pass (straight-through, the
default), none (the paper's Eq. 11 as is) and hard (clipped pixels get no gradient).

    python benchmarks/lambda_curve.py --attribute has_circle --lambdas 0 0.3 1 3 10 --n 64
    python benchmarks/lambda_curve.py --attribute has_circle --lambdas 1 3 --clamps pass none hard --n 64
Rows are appended to --out (JSON) as they are measured; a rerun skips the rows already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddguide.core.data import to_uint8  # noqa: E402
from ddguide.core.defaults import DEFAULT_TIMESTEPS  # noqa: E402
from ddguide.core.model import denoiser as denoiser_of  # noqa: E402
from ddguide.core.model import load_model  # noqa: E402
from ddguide.method.guidance import Guide, head_guidance  # noqa: E402
from ddguide.method.heads import load_head  # noqa: E402
from ddguide.shapes import oracles
from ddguide.shapes.dataset import ShapesConfig, generate  # noqa: E402
from ddguide.shapes.demo import labelled_subset  # noqa: E402
from ddguide.stages.extract import ExtractConfig, extract  # noqa: E402
from ddguide.stages.sample import draw, plain_denoiser, timesteps_for  # noqa: E402
from ddguide.stages.train_head import TrainHeadConfig, train_head


def labelled_pool(work: Path, attribute: str, seed: int) -> tuple[Path, Path]:
    """50 + 50 labelled images of ``attribute`` from an 800-image val pool of ``seed`` (made on first use): the
    folder and its label table."""
    pool = work / f"pool-s{seed}"
    if not (pool / "dataset.json").exists():
        generate(pool, ShapesConfig(n=800, size=32, seed=seed, split="val"))
    return labelled_subset(pool, attribute, 50)


def head_for(work: Path, attribute: str, blocks: tuple[str, ...], timesteps: tuple[int, ...], seed: int) -> Path:
    tag = f"{attribute}-{'+'.join(blocks)}-{'+'.join(map(str, timesteps))}-s{seed}"
    head = work / f"{tag}.head.safetensors"
    if head.exists():
        return head
    folder, table = labelled_pool(work, attribute, seed)
    feats = work / f"{tag}.features.safetensors"
    extract(ExtractConfig(data=str(folder), out=str(feats), blocks=blocks, timesteps=timesteps, labels=str(table),
                          label=attribute))
    train_head(TrainHeadConfig(features=str(feats), out=str(head), seed=seed))
    feats.unlink()
    return head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attribute", default="has_circle")
    ap.add_argument("--blocks", nargs="+", default=None, help="Taps (default: extract's, the model's default_taps).")
    ap.add_argument("--timesteps", nargs="+", type=int, default=list(DEFAULT_TIMESTEPS))
    ap.add_argument("--lambdas", nargs="+", type=float, default=[0, 0.3, 1, 3, 10])
    ap.add_argument("--grads", nargs="+", default=["full", "x0"])
    ap.add_argument("--clamps", nargs="+", default=["pass"])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="Head seeds (labelled set, head, samples).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/lambda"))
    ap.add_argument("--out", type=Path, default=Path("runs/lambda.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    model = load_model(None).requires_grad_(False)
    kept = timesteps_for(model, args.steps, "ddim")
    blocks, times = tuple(args.blocks or model.net.default_taps()), tuple(args.timesteps)
    for seed in args.seeds:
        head_path = head_for(args.work, args.attribute, blocks, times, seed)
        head = load_head(head_path)
        for lam in args.lambdas:
            for grad in args.grads if lam else ["-"]:
                for clamp in args.clamps if lam else ["-"]:
                    key = {"attribute": args.attribute, "blocks": list(blocks), "timesteps": list(times),
                           "lambda": lam, "grad": grad, "clamp": clamp, "seed": seed, "n": args.n,
                           "steps": args.steps}
                    if any(all(r.get(k) == v for k, v in key.items()) for r in done):
                        continue
                    start = time.perf_counter()
                    images = []
                    for first in range(0, args.n, args.batch):
                        indices = [1000 * seed + k for k in range(first, min(first + args.batch, args.n))]
                        denoiser = plain_denoiser(model, "fp32") if not lam else head_guidance(
                            denoiser_of(model), model, [Guide(head, 1.0, 1)], lam, indices, grad=grad, clamp=clamp)
                        images.append(to_uint8(draw(model, denoiser, indices, 0, kept)))
                    images = np.concatenate(images)
                    attrs = oracles.predict_attributes(images)
                    row = {**key, "share": float(attrs[args.attribute].mean()),
                           "valid": float(oracles.is_valid(images).mean()),
                           "head_val_accuracy": head.cfg.metrics.get("val_accuracy"),
                           "seconds": round(time.perf_counter() - start, 1)}
                    done.append(row)
                    args.out.write_text(json.dumps(done, indent=1))
                    print(f"{args.attribute} {'+'.join(blocks)}@{'+'.join(map(str, times))} seed {seed} lambda {lam:<5} "
                          f"{grad:4s} clamp {clamp:4s}: share {row['share']:.3f} valid {row['valid']:.3f} "
                          f"({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
