"""`ddguide demo`: the whole few-shot pipeline on the shipped model, measured by the shapes oracle.

50 images with an attribute and 50 without -> denoiser features -> a classifier head -> 16 guided and 16 unguided
samples drawn with the same seeds -> the oracle's verdict on both, and a side-by-side grid.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ddguide.core.data import load_image
from ddguide.core.defaults import DEFAULT_TIMESTEPS, DEMO_GRAD, DEMO_LAMBDA
from ddguide.core.errors import UserError
from ddguide.core.model import load_model
from ddguide.core.samples import read_samples, write_grid
from ddguide.method.heads import load_head
from ddguide.shapes import oracles
from ddguide.shapes.dataset import ATTRIBUTES, ShapesConfig
from ddguide.shapes.dataset import generate as generate_shapes
from ddguide.stages.extract import ExtractConfig, extract
from ddguide.stages.sample import SampleConfig, sample
from ddguide.stages.train_head import TrainHeadConfig, train_head

Progress = Callable[[str, int, int], None]


@dataclass
class DemoConfig:
    out: str = "ddguide-demo"
    attribute: str = "has_circle"
    labels: int = 50  # per side: 50 with the attribute, 50 without (paper §5.1)
    n: int = 16
    steps: int = 50
    lam: float = DEMO_LAMBDA
    blocks: tuple[str, ...] | None = None  # extract's defaults (benchmarks/taps.py), where the model has them
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    grad: str = DEMO_GRAD
    seed: int = 0
    model: str | None = None
    device: str = "auto"
    precision: str = "fp32"


@dataclass
class DemoResult:
    attribute: str
    base_rate: float  # in the data the labelled images were drawn from
    unguided: float  # share of unguided samples with the attribute, by the oracle
    guided: float
    head_accuracy: float
    grid: Path


def _attribute_rows(pool: Path) -> list[dict[str, str]]:
    with open(pool / "attributes.csv", newline="") as f:
        return list(csv.DictReader(f))


def labelled_subset(pool: Path, attribute: str, per_side: int) -> tuple[Path, Path]:
    """Copy ``per_side`` images with and without the attribute out of a shapes dataset; returns (folder, csv)."""
    rows = _attribute_rows(pool)
    pos = [r["file"] for r in rows if r[attribute] == "1"][:per_side]
    neg = [r["file"] for r in rows if r[attribute] == "0"][:per_side]
    if len(pos) < per_side or len(neg) < per_side:
        raise UserError(f"the pool has too few images with/without {attribute!r}")
    folder = pool.parent / "labelled"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    lines = [f"file,{attribute}"]
    for value, files in (("1", pos), ("0", neg)):
        for rel in files:
            shutil.copyfile(pool / rel, folder / Path(rel).name)
            lines.append(f"{Path(rel).name},{value}")
    table = pool.parent / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    return folder, table


def _read_images(folder: Path, n: int) -> np.ndarray:
    """The first ``n`` images a samples folder lists."""
    return np.stack([load_image(row.path) for row in read_samples(folder)[:n]])


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> DemoResult:
    if cfg.attribute not in ATTRIBUTES:
        raise UserError(f"unknown attribute {cfg.attribute!r}; the shapes domain has {', '.join(ATTRIBUTES)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = (lambda stage: (lambda done, total, *_: progress(stage, done, total))) if progress else (lambda s: None)

    # 1. a labelled few-shot set: 50 + 50 images from the procedural domain, at the model's image size
    model = load_model(cfg.model)
    size = model.image_size
    pool = out / f"pool-{size}px-seed{cfg.seed}"
    if not (pool / "dataset.json").exists():  # written last: a pool without it is an interrupted one
        shutil.rmtree(pool, ignore_errors=True)
        generate_shapes(pool, ShapesConfig(n=8 * cfg.labels, size=size, seed=cfg.seed, split="val"),
                        progress=report("data"))
    folder, table = labelled_subset(pool, cfg.attribute, cfg.labels)

    # 2. denoiser features and a classifier head on them
    blocks = cfg.blocks or model.net.default_taps()
    feats = extract(ExtractConfig(data=str(folder), out=str(out / "features.safetensors"), model=cfg.model,
                                  blocks=blocks, timesteps=cfg.timesteps, labels=str(table),
                                  label=cfg.attribute, device=cfg.device, precision=cfg.precision),
                    progress=report("features"))
    head_path = train_head(TrainHeadConfig(features=str(feats), out=str(out / "head.safetensors"),
                                           kind="classifier", seed=cfg.seed), progress=report("head"))

    # 3. unguided and guided samples with the same seeds
    results = {}
    for name, lam in (("unguided", 0.0), ("guided", cfg.lam)):
        sample_cfg = SampleConfig(out=str(out / name), model=cfg.model, n=cfg.n, steps=cfg.steps, seed=cfg.seed,
                                  sampler="ddim",  # the demo's measured figures (README) are DDIM's
                                  batch=cfg.n, device=cfg.device, precision=cfg.precision, guides=[str(head_path)],
                                  target="1", lam=lam, guide_grad=cfg.grad)
        sample(sample_cfg, progress=report(name))
        images = _read_images(out / name, cfg.n)
        results[name] = (images, float(oracles.predict_attributes(images)[cfg.attribute].mean()))

    # 4. side by side: unguided row above guided row
    grid = out / "demo.png"
    write_grid(grid, list(results["unguided"][0]) + list(results["guided"][0]), columns=cfg.n)
    head = load_head(head_path)
    base_rate = float(np.mean([r[cfg.attribute] == "1" for r in _attribute_rows(pool)]))
    return DemoResult(cfg.attribute, base_rate, results["unguided"][1], results["guided"][1],
                      float(head.cfg.metrics.get("val_accuracy", float("nan"))), grid)
