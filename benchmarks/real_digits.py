"""Guided sampling on real data the project never saw: scikit-learn's handwritten digits, judged by a classifier
trained on real digits alone (never by the head that guides).

The data ships inside scikit-learn (`sklearn.datasets.load_digits`: 1797 grey 8x8 digits, 16 grey levels), as a
user's own small dataset would sit on their disk. The pipeline is the one README gives, through the same
functions the commands run:

1. the digits, upscaled to 16 px (bicubic), as grey PNGs: 1400 for training, 397 held out;
2. `ddguide train DIGITS --preset small16 --channels 1` (a 1-channel model, 1.7M parameters; resumable);
3. the judge: an RBF support-vector classifier (scikit-learn) on the 1400 real training digits, 2x2-average-pooled
   back to 8x8, all ten classes; its accuracy on the 397 held-out real digits is printed;
4. 50 + 50 labels ("is a 3" or not) from the training digits -> `extract` (the model's default taps) ->
   `train-head`;
5. per method of `guidance.py` and seed: n samples, the judge's share of 3s, the Frechet distance (the model's
   own `mid` features) to the real 3s, the head's fooling rate (samples it scores >= 0.9 that the judge calls
   another digit), U-Net passes and seconds per image.

    python benchmarks/real_digits.py --seeds 0 1 2 --n 64 --threads 1
Rows are appended to --out as they are measured; a rerun skips them (and resumes a stopped training run).
`--head-seed S` and `--augment x0|adv|x0-adv` measure other heads; `--summary runs/digits.json ...` prints the means
over the heads of each setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from guidance import METHODS, Counter, fd  # noqa: E402

from ddguide.core.data import load_image  # noqa: E402
from ddguide.core.model import load_model  # noqa: E402
from ddguide.core.samples import read_samples  # noqa: E402
from ddguide.metrics.fid import DenoiserFeatures  # noqa: E402
from ddguide.stages.extract import ExtractConfig, extract  # noqa: E402
from ddguide.stages.sample import SampleConfig, sample  # noqa: E402
from ddguide.stages.train import TrainConfig, train, train_recipe  # noqa: E402
from ddguide.stages.train_head import TrainHeadConfig, train_head  # noqa: E402

SIZE, TRAIN, TARGET = 16, 1400, 3


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 (N, 16, 16) grey images (0..16 scaled to 0..255, bicubic upscaling) and labels,
    in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    small = (d.images[order] * (255 / 16)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im, "L").resize((SIZE, SIZE), Image.BICUBIC)) for im in small])
    return big, d.target[order]


def pooled(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 16, 16) -> the judge's input: 2x2 means on the 0..16 scale of the original digits, (N, 64)."""
    x = images.astype(np.float64).reshape(len(images), 8, 2, 8, 2).mean(axis=(2, 4)) * (16 / 255)
    return x.reshape(len(images), 64)


def write_folder(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(im, "L").save(path)


def head_name(augment: str, fraction: float = 0.5, head_seed: int = 0, eps: float = 0.25, adv_steps: int = 3) -> str:
    """The rows' "head" key: ``none`` / ``x0`` for the first heads measured (seed 0, fraction 0.5), else with both;
    ``adv-e{eps}[-k{adv_steps}]-f{fraction}-s{seed}`` for adversarially trained heads (``x0-adv-...`` for those
    attacked from x0_hat)."""
    if augment in ("adv", "x0-adv"):
        return f"{augment}-e{eps}{'' if adv_steps == 3 else f'-k{adv_steps}'}-f{fraction}-s{head_seed}"
    if head_seed == 0 and (augment == "none" or fraction == 0.5):
        return augment
    return f"{augment}-f{fraction}-s{head_seed}" if augment != "none" else f"none-s{head_seed}"


def prepare(work: Path, steps: int) -> tuple[Path, object, np.ndarray, np.ndarray]:
    """The model (trained here on the first run), the judge, the real 3s (the FD's reference) and the training
    digits' labels."""
    images, labels = digits()
    write_folder(work / "train", images[:TRAIN])
    model = work / "digits16.safetensors"
    if not model.exists():
        recipe = train_recipe(steps=steps, batch=64, lr=2e-4, lr_final=0.0, checkpoint_every=200)
        start = time.perf_counter()

        def progress(done: int, total: int, info: str) -> None:
            if done % 100 == 0:
                print(f"training {done}/{total} {info} ({time.perf_counter() - start:.0f} s)", flush=True)

        train(TrainConfig(data=str(work / "train"), out=str(model), preset="small16", recipe=recipe, channels=1),
              progress=progress)

    from sklearn.svm import SVC

    judge = SVC(gamma=0.001, C=10).fit(pooled(images[:TRAIN]), labels[:TRAIN])
    accuracy = float((judge.predict(pooled(images[TRAIN:])) == labels[TRAIN:]).mean())
    print(f"judge (RBF SVM on {TRAIN} real digits): {accuracy:.3f} on {len(labels) - TRAIN} held-out real digits")
    return model, judge, images[:TRAIN][labels[:TRAIN] == TARGET], labels[:TRAIN]


def head_for(work: Path, model: Path, labels: np.ndarray, augment: str = "none", fraction: float = 0.5,
             head_seed: int = 0, eps: float = 0.25, adv_steps: int = 3) -> Path:
    """The "is a 3" head of these train-head settings, trained (and its time printed) on first use."""
    name = head_name(augment, fraction, head_seed, eps, adv_steps)
    head = work / ("is3.head.safetensors" if name == "none" else f"is3-{name}.head.safetensors")
    if not head.exists():
        pos = [i for i in range(TRAIN) if labels[i] == TARGET][:50]
        neg = [i for i in range(TRAIN) if labels[i] != TARGET][:50]
        table = work / "is3.csv"
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "is_3"])
            w.writerows([[f"{i:05d}.png", 1] for i in pos] + [[f"{i:05d}.png", 0] for i in neg])
        feats = work / "is3.features.safetensors"  # kept for the next head
        if not feats.exists():
            extract(ExtractConfig(data=str(work / "train"), out=str(feats), model=str(model), labels=str(table),
                                  label="is_3", device="cpu"))
        start = time.perf_counter()
        train_head(TrainHeadConfig(features=str(feats), out=str(head), seed=head_seed, augment=augment,
                                   augment_fraction=fraction, adv_eps=eps, adv_steps=adv_steps,
                                   model=str(model) if augment != "none" else None))
        print(f"head {name}: train-head took {time.perf_counter() - start:.0f} s", flush=True)
    return head


