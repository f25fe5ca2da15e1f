"""`ddguide demo` at its defaults over several seeds: the oracle's share with the attribute, unguided vs guided.

Each seed draws its own labelled set (50 + 50), head and samples (the same seeds for the unguided and the guided
row), exactly as `ddguide demo --seed S` does; the oracle judges, never the head.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --attribute has_circle
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddguide.shapes.demo import DemoConfig, run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--attribute", default="has_circle")
    ap.add_argument("-n", "--num-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/demo-seeds"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        cfg = DemoConfig(out=str(args.work / f"seed{seed}"), attribute=args.attribute, n=args.num_images, seed=seed,
                         device="cpu")
        r = run_demo(cfg)
        rows.append(r)
        print(f"seed {seed}: unguided {r.unguided:.3f} guided {r.guided:.3f} (+{r.guided - r.unguided:.3f}), head "
              f"val accuracy {r.head_accuracy:.2f}, {time.perf_counter() - start:.0f} s", flush=True)
    lift = [r.guided - r.unguided for r in rows]
    print(f"{args.attribute}, lambda {cfg.lam}, --guide-grad {cfg.grad}, taps {cfg.blocks or 'defaults'}, "
          f"{args.num_images} + {args.num_images} samples x {len(rows)} seeds: unguided "
          f"{statistics.fmean(r.unguided for r in rows):.3f}, guided {statistics.fmean(r.guided for r in rows):.3f}, "
          f"lift {statistics.fmean(lift):.3f} ± {statistics.pstdev(lift):.3f} (min {min(lift):.3f})")


if __name__ == "__main__":
    main()
