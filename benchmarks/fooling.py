"""How often guidance fools a head: `train-head --augment none` against `--augment x0` (and `--augment adv`) on
the shipped model.

Per attribute and seed, end to end through the command line: `ddguide data shapes` (a val-split pool, 50 images
with and 50 without the attribute are the labelled set), `ddguide extract` with the default taps, one head per
augmentation (`train-head --augment none`, `--augment x0 --augment-fraction F` for each F, `--augment adv
--adv-eps E` for each E of --adv-eps, `--augment x0-adv --adv-eps E` for each of --x0-adv-eps), then
`ddguide sample --guide HEAD --lambda 3 --guide-grad x0 --guide-window 999 0 -n 64 --steps 25` (every step, as
measured before sample's default window) with the same sample seeds for every
head, and one unguided run. The shapes oracle (ddguide.shapes.oracles.predict_attributes) judges every sample,
never the head. Per head:

- fooled: the share of guided samples the head scores p >= 0.9 (index.csv head_prob, calibrated) that the
  oracle says lack the attribute (the fooling rate);
- confident: the share of samples the head scores p >= 0.9; share: the oracle's share with the attribute;
- val_acc / val_acc_x0: the head's held-out accuracy on clean images and on x0_hat of them at t = 250, 500, 750.

    python benchmarks/fooling.py --attributes has_circle has_red --seeds 0 --fractions 0.5
Prints a table and writes JSON to --out (default runs/fooling.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddguide.core.data import load_image  # noqa: E402
from ddguide.core.samples import read_samples  # noqa: E402
from ddguide.shapes.oracles import predict_attributes  # noqa: E402

CONFIDENT = 0.9


def ddguide(*args: object, threads: int | None) -> None:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "ddguide", *map(str, args), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")


def labelled_set(work: Path, attribute: str, seed: int, per_side: int, threads: int | None) -> tuple[Path, Path]:
    """``per_side`` images with and without ``attribute`` from a val-split pool of seed ``seed``."""
    pool = work / f"pool-s{seed}"
    if not (pool / "attributes.csv").exists():
        ddguide("data", "shapes", pool, "-n", 800, "--split", "val", "--seed", seed, threads=threads)
    with open(pool / "attributes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = [r for value in ("1", "0") for r in [r for r in rows if r[attribute] == value][:per_side]]
    folder = work / f"labelled-{attribute}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for r in picked:
        shutil.copyfile(pool / r["file"], folder / Path(r["file"]).name)
    table = folder.with_suffix(".csv")
    table.write_text("file," + attribute + "\n" + "".join(f"{Path(r['file']).name},{r[attribute]}\n" for r in picked))
    return folder, table


def judge(folder: Path, attribute: str) -> dict[str, float]:
    rows = read_samples(folder)
    images = np.stack([load_image(r.path) for r in rows])
    has = predict_attributes(images)[attribute].astype(bool)
    out: dict[str, float] = {"n": len(rows), "share": float(has.mean())}
    if "head_prob" in rows[0].values:
        p = np.array([float(r.values["head_prob"]) for r in rows])
        confident = p >= CONFIDENT
        out.update(fooled=float((confident & ~has).mean()), confident=float(confident.mean()),
                   fooled_of_confident=float((confident & ~has).sum() / max(confident.sum(), 1)),
                   mean_p=float(p.mean()))
    return out


def x0_accuracy(head_path: Path, feats_path: Path) -> float | None:
    """val_accuracy_x0 of a head (computed here for heads trained without augmentation)."""
    import torch

    from ddguide.core.model import load_model
    from ddguide.core.runtime import resolve_precision
    from ddguide.method.features import load_features
    from ddguide.method.heads import load_head
    from ddguide.stages.train_head import x0_metrics

    head = load_head(head_path)
    if "val_accuracy_x0" in head.cfg.metrics:
        return head.cfg.metrics["val_accuracy_x0"]
    precision = resolve_precision("auto", torch.device("cpu"))  # what train-head --augment x0 ran under
    return x0_metrics(head, load_model(), load_features(feats_path), precision).get("val_accuracy_x0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attributes", nargs="+", default=["has_circle", "has_red"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.5],
                    help="--augment x0 heads, one per --augment-fraction value (none: no such heads)")
    ap.add_argument("--adv-eps", nargs="*", type=float, default=[],
                    help="--augment adv heads to add, one per --adv-eps value (fraction 0.5)")
    ap.add_argument("--x0-adv-eps", nargs="*", type=float, default=[],
                    help="--augment x0-adv heads to add (the attack starts from x0_hat), one per value")
    ap.add_argument("--adv-steps", type=int, default=3, help="their --adv-steps")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--lam", type=float, default=3.0)
    ap.add_argument("--per-side", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/fooling"))
    ap.add_argument("--out", type=Path, default=Path("runs/fooling.json"))
    ap.add_argument("--summary", nargs="+", type=Path, metavar="JSON",
                    help="measure nothing: the rows of these files and, per attribute and head kind, the means over "
                         "head seeds")
    args = ap.parse_args()
    if args.summary:
        rows = [r for path in args.summary for r in json.loads(path.read_text())]
        table_rows(rows)
        return means(rows)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["attribute"], r["seed"], r["augment"]) for r in results}

    def record(row: dict) -> None:
        results.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(row), flush=True)

    sample_args = ("-n", args.n, "--steps", args.steps, "--sampler", "ddim", "--device", "cpu")
    for seed in args.seeds:
        for attribute in args.attributes:
            if (attribute, seed, "unguided") not in done:
                out = args.work / f"unguided-s{seed}"
                if not (out / "index.csv").exists():
                    shutil.rmtree(out, ignore_errors=True)
                    ddguide("sample", *sample_args, "--seed", 1000 * seed, "--out", out, threads=args.threads)
                record({"attribute": attribute, "seed": seed, "augment": "unguided", **judge(out, attribute)})
            folder, table = labelled_set(args.work, attribute, seed, args.per_side, args.threads)
            feats = args.work / f"{attribute}-s{seed}.features.safetensors"
            if not feats.exists():
                ddguide("extract", folder, "--labels", table, "--label", attribute, "--out", feats, "--device", "cpu",
                        threads=args.threads)
            steps = "" if args.adv_steps == 3 else f":{args.adv_steps}"
            adv = [f"adv:{e:g}{steps}" for e in args.adv_eps] + [f"x0-adv:{e:g}{steps}" for e in args.x0_adv_eps]
            for augment in ["none", *(f"x0:{f:g}" for f in args.fractions), *adv]:
                if (attribute, seed, augment) in done:
                    continue
                head = args.work / f"{attribute}-s{seed}-{augment.replace(':', '-')}.head.safetensors"
                start = time.time()
                kind, *values = augment.split(":")
                if kind == "none":
                    extra: tuple = ()
                elif kind == "x0":
                    extra = ("--augment", "x0", "--augment-fraction", *values)
                else:  # adv, x0-adv: --adv-eps E
                    extra = ("--augment", kind, "--adv-eps", values[0], "--adv-steps", args.adv_steps)
                if not head.exists():
                    ddguide("train-head", feats, "--out", head, "--seed", seed, "--device", "cpu", *extra,
                            threads=args.threads)
                train_s = time.time() - start
                out = args.work / f"guided-{attribute}-s{seed}-{augment.replace(':', '-')}"
                shutil.rmtree(out, ignore_errors=True)
                ddguide("sample", *sample_args, "--seed", 1000 * seed, "--guide", head, "--lambda", args.lam,
                        "--guide-grad", "x0", "--guide-window", 999, 0, "--out", out, threads=args.threads)
                from ddguide.method.heads import load_head

                metrics = load_head(head).cfg.metrics
                record({"attribute": attribute, "seed": seed, "augment": augment, **judge(out, attribute),
                        "val_acc": metrics.get("val_accuracy"), "val_acc_x0": x0_accuracy(head, feats),
                        "train_s": round(train_s, 1)})
    table_rows(results)


def table_rows(results: list[dict]) -> None:
    print(f"\n{'attribute':<11} {'seed':>4} {'head':<9} {'share':>6} {'conf.':>6} {'fooled':>7} {'val':>5} "
          f"{'val_x0':>6} {'train s':>7}")
    for r in results:
        def f(key: str, fmt: str = ".2f") -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"{r['attribute']:<11} {r['seed']:>4} {r['augment']:<9} {f('share'):>6} {f('confident'):>6} "
              f"{f('fooled'):>7} {f('val_acc'):>5} {f('val_acc_x0'):>6} {f('train_s', '.0f'):>7}")


def means(results: list[dict]) -> None:
    """Per attribute and head kind, the mean over seeds of the share, the share of samples fooling the head and
    the fooling rate among its confident samples (with its largest value)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["attribute"], r["augment"]), []).append(r)
    print(f"\n{'attribute':<11} {'head':<12} {'seeds':>5} {'share':>6} {'fooled':>7} {'of conf.':>8} {'max':>5}")
    for (attribute, augment), rs in sorted(groups.items()):
        share = sum(r["share"] for r in rs) / len(rs)
        if augment == "unguided":
            print(f"{attribute:<11} {augment:<12} {len(rs):>5} {share:6.3f}")
            continue
        rate = [r["fooled_of_confident"] for r in rs]
        print(f"{attribute:<11} {augment:<12} {len(rs):>5} {share:6.3f} {sum(r['fooled'] for r in rs) / len(rs):7.3f} "
              f"{sum(rate) / len(rate):8.3f} {max(rate):5.3f}")


if __name__ == "__main__":
    main()