def measure(model: Path, heads: list[Path], judge, method: str, seed: int, n: int, steps: int, batch: int,
            real: np.ndarray, extractor: DenoiserFeatures) -> dict:
    """One method and seed. With several heads (an ensemble) all of them guide, lambda is shared out among them
    (their mean log-likelihood is pushed as hard as one head's), and a sample is confident when the heads' mean
    probability is."""
    options = dict(METHODS[method])
    if len(heads) > 1 and "lam" in options:
        options["lam"] = options["lam"] / len(heads)
    guided = method != "unguided"
    with tempfile.TemporaryDirectory() as tmp, Counter() as count:
        start = time.perf_counter()
        cfg = SampleConfig(out=str(Path(tmp) / "s"), model=str(model), n=n, steps=steps, sampler="ddim",
                           seed=1000 * seed,
                           batch=batch, device="cpu", precision="auto", guides=[str(h) for h in heads] if guided
                           else [], **options)
        sample(cfg)
        wall = time.perf_counter() - start
        rows = read_samples(Path(tmp) / "s")
        images = np.stack([load_image(r.path, channels=1)[..., 0] for r in rows])
        keys = ["head_prob"] + [f"head_prob_{k + 1}" for k in range(1, len(heads))]
        head_p = [float(np.mean([float(r.values[k]) for k in keys])) for r in rows] if guided else []
    said = judge.predict(pooled(images))
    confident = [p >= 0.9 for p in head_p]
    fooled = sum(1 for c, s in zip(confident, said) if c and s != TARGET)
    return {"dataset": "sklearn-digits", "method": method, "seed": seed, "n": n, "steps": steps,
            "share": float((said == TARGET).mean()),
            "fd_to_real_3s": fd(extractor_features(images, extractor), extractor_features(real, extractor)),
            "fooling_rate": fooled / max(sum(confident), 1) if guided else None,
            "forward_per_image": count.forward / n, "feature_passes_per_image": count.features / n,
            "backward_per_image": count.backward / n, "seconds_per_image": wall / n}


def extractor_features(images: np.ndarray, extractor: DenoiserFeatures) -> np.ndarray:
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 16, 16) in [-1, 1]
    with torch.no_grad():
        return extractor(x).numpy().astype(np.float64)


def head_family(name: str) -> str:
    """A head key without its seed: the heads one training setting gave (``x0`` is ``x0-f0.5``)."""
    base = re.sub(r"-s\d+$", "", name)
    return "x0-f0.5" if base == "x0" else base


