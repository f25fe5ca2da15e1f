"""Analogs of the paper's Tables 1 and 2 on the shapes domain, and the cost of guidance, measured side by side.

    python benchmarks/paper_tables.py --table 1 --seeds 0 1 2      # attributes, 50+50 labels
    python benchmarks/paper_tables.py --table 2 --seeds 0 1 2      # 20 masks, 10 and 50 steps
    python benchmarks/paper_tables.py --table cost                 # guided step / unguided step, extraction

Quality is judged by the shapes oracle (exact labels for generated images); FD is the Fréchet distance on the
shipped model's pooled ``mid`` features (``ddguide fid --features denoiser``) between the samples and 1000 real
images. Every figure is mean ± std over the seeds; each seed draws its own labelled set, heads and samples.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddguide.core.data import list_images, read_mask, to_tensor, to_uint8
from ddguide.core.defaults import DEFAULT_TIMESTEPS, DEMO_LAMBDA
from ddguide.core.model import denoiser as base_denoiser
from ddguide.core.model import load_model
from ddguide.method.features import FeatureSpec, compute
from ddguide.method.guidance import Guide, head_guidance
from ddguide.method.heads import load_head
from ddguide.metrics.fid import DenoiserFeatures, compute_stats, frechet_distance
from ddguide.shapes import oracles
from ddguide.shapes.dataset import MASK_CLASSES, ShapesConfig
from ddguide.shapes.dataset import generate as generate_shapes
from ddguide.stages.extract import ExtractConfig, extract
from ddguide.stages.sample import draw, plain_denoiser, timesteps_for
from ddguide.stages.train_head import TrainHeadConfig, train_head

ATTRIBUTES = ("has_circle", "multiple_objects", "has_red")  # shape, count, colour (main_left also works)
TIMESTEPS = (300,)  # T_f of the classifier heads, whose taps are the model's attribute_blocks()


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


class Workspace:
    """Temporary data shared by the runs: a labelled pool per seed and real reference statistics."""

    def __init__(self, root: Path, model_path: str | None):
        self.root, self.model_path = root, model_path
        self.model = load_model(model_path)
        real = root / "real"
        generate_shapes(real, ShapesConfig(n=1000, seed=12345, split="test"))
        self.fd_features = DenoiserFeatures(self.model, torch.device("cpu"))
        self.real_stats = compute_stats(list_images(real / "images"), self.fd_features, batch=100)

    def pool(self, seed: int, n: int = 600) -> Path:
        folder = self.root / f"pool{seed}"
        if not folder.exists():
            generate_shapes(folder, ShapesConfig(n=n, seed=seed, split="val"))
        return folder

    def fd(self, images: np.ndarray) -> float:
        stats = compute_stats(to_tensor(images), self.fd_features, batch=100)
        return frechet_distance(stats.mu, stats.sigma, self.real_stats.mu, self.real_stats.sigma)


def labelled(pool: Path, attribute: str, per_side: int, dest: Path) -> tuple[Path, Path]:
    rows = list(csv.DictReader(open(pool / "attributes.csv")))
    dest.mkdir(parents=True, exist_ok=True)
    lines = [f"file,{attribute}"]
    for value in ("1", "0"):
        for r in [r for r in rows if r[attribute] == value][:per_side]:
            shutil.copyfile(pool / r["file"], dest / Path(r["file"]).name)
            lines.append(f"{Path(r['file']).name},{value}")
    (dest.parent / "labels.csv").write_text("\n".join(lines) + "\n")
    return dest, dest.parent / "labels.csv"


UNGUIDED: dict[tuple[int, int, int], np.ndarray] = {}  # (n, steps, seed) -> images, shared by the attributes


def sample(ws: Workspace, guide: Path | None, lam: float, grad: str, n: int, steps: int, seed: int,
           target: int | torch.Tensor = 1) -> np.ndarray:
    """n images (uint8) drawn with seeds 1000*seed + k, guided by one head towards ``target``."""
    model = ws.model.requires_grad_(False)
    indices = [1000 * seed + k for k in range(n)]
    kept = timesteps_for(model, steps, "ddim")
    if guide is None:
        if (n, steps, seed) not in UNGUIDED:
            plain = plain_denoiser(model, "fp32")
            UNGUIDED[(n, steps, seed)] = to_uint8(draw(model, plain, indices, 0, kept))
        return UNGUIDED[(n, steps, seed)]
    denoiser = head_guidance(base_denoiser(model), model, [Guide(load_head(guide), 1.0, target)], lam, indices,
                             grad=grad)
    return to_uint8(draw(model, denoiser, indices, 0, kept))


# ------------------------------------------------------------------------------------------------ Table 1


def table1(ws: Workspace, seeds: list[int], n: int, steps: int, lam: float, pixel_lam: float,
           attributes: list[str], blocks: tuple[str, ...], timesteps: tuple[int, ...]) -> None:
    print(f"\nTable 1 analog: attributes, 50+50 labels, {n} samples per run, DDIM {steps} steps, "
          f"lambda {lam} (pixel head {pixel_lam}), taps {' '.join(blocks)} @ {' '.join(map(str, timesteps))}; "
          f"oracle share with the attribute (higher is better), FD")
    methods = ("unguided", "ours (full)", "ours (x0)", "DDIM-I (pixels)")
    print(f"{'attribute':<18}{'base':>6}  " + "".join(f"{m:>26}" for m in methods))
    for attribute in attributes:
        acc: dict[str, list[float]] = {m: [] for m in methods}
        fds: dict[str, list[float]] = {m: [] for m in methods}
        heads_acc = []
        for seed in seeds:
            run = ws.root / f"t1-{attribute}-{seed}"
            folder, table = labelled(ws.pool(seed), attribute, 50, run / "labelled")
            feats = extract(ExtractConfig(data=str(folder), out=str(run / "f.safetensors"), model=ws.model_path,
                                          blocks=blocks, timesteps=timesteps,
                                          labels=str(table), label=attribute, device="cpu"))
            head = train_head(TrainHeadConfig(str(feats), str(run / "head.safetensors"), seed=seed))
            pixel = train_head(TrainHeadConfig(str(feats), str(run / "pixel.safetensors"), kind="pixel", seed=seed))
            heads_acc.append(load_head(head).cfg.metrics["val_accuracy"])
            runs = {"unguided": (None, 0.0, "x0"), "ours (full)": (head, lam, "full"), "ours (x0)": (head, lam, "x0"),
                    "DDIM-I (pixels)": (pixel, pixel_lam, "full")}
            for method, (guide, scale, grad) in runs.items():
                images = sample(ws, guide, scale, grad, n, steps, seed)
                acc[method].append(float(oracles.predict_attributes(images)[attribute].mean()))
                fds[method].append(ws.fd(images))
        base = np.mean([r[attribute] == "1" for r in csv.DictReader(open(ws.pool(seeds[0]) / "attributes.csv"))])
        print(f"{attribute:<18}{base:>6.2f}  " + "".join(f"{mean_std(acc[m]):>26}" for m in methods))
        print(f"{'  FD':<18}{'':>6}  " + "".join(f"{mean_std(fds[m]):>26}" for m in methods))
        print(f"{'  head val acc':<18}{'':>6}  {mean_std(heads_acc):>26}")


# ------------------------------------------------------------------------------------------------ Table 2


def table2(ws: Workspace, seeds: list[int], n: int, lam: float, pixel_lam: float) -> None:
    print(f"\nTable 2 analog: 20 training masks, {n} target masks per run, lambda {lam} (pixel head "
          f"{pixel_lam}); oracle mIoU between the target mask and the sample (higher is better), FD")
    methods = ("unguided", "ours", "DDIM-I (pixels)")
    print(f"{'steps':<8}" + "".join(f"{m:>26}" for m in methods))
    for steps in (10, 50):
        mious: dict[str, list[float]] = {m: [] for m in methods}
        fds: dict[str, list[float]] = {m: [] for m in methods}
        for seed in seeds:
            run = ws.root / f"t2-{seed}"
            pool = ws.pool(seed)
            train_dir = run / "train"
            if not (run / "seg.safetensors").exists():
                train_dir.mkdir(parents=True)
                for f in sorted((pool / "images").rglob("*.png"))[:20]:
                    shutil.copyfile(f, train_dir / f.name)
                feats = extract(ExtractConfig(data=str(train_dir), out=str(run / "f.safetensors"),
                                              model=ws.model_path, blocks=("out.5", "out.8"), timesteps=(500,),
                                              masks=str(pool / "masks"), device="cpu"))
                train_head(TrainHeadConfig(str(feats), str(run / "seg.safetensors"), kind="segmentation", seed=seed))
                train_head(TrainHeadConfig(str(feats), str(run / "pixel.safetensors"), kind="pixel", seed=seed))
            targets = sorted((pool / "masks").glob("*.png"))[100:100 + n]
            for method, guide, scale in (("unguided", None, 0.0), ("ours", run / "seg.safetensors", lam),
                                         ("DDIM-I (pixels)", run / "pixel.safetensors", pixel_lam)):
                wanted = torch.stack([torch.from_numpy(read_mask(f)) for f in targets])  # (n, H, W)
                images = sample(ws, guide, scale, "full", len(targets), steps, seed, wanted)
                pred = oracles.predict_masks(images)
                classes = len(MASK_CLASSES)
                mious[method].append(float(np.mean([oracles.miou(p[None], w[None].numpy(), classes)
                                                    for p, w in zip(pred, wanted)])))
                fds[method].append(ws.fd(images))
        print(f"{steps:<8}" + "".join(f"{mean_std(mious[m]):>26}" for m in methods))
        print(f"{'  FD':<8}" + "".join(f"{mean_std(fds[m]):>26}" for m in methods))


# ------------------------------------------------------------------------------------------------ cost


def ratios(fns: dict[str, Callable[[], object]], base: str, rounds: int = 15) -> dict[str, np.ndarray]:
    """Each function's time over ``base``'s, per round: the functions run in turn within a round, so a drift in
    the machine's speed (other tenants, clocks) touches the numerator and denominator alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ref = np.array(times[base])
    return {name: np.array(t) / ref for name, t in times.items()}


