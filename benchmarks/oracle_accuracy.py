"""How well the shapes oracles label held-out real images, clean and slightly perturbed.

    python benchmarks/oracle_accuracy.py --n 2000

Generates a held-out split (``test``, seed 12345: nothing the oracles were tuned on) into a temporary
folder, reads it back from disk, and prints per-attribute accuracy, class accuracy, mask mIoU and the
valid rate, on the clean images and with the small perturbation a diffusion model's samples show
(Gaussian noise of std 8/255 and a Gaussian blur of sigma 0.5 px). It also prints the valid rate on
images the oracle must reject: pure noise, heavy blur (sigma 1.5 px) and an out-of-palette blob.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from ddguide.core.data import load_image
from ddguide.shapes import dataset as shapes
from ddguide.shapes import oracles

OFF_PALETTE = np.array([(255, 140, 0), (160, 40, 200), (240, 240, 240), (0, 220, 220), (250, 120, 180)])


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Images, masks, attributes and class ids of a generated dataset, in index.csv order."""
    with open(folder / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    with open(folder / "attributes.csv", newline="") as f:
        attrs = {row["file"]: row for row in csv.DictReader(f)}
    images = np.stack([load_image(folder / row["file"]) for row in index])
    masks = np.stack([load_image_l(folder / "masks" / Path(row["file"]).name) for row in index])
    labels = {a: np.array([attrs[row["file"]][a] == "1" for row in index]) for a in shapes.ATTRIBUTES}
    classes = np.array([int(row["class_id"]) for row in index])
    return images, masks, labels, classes


def load_image_l(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int64)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over height and width only."""
    out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="nearest")
    return np.rint(out).clip(0, 255).astype(np.uint8)


def perturb(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slight blur, then Gaussian noise of std 8/255 of the range: what imperfect samples look like."""
    noisy = blur(images, 0.5).astype(np.float32) + rng.normal(0, 8, images.shape)
    return np.rint(noisy).clip(0, 255).astype(np.uint8)


def with_blob(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image with a 5x5 square of a colour the dataset never uses at a random place."""
    out = images.copy()
    size = images.shape[1]
    for im in out:
        y, x = rng.integers(0, size - 5, size=2)
        im[y:y + 5, x:x + 5] = OFF_PALETTE[rng.integers(len(OFF_PALETTE))]
    return out


def report(name: str, images, masks, labels, classes) -> None:
    """Print the oracles' figures on one set of images."""
    t0 = time.perf_counter()
    predicted = oracles.predict_attributes(images)
    print(f"\n[{name}]")
    for attr in shapes.ATTRIBUTES:
        print(f"  {attr:18s} accuracy {np.mean(predicted[attr] == labels[attr]):.4f}"
              f"   (base rate {labels[attr].mean():.3f})")
    print(f"  {'class':18s} accuracy {np.mean(oracles.predict_classes(images) == classes):.4f}")
    print(f"  {'mask':18s} mIoU     {oracles.miou(oracles.predict_masks(images), masks, len(shapes.MASK_CLASSES)):.4f}")
    print(f"  {'is_valid':18s} rate     {oracles.is_valid(images).mean():.4f}")
    print(f"  ({(time.perf_counter() - t0) / len(images) * 1e3:.2f} ms per image for all four oracles)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="held-out images to generate")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the held-out split")
    args = parser.parse_args()

    cfg = shapes.ShapesConfig(n=args.n, size=args.size, seed=args.seed, split="test")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shapes.generate(Path(tmp) / "shapes", cfg)
        seconds = time.perf_counter() - t0
        print(f"generated {args.n} images of {args.size} px in {seconds:.1f} s ({args.n / seconds:.0f} images/s)")
        images, masks, labels, classes = load_split(Path(tmp) / "shapes")

    rng = np.random.default_rng(0)
    report("clean", images, masks, labels, classes)
    report("noise std 8/255 + blur sigma 0.5", perturb(images, rng), masks, labels, classes)

    print("\n[must be rejected] is_valid rate")
    noise = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    print(f"  pure noise               {oracles.is_valid(noise).mean():.4f}")
    print(f"  blur sigma 1.5           {oracles.is_valid(blur(images, 1.5)).mean():.4f}")
    print(f"  out-of-palette 5x5 blob  {oracles.is_valid(with_blob(images, rng)).mean():.4f}")


if __name__ == "__main__":
    main()
