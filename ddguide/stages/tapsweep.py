"""Choosing feature taps by measurement (``ddguide extract --blocks auto``).

Which blocks and feature timesteps carry a label depends on the model and the label: on the shipped model a colour
head reads nothing from ``mid`` but everything from the 16 and 32 px decoder blocks. The sweep fits a linear probe
on every candidate set of taps, k-fold on the labelled images themselves, and keeps the best mean held-out
accuracy. Candidates: ``mid`` and each upsampling block of the decoder alone and with its neighbour, and ``mid`` with the two
finest upsampling blocks, at each candidate timestep alone and at all of them together.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ddguide.core.errors import UserError
from ddguide.core.model import load_model
from ddguide.method.features import FeatureSpec, load_features
from ddguide.stages.extract import ExtractConfig, extract

AUTO = "auto"
AUTO_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.8)  # of the model's diffusion steps: 100, 300, 500, 800 of 1000
SWEEP_FOLDS = 4
PROBE_GRID = 4  # taps are pooled to 4 x 4 for the probe
PROBE_L2 = 1e-3


@dataclass(frozen=True)
class SweepRow:
    blocks: tuple[str, ...]
    timesteps: tuple[int, ...]
    accuracy: float  # mean over folds of the held-out accuracy
    spread: float  # standard deviation over folds
    channels: int

    def to_dict(self) -> dict:
        return {"blocks": list(self.blocks), "timesteps": list(self.timesteps), "accuracy": round(self.accuracy, 4),
                "spread": round(self.spread, 4), "channels": self.channels}


def candidate_blocks(upsampling: Sequence[str]) -> list[tuple[str, ...]]:
    """``mid`` and each upsampling block, alone and with its neighbour in that order, and ``mid`` with the two
    finest upsampling blocks (coarse layout and fine colour and shape at once)."""
    names = ["mid", *upsampling]
    sets = [(b,) for b in names] + list(zip(names, names[1:]))
    if len(upsampling) >= 2:
        sets.append(("mid", *upsampling[-2:]))
    return list(dict.fromkeys(sets))


def candidate_timesteps(given: Sequence[int]) -> list[tuple[int, ...]]:
    """Each timestep alone, and all of them together when there are several."""
    sets = [(t,) for t in given]
    return sets + [tuple(given)] if len(given) > 1 else sets


def auto_timesteps(diffusion_steps: int) -> tuple[int, ...]:
    return tuple(int(round(f * diffusion_steps)) for f in AUTO_TIMESTEP_FRACTIONS)


def _folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Stratified folds: each class's images are dealt round-robin after one seeded shuffle."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    order = torch.cat([perm[y[perm] == c] for c in torch.unique(y)])
    return [order[i::k] for i in range(k)]


def probe_inputs(taps: dict[str, torch.Tensor], keys: Sequence[str], grid: int = PROBE_GRID) -> torch.Tensor:
    """Each tap average-pooled to a ``grid`` x ``grid`` layout (where things are survives, at a cost that does not
    grow with the tap's resolution), concatenated and standardised per feature. -> (N, D)"""
    parts = [F.adaptive_avg_pool2d(taps[k].float(), min(grid, taps[k].shape[-1])).flatten(1) for k in keys]
    x = torch.cat(parts, dim=1)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = PROBE_L2) -> torch.nn.Linear:
    """L2-regularised multinomial logistic regression, fitted to convergence by L-BFGS."""
    lin = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)  # convex: start anywhere, same optimum
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def score(taps: dict[str, torch.Tensor], y: torch.Tensor, spec: FeatureSpec, *, folds: int = SWEEP_FOLDS,
          seed: int = 0) -> tuple[float, float, int]:
    """k-fold held-out accuracy of a linear probe on the taps of ``spec``: (mean, std, channels of the taps).

    A probe, not a full head, so a sweep over dozens of tap sets takes seconds at any resolution; its picks
    match the sets whose heads score best on fresh images (benchmarks/taps_auto.py against benchmarks/taps.py)."""
    x = probe_inputs(taps, spec.keys())
    classes = int(y.max()) + 1
    accs = []
    parts = _folds(y, folds, seed)
    for i, held in enumerate(parts):
        train = torch.cat([f for j, f in enumerate(parts) if j != i])
        with torch.enable_grad():
            lin = _probe(x[train], y[train], classes)
        with torch.no_grad():
            accs.append(float((lin(x[held]).argmax(1) == y[held]).float().mean()))
    channels = sum(taps[k].shape[1] for k in spec.keys())
    return statistics.fmean(accs), statistics.pstdev(accs), channels


