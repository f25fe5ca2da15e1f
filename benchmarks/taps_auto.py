"""What `extract --blocks auto` picks per attribute on the shipped model, and how the pick scores on fresh images.

Uses benchmarks/taps.py's work folder (its pool and its fresh-image table, runs/taps.json): for each attribute the
same 50 + 50 labelled images go through ``extract_auto`` (k-fold linear probes), and the chosen tap set is looked up
in the table of heads scored on fresh real images, next to the best tap set there.

    python benchmarks/taps_auto.py --attributes has_red has_circle main_left multiple_objects --timesteps 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddguide.shapes.demo import labelled_subset  # noqa: E402
from ddguide.stages.extract import ExtractConfig  # noqa: E402
from ddguide.stages.tapsweep import extract_auto  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attributes", nargs="+", default=["has_red", "has_circle", "main_left", "multiple_objects"])
    ap.add_argument("--timesteps", nargs="+", type=int, default=[300])
    ap.add_argument("--work", type=Path, default=Path("runs/taps"))
    ap.add_argument("--table", type=Path, default=Path("runs/taps.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = json.loads(args.table.read_text())
    for attribute in args.attributes:
        folder, labels = labelled_subset(args.work / "pool", attribute, 50)
        start = time.perf_counter()
        _, rows = extract_auto(ExtractConfig(data=str(folder), out=str(args.work / "auto.safetensors"),
                                             timesteps=tuple(args.timesteps), labels=str(labels), label=attribute),
                               auto_blocks=True, auto_times=False)
        seconds = time.perf_counter() - start
        best = rows[0]
        fresh = {(tuple(r["blocks"]), tuple(r["timesteps"])): r["fresh"] for r in table if r["attribute"] == attribute}
        top = max((v, k) for k, v in fresh.items() if k[1] == tuple(args.timesteps))
        pick = fresh.get((best.blocks, best.timesteps))
        print(f"{attribute:17s} auto picks {' '.join(best.blocks):16s} probe {best.accuracy:.2f} -> fresh "
              f"{pick if pick is None else f'{pick:.3f}'}; best measured {' '.join(top[1][0])} {top[0]:.3f} "
              f"({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