def spread(r: np.ndarray) -> str:
    q1, q2, q3 = np.percentile(r, (25, 50, 75))
    return f"{q2:>6.2f}x  (quartiles {q1:.2f}-{q3:.2f})"


def cost(ws: Workspace, batch: int) -> None:
    """Seconds per step, guided over unguided, measured in one process on the same inputs."""
    model = ws.model.requires_grad_(False)
    run = ws.root / "cost"
    folder, table = labelled(ws.pool(0), "has_circle", 16, run / "labelled")
    feats = extract(ExtractConfig(data=str(folder), out=str(run / "f.safetensors"), model=ws.model_path,
                                  blocks=ws.model.net.attribute_blocks(), timesteps=TIMESTEPS, labels=str(table),
                                  label="has_circle", device="cpu"))
    head = load_head(train_head(TrainHeadConfig(str(feats), str(run / "h.safetensors"), steps=10)))
    guides = [Guide(head, 1.0, 1)]
    x = torch.randn(batch, 3, model.image_size, model.image_size)
    t = torch.full((batch,), 500)
    indices = list(range(batch))

    def unguided() -> None:
        with torch.no_grad():
            model(x, t)

    def paper_structure() -> None:
        """The reference code's structure: a full U-Net pass for eps and a second full pass for the features,
        with the backward through both."""
        x_in = x.detach().requires_grad_(True)
        eps = model(x_in, t)
        x0 = ((x_in - (1 - model.abar[500]).sqrt().float() * eps) / model.abar[500].sqrt().float()).clamp(-1, 1)
        taps = {}
        hooks = [model.net.block_module(b).register_forward_hook(lambda m, i, o, b=b: taps.__setitem__(b, o))
                 for b in model.net.attribute_blocks()]
        model(x0, torch.full((batch,), TIMESTEPS[0]))  # the whole network, as the reference code runs it
        for h in hooks:
            h.remove()
        logits = head(head.inputs({f"feat.{b}@{TIMESTEPS[0]}": o for b, o in taps.items()}))
        torch.autograd.grad(torch.log_softmax(logits, 1)[:, 1].sum(), x_in)

    full = head_guidance(base_denoiser(model), model, guides, 1.0, indices, grad="full")
    x0_mode = head_guidance(base_denoiser(model), model, guides, 1.0, indices, grad="x0")
    spec = FeatureSpec(("mid",), (300, 800))
    rounds = 15
    steps = ratios({"unguided": unguided, "ours, --guide-grad x0": lambda: x0_mode(x, t),
                    "ours, --guide-grad full": lambda: full(x, t),
                    "paper's structure (2 full passes + backward)": paper_structure}, "unguided", rounds)
    print(f"\nCost of one sampling step, batch {batch}, {torch.get_num_threads()} threads (time over the unguided "
          f"step's in the same round; median and quartiles of {rounds} rounds)")
    for name, r in steps.items():
        if name != "unguided":
            print(f"  {name:<46}{spread(r)}")
    taps = ratios({"batched": lambda: compute(model, x, spec, indices),
                   "separate": lambda: [model(x, torch.full((batch,), s)) for s in (300, 800)]}, "batched", rounds)
    print(f"  extract mid at T=300,800: two full forward passes over one truncated batched pass"
          f"{spread(taps['separate'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("1", "2", "cost", "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=None, help="model artifact (default: the shipped model)")
    parser.add_argument("--n", type=int, default=16, help="samples per run (Table 1) / target masks (Table 2)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of Table 1")
    parser.add_argument("--lam", type=float, default=DEMO_LAMBDA, help="lambda for attribute heads")
    parser.add_argument("--pixel-lam", type=float, default=DEMO_LAMBDA, help="lambda for the DDIM-I pixel head")
    parser.add_argument("--blocks", nargs="+", default=None, help="taps of the Table 1 heads (default: extract's)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    parser.add_argument("--mask-lam", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16, help="batch of the cost measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attributes", nargs="+", default=list(ATTRIBUTES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp), args.model)
        if args.table in ("cost", "all"):
            cost(ws, args.batch)
        if args.table in ("1", "all"):
            table1(ws, args.seeds, args.n, args.steps, args.lam, args.pixel_lam, args.attributes,
                   tuple(args.blocks or ws.model.net.default_taps()), tuple(args.timesteps))
        if args.table in ("2", "all"):
            table2(ws, args.seeds, min(args.n, 16), args.mask_lam, args.mask_lam)


if __name__ == "__main__":
    main()