def summary(paths: list[Path], n: int) -> None:
    """Per head setting and method, over the heads of several seeds: the share of 3s (mean ± sd of the heads'
    means over sample seeds) and the fooling rate (mean, min-max), from the rows of ``paths`` (a row measured
    twice counts once)."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for r in json.loads(path.read_text()):
            if r["n"] == n:
                rows.setdefault((r.get("head", "none"), r["method"], r["seed"], r["steps"]), r)
    per_head: dict[tuple[str, str, str], list[dict]] = {}
    for (head, method, _, _), r in rows.items():
        per_head.setdefault((head_family(head), method, head), []).append(r)
    groups: dict[tuple[str, str], list[dict]] = {}
    for (family, method, _), rs in sorted(per_head.items()):
        fooled = [r["fooling_rate"] for r in rs if r["fooling_rate"] is not None]
        groups.setdefault((family, method), []).append(
            {"share": float(np.mean([r["share"] for r in rs])), "fooled": float(np.mean(fooled)) if fooled else None,
             "fd": float(np.mean([r["fd_to_real_3s"] for r in rs])),
             "s": float(np.mean([r["seconds_per_image"] for r in rs])), "seeds": len(rs)})
    print(f"{'head setting':16s} {'method':28s} {'heads':>5s} {'share of 3s':>13s} {'fooled (min-max)':>19s} "
          f"{'FD':>5s} {'s/img':>5s} seeds")
    for (family, method), heads in groups.items():
        shares = np.array([h["share"] for h in heads])
        fooled = [h["fooled"] for h in heads if h["fooled"] is not None]
        f = f"{np.mean(fooled):.3f} ({min(fooled):.2f}-{max(fooled):.2f})" if fooled else "-"
        print(f"{family:16s} {method:28s} {len(heads):5d} {shares.mean():.3f} ± {shares.std():.3f} {f:>19s} "
              f"{np.mean([h['fd'] for h in heads]):5.2f} {np.mean([h['s'] for h in heads]):5.2f} "
              f"{'/'.join(str(h['seeds']) for h in heads)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["unguided", "eq13-x0", "best-of-4", "fk-4", "best-of-8",
                                                     "fk-8", "tds-4", "prune-8", "prune-8+eq13"],
                    choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--augment", default="none", choices=("none", "x0", "adv", "x0-adv"),
                    help="the head's train-head --augment (x0: trained also on x0_hat of the labelled digits; adv: "
                         "also on adversarial versions of them; x0-adv: on adversarial versions of their x0_hat)")
    ap.add_argument("--augment-fraction", type=float, default=0.5, help="the head's train-head --augment-fraction")
    ap.add_argument("--adv-eps", type=float, default=0.25, help="the head's train-head --adv-eps (--augment adv)")
    ap.add_argument("--adv-steps", type=int, default=3, help="the head's train-head --adv-steps (--augment adv)")
    ap.add_argument("--head-seed", type=int, default=0, help="the head's train-head --seed")
    ap.add_argument("--ensemble", nargs="+", type=int, metavar="SEED",
                    help="guide with the heads of these seeds together (lambda shared out among them)")
    ap.add_argument("--work", type=Path, default=Path("runs/digits"))
    ap.add_argument("--out", type=Path, default=Path("runs/digits.json"))
    ap.add_argument("--summary", nargs="+", type=Path, metavar="JSON",
                    help="measure nothing: print the means over head seeds of the rows in these files")
    args = ap.parse_args()
    if args.summary:
        return summary(args.summary, args.n)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model, judge, real, labels = prepare(args.work, args.train_steps)
    heads = [head_for(args.work, model, labels, args.augment, args.augment_fraction, head_seed, args.adv_eps,
                      args.adv_steps) for head_seed in args.ensemble or [args.head_seed]]
    name = head_name(args.augment, args.augment_fraction, args.head_seed, args.adv_eps, args.adv_steps)
    if args.ensemble:
        name = re.sub(r"-s\d+$", "", name) + "-ens" + "+".join(map(str, args.ensemble))
    extractor = DenoiserFeatures(load_model(str(model)), "cpu")
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for seed in args.seeds:
        for method in args.methods:
            key = {"method": method, "seed": seed, "n": args.n, "steps": args.steps, "head": name}
            if any(all(r.get(k, "none") == v for k, v in key.items()) for r in rows):
                continue
            row = {**measure(model, heads, judge, method, seed, args.n, args.steps, args.batch, real, extractor),
                   "head": name}
            rows.append(row)
            args.out.write_text(json.dumps(rows, indent=1))
            print(json.dumps(row), flush=True)
    print(f"\n{'method':11s} {'share of 3s':>15s} {'FD':>7s} {'fooled':>7s} {'fwd':>5s} {'bwd':>5s} {'s/img':>6s}")
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method and r["n"] == args.n and r.get("head", "none") == name]
        if not rs:
            continue
        share = np.array([r["share"] for r in rs])
        fooled = [r["fooling_rate"] for r in rs if r["fooling_rate"] is not None]
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        print(f"{method:11s} {share.mean():.3f} ± {share.std():.3f} {mean('fd_to_real_3s'):7.2f} "
              f"{np.mean(fooled) if fooled else float('nan'):7.3f} {mean('forward_per_image'):5.0f} "
              f"{mean('backward_per_image'):5.0f} {mean('seconds_per_image'):6.2f} {len(rs)} seeds x n={args.n}")


if __name__ == "__main__":
    main()
