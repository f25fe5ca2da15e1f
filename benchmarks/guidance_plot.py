"""The share-vs-compute plot of README "Selecting instead of pushing": what `benchmarks/guidance.py` measured
(and `benchmarks/real_digits.py`, when its rows exist), one panel per attribute.

x: the cost per image relative to unguided sampling in U-Net passes (full forwards + the heads' truncated
feature passes + backward passes, each counted once, over unguided's forwards; log2 axis): counted by hooks, so
exact, where the rows' wall times were measured in different runs beside other jobs; y: the judge's share of
images with the attribute (the shapes oracle, or for the digits the SVM trained on real digits), mean over seeds
with the spread (min to max) as error bars. Needs matplotlib (not a dependency of ddguide).

    python benchmarks/guidance_plot.py --out docs/guidance-budget.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FAMILIES = {  # method name prefix -> (label, marker, colour)
    "unguided": ("unguided", "o", "black"),
    "eq13": ("Eq. 13 (x0 gradient)", "s", "tab:orange"),
    "best-of": ("best-of-N", "^", "tab:blue"),
    "zero-order": ("zero-order search", "v", "tab:pink"),
    "fk": ("FK steering", "D", "tab:green"),
    "tds": ("TDS", "*", "tab:purple"),
    "prune": ("prune search", "X", "tab:brown"),
}


def family(method: str) -> str:
    if "+eq13" in method:
        return method.split("-")[0] + "+eq13"  # fk+eq13, prune+eq13
    return next(f for f in FAMILIES if method.startswith(f))


def points(rows: list[dict], panel: str, key: str) -> dict[str, list[tuple[float, float, float, float, str]]]:
    """Per family: (cost ratio, mean share, min share, max share, method) of each method measured on ``panel``."""
    mine = [r for r in rows if r.get(key) == panel and r.get("head", "none") == "none"  # the plain heads
            and not any(tag in r["method"] for tag in ("-every", "-w"))]  # schedules are one method's variants
    passes = lambda r: r["forward_per_image"] + r["feature_passes_per_image"] + r["backward_per_image"]  # noqa: E731
    base = np.mean([passes(r) for r in mine if r["method"] == "unguided"])
    out: dict[str, list] = {}
    for method in sorted({r["method"] for r in mine}):
        rs = [r for r in mine if r["method"] == method]
        share = np.array([r["share"] for r in rs])
        cost = float(np.mean([passes(r) for r in rs]) / base)
        out.setdefault(family(method), []).append((cost, share.mean(), share.min(), share.max(), method))
    return {f: sorted(v) for f, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=Path, default=Path("runs/guidance.json"))
    ap.add_argument("--digits", type=Path, default=Path("runs/digits.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/guidance-budget.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.shapes.read_text())
    panels = [(a, "attribute", rows) for a in sorted({r["attribute"] for r in rows})]
    if args.digits.exists():
        panels.append(("sklearn-digits", "dataset", json.loads(args.digits.read_text())))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    labels = {**FAMILIES, "fk+eq13": ("FK + Eq. 13 proposal", "P", "tab:red"),
              "prune+eq13": ("prune search + Eq. 13", "p", "tab:olive")}
    for ax, (panel, key, data) in zip(axes[0], panels):
        for fam, pts in points(data, panel, key).items():
            x, y, lo, hi = (np.array([p[i] for p in pts]) for i in range(4))
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker=labels[fam][1], color=labels[fam][2], capsize=3,
                        label=labels[fam][0], linestyle="-" if len(pts) > 1 else "none")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("U-Net passes per image / unguided")
        ax.set_title(panel if key == "attribute" else "digits: share of 3s (real-data judge)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share with the attribute (judge, not the head)")
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.subplots_adjust(bottom=0.2)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