def sweep(taps: dict[str, torch.Tensor], y: torch.Tensor, block_sets: Sequence[tuple[str, ...]],
          time_sets: Sequence[tuple[int, ...]], *, noise: str = "none", noise_seed: int = 0,
          folds: int = SWEEP_FOLDS, seed: int = 0,
          progress: Callable[[int, int, str], None] | None = None) -> list[SweepRow]:
    """Every block set x timestep set, best first (ties: fewer channels, then the earlier candidate)."""
    if len(torch.unique(y)) < 2:
        raise UserError("--blocks auto needs images of at least two labels")
    if min(torch.bincount(y)[torch.unique(y)]) < folds:
        raise UserError(f"--blocks auto needs at least {folds} labelled images of each label")
    rows = []
    todo = [(b, t) for t in time_sets for b in block_sets]
    for n, (blocks, times) in enumerate(todo):
        spec = FeatureSpec(blocks, times, noise, noise_seed)
        mean, std, channels = score(taps, y, spec, folds=folds, seed=seed)
        rows.append(SweepRow(blocks, times, mean, std, channels))
        if progress:
            progress(n + 1, len(todo), f"{' '.join(blocks)} @ {' '.join(map(str, times))}: {mean:.2f}")
    order = sorted(range(len(rows)), key=lambda i: (-round(rows[i].accuracy, 6), rows[i].channels, i))
    return [rows[i] for i in order]


def extract_auto(cfg: ExtractConfig, *, auto_blocks: bool, auto_times: bool,
                 progress: Callable[[int, int, str], None] | None = None) -> tuple[Path, list[SweepRow]]:
    """``extract`` with the taps chosen by :func:`sweep` on the labelled images; returns the path and the table.

    Every candidate tap is extracted once into a temporary artifact beside ``cfg.out`` (removed afterwards, and at
    the start of a rerun after a kill), the sweep ranks them, and ``cfg.out`` gets the winner's taps only."""
    if cfg.masks:
        raise UserError("--blocks auto ranks taps by a classifier's accuracy: it needs labels (--labels/--label or "
                        "class folders), not masks")
    model = load_model(cfg.model)
    blocks = candidate_blocks(model.net.upsampling_blocks()) if auto_blocks else [tuple(cfg.blocks)]
    given = auto_timesteps(model.diffusion.steps) if auto_times else tuple(cfg.timesteps)
    times = candidate_timesteps(given)
    union = tuple(dict.fromkeys(b for bs in blocks for b in bs))
    out = Path(cfg.out)
    scratch = out.with_name(f".{out.stem}.sweep.safetensors")
    scratch.unlink(missing_ok=True)
    stage = (lambda name: (lambda done, total, info="": progress(done, total, f"{name} {info}".strip()))) \
        if progress else (lambda name: None)
    try:
        extract(replace(cfg, out=str(scratch), blocks=union, timesteps=given), progress=stage("candidates"))
        feats = load_features(scratch)
        if feats.labels is None:
            raise UserError(f"{cfg.data}: --blocks auto needs labels (--labels/--label or class folders)")
        rows = sweep(feats.taps, feats.labels.long(), blocks, times, noise=cfg.noise, noise_seed=cfg.seed,
                     seed=cfg.seed, progress=stage("sweep"))
    finally:
        if scratch.exists() and os.environ.get("DDGUIDE_KEEP_SWEEP") is None:
            scratch.unlink()
    best = rows[0]
    path = extract(replace(cfg, blocks=best.blocks, timesteps=best.timesteps), progress=stage("features"))
    return path, rows
