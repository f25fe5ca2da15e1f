"""Quality of an unconditional shapes model, judged by the oracle: the figures of the README's model card.

    python benchmarks/model_card.py [--model M] [--n 512] [--steps 50] [--grid docs/shapes32-samples.png]
                                    [--failures shape-failures.png]

Prints the share of samples the oracle recognises as valid images of the domain, the rules the others break,
and the attribute and class frequencies of the valid samples next to those of real data (1000 held-out images).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ddguide.core.data import list_images, load_image, to_uint8
from ddguide.core.model import load_model
from ddguide.core.runtime import resolve_device
from ddguide.core.samples import write_grid
from ddguide.shapes import oracles
from ddguide.shapes.dataset import ATTRIBUTES, CLASS_NAMES, ShapesConfig
from ddguide.shapes.dataset import generate as generate_shapes
from ddguide.stages.sample import draw, plain_denoiser, timesteps_for


def sample_images(model_path: str | None, n: int, steps: int, sampler: str, eta: float = 0.0,
                  batch: int = 64, device: str = "cpu") -> np.ndarray:
    dev = resolve_device(device)
    model = load_model(model_path).to(dev)
    denoiser = plain_denoiser(model, "fp32")
    kept = timesteps_for(model, steps, sampler)
    parts = []
    for first in range(0, n, batch):
        indices = list(range(first, min(first + batch, n)))
        parts.append(to_uint8(draw(model, denoiser, indices, 0, kept, sampler, eta)))
    return np.concatenate(parts)


def shape_failures(samples: np.ndarray, path: Path, pad: int = 2) -> None:
    """Crop every object whose template fit is poor or not clearly one shape, print their sizes, save a grid."""
    crops, sides = [], Counter()
    for image in samples:
        for o in oracles.read(image).objects:
            if o.poor_fit or o.ambiguous:
                y0, x0, y1, x1 = o.box
                crop = np.zeros((y1 - y0 + 2 * pad, x1 - x0 + 2 * pad, 3), np.uint8)
                part = image[max(y0 - pad, 0):y1 + pad, max(x0 - pad, 0):x1 + pad]
                crop[:part.shape[0], :part.shape[1]] = part
                crops.append(crop)
                sides[o.side] += 1
    if not crops:
        print("no object breaks a shape rule")
        return
    side = max(max(c.shape[:2]) for c in crops)
    tiles = [np.pad(c, ((0, side - c.shape[0]), (0, side - c.shape[1]), (0, 0))).repeat(8, 0).repeat(8, 1)
             for c in crops]
    write_grid(path, tiles, columns=8)
    print(f"{len(crops)} objects break a shape rule; the longer side of their boxes in px: "
          + ", ".join(f"{w}: {k}" for w, k in sorted(sides.items())) + f"; enlarged crops: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta (1: ancestral steps with the posterior variance, 'fixed small')")
    parser.add_argument("--grid", type=Path, default=None, help="write the first 64 samples here")
    parser.add_argument("--failures", type=Path, default=None,
                        help="write the objects that break a shape rule here, cropped and enlarged 8x")
    parser.add_argument("--device", default="cpu",
                        help="cpu (the README's figures), auto or cuda: the same seeds, equal up to float rounding")
    parser.add_argument("--batch", type=int, default=64, help="images sampled at once (the result does not depend on it)")
    args = parser.parse_args()
    if args.sampler == "ddpm" and args.eta:
        parser.error("--eta is a DDIM option")

    samples = sample_images(args.model, args.n, args.steps, args.sampler, args.eta, args.batch, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(Path(tmp), ShapesConfig(n=1000, seed=777, split="test"))
        real = np.stack([load_image(f) for f in list_images(Path(tmp) / "images")])

    reasons = [oracles.rejection_reasons(im) for im in samples]
    valid = np.array([not r for r in reasons])
    label = f"{args.sampler} eta {args.eta:g}" if args.sampler == "ddim" else args.sampler
    print(f"{args.n} samples, {label} {args.steps} steps: {valid.mean():.1%} recognised as valid by the oracle")
    broken = Counter(rule for r in reasons for rule in r)
    print("rules broken (share of samples; a sample may break several): "
          + ", ".join(f"{rule} {count / args.n:.0%}" for rule, count in broken.most_common()))
    if args.grid:
        write_grid(args.grid, list(samples[:64]), columns=8)
        print(f"grid of the first 64 samples: {args.grid}")
    if args.failures:
        shape_failures(samples, args.failures)
    good = samples[valid]
    if len(good) == 0:
        return
    ours, theirs = oracles.predict_attributes(good), oracles.predict_attributes(real)
    print(f"\n{'attribute':<20}{'valid samples':>14}{'real data':>11}")
    for name in ATTRIBUTES:
        print(f"{name:<20}{ours[name].mean():>14.3f}{theirs[name].mean():>11.3f}")
    ours_c = np.bincount(oracles.predict_classes(good), minlength=len(CLASS_NAMES)) / len(good)
    real_c = np.bincount(oracles.predict_classes(real), minlength=len(CLASS_NAMES)) / len(real)
    print(f"\n{'class':<20}{'valid samples':>14}{'real data':>11}")
    for name, a, b in zip(CLASS_NAMES, ours_c, real_c):
        print(f"{name:<20}{a:>14.3f}{b:>11.3f}")
    print(f"\ntotal variation distance between the class distributions: {0.5 * np.abs(ours_c - real_c).sum():.3f}")


if __name__ == "__main__":
    main()
