"""Which feature taps carry which attribute on the shipped model: accuracy on fresh real images, per tap set.

For each attribute: 50 + 50 labelled images (the paper's §5.1 budget, from `data shapes --split val`), features
at every candidate tap (``mid`` and the decoder's upsampling blocks, alone and with a neighbour, at each
timestep alone and together: the candidates of ``extract --blocks auto``), one classifier head per candidate
with ``train-head``'s defaults, scored three ways:
  val    the head's own held-out split (20 of the 100 labels), what `train-head` prints
  sweep  the k-fold linear-probe score ``--blocks auto`` ranks by (seconds, where a head takes minutes)
  fresh  accuracy on N fresh real images of the test split, labelled exactly by the generator (the judge here)

    python benchmarks/taps.py --attributes has_circle has_red --timesteps 300 800 --out runs/taps.json
Prints one table per attribute and writes every row to --out (JSON, rewritten after each row: a stopped run
keeps what it measured, and a rerun skips the rows already there).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddguide.core.model import load_model  # noqa: E402
from ddguide.method.features import FeatureSpec, compute, load_features  # noqa: E402
from ddguide.method.heads import load_head  # noqa: E402
from ddguide.shapes.dataset import ShapesConfig, generate  # noqa: E402
from ddguide.shapes.demo import labelled_subset  # noqa: E402
from ddguide.stages.extract import ExtractConfig, extract
from ddguide.stages.tapsweep import candidate_blocks, candidate_timesteps, score  # noqa: E402
from ddguide.stages.train_head import TrainHeadConfig, train_head


def fresh_set(work: Path, n: int, size: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    folder = work / f"fresh-{n}"
    if not (folder / "dataset.json").exists():
        generate(folder, ShapesConfig(n=n, size=size, seed=777, split="test"))
    with open(folder / "attributes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from PIL import Image
    images = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, {k: np.array([int(r[k]) for r in rows]) for k in rows[0] if k != "file"}


def fresh_accuracy(head_path: Path, model, x: torch.Tensor, y: np.ndarray) -> float:
    head = load_head(head_path)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 64):
            taps = compute(model, x[i:i + 64], head.spec, range(i, i + len(x[i:i + 64])))
            pred = head(head.inputs(taps)).argmax(1).numpy()
            correct += int((pred == y[i:i + 64]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attributes", nargs="+", default=["has_circle", "has_red", "multiple_objects", "main_left"])
    ap.add_argument("--timesteps", nargs="+", type=int, default=[300, 800])
    ap.add_argument("--blocks", nargs="+", default=None, help="Restrict to these candidate sets, e.g. 'out.5,out.8'.")
    ap.add_argument("--time-sets", nargs="+", default=None, help="Restrict to these timestep sets, e.g. '300,800'.")
    ap.add_argument("--fresh", type=int, default=256)
    ap.add_argument("--no-sweep", action="store_true", help="Skip the k-fold score (half the time).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/taps"))
    ap.add_argument("--out", type=Path, default=Path("runs/taps.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    model = load_model(None)
    size = model.image_size
    x_fresh, y_fresh = fresh_set(args.work, args.fresh, size)
    blocks = candidate_blocks(model.net.upsampling_blocks())
    if args.blocks:
        blocks = [tuple(b.split(",")) for b in args.blocks]
    times = candidate_timesteps(args.timesteps)
    if args.time_sets:
        times = [tuple(int(t) for t in ts.split(",")) for ts in args.time_sets]
    pool = args.work / "pool"
    if not (pool / "dataset.json").exists():
        generate(pool, ShapesConfig(n=800, size=size, seed=args.seed, split="val"))
    union_blocks = tuple(dict.fromkeys(b for bs in blocks for b in bs))
    for attribute in args.attributes:
        folder, table = labelled_subset(pool, attribute, 50)
        feats_path = args.work / f"{attribute}-all.safetensors"
        extract(ExtractConfig(data=str(folder), out=str(feats_path), blocks=union_blocks,
                              timesteps=tuple(args.timesteps), labels=str(table), label=attribute))
        feats = load_features(feats_path)
        for t in times:
            for b in blocks:
                key = {"attribute": attribute, "blocks": list(b), "timesteps": list(t), "seed": args.seed}
                if any(all(r[k] == v for k, v in key.items()) for r in done):
                    continue
                start = time.perf_counter()
                head_path = args.work / f"{attribute}-head.safetensors"
                train_head(TrainHeadConfig(features=str(feats_path), out=str(head_path), blocks=b, timesteps=t,
                                           seed=args.seed))
                head = load_head(head_path)
                row = {**key, "val": head.cfg.metrics["val_accuracy"],
                       "fresh": fresh_accuracy(head_path, model, x_fresh, y_fresh[attribute]),
                       "channels": head.cfg.in_channels}
                if not args.no_sweep:
                    row["sweep"] = score(feats.taps, feats.labels.long(), FeatureSpec(b, t), seed=args.seed)[0]
                row["seconds"] = round(time.perf_counter() - start, 1)
                done.append(row)
                args.out.write_text(json.dumps(done, indent=1))
                print(f"{attribute:17s} {' '.join(b):14s} @ {' '.join(map(str, t)):8s} val {row['val']:.2f} "
                      f"sweep {row.get('sweep', float('nan')):.2f} fresh {row['fresh']:.3f} ({row['seconds']} s)",
                      flush=True)


if __name__ == "__main__":
    main()
