"""A guided sampling step at the default precision against an fp32 unguided step, measured side by side.

    python benchmarks/guided_step.py --preset shapes32 --batch 16 --threads 1
    python benchmarks/guided_step.py --preset imagenet64_uncond_100M_1500K --batch 4 --threads 2

One step of `sample` as it runs: the base denoiser, and head guidance (Eq. 13, `--guide-grad x0` and `full`)
around it, at `--precision auto` (bf16 autocast where the device has fast bf16, as `sample` picks it) and at
fp32. The model has random weights of the preset (``shipped`` loads the shipped model); the head is a classifier
on the model's default taps at T_f = 300 with random weights (its size, not its weights, sets the cost); also
the heads' truncated feature pass alone, what a verifier pays per candidate it scores; and, on a copy of the
model in the NCHW layout models had before `load_model` put them in channels_last, the fp32 unguided step and
the default-precision x0 step. The
variants run in turn within each round and each is divided by the fp32 unguided step of its own round, so a drift
in the machine's speed touches numerator and denominator alike; the median and quartiles over the rounds are
printed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddguide.core.model import Model, denoiser, load_model  # noqa: E402
from ddguide.core.presets import get_preset  # noqa: E402
from ddguide.core.runtime import autocast, fast_layout, resolve_precision  # noqa: E402
from ddguide.core.unet import UNetModel  # noqa: E402
from ddguide.method.features import FeatureSpec, compute  # noqa: E402
from ddguide.method.guidance import Guide, head_guidance  # noqa: E402
from ddguide.method.heads import Head, HeadConfig  # noqa: E402


def build(preset: str) -> Model:
    """The preset's model (random weights) or the shipped one, in the layout `load_model` gives (channels_last on
    the CPU)."""
    if preset == "shipped":
        return load_model()
    p = get_preset(preset)
    torch.manual_seed(0)
    return fast_layout(Model(UNetModel(p.unet).eval(), p.diffusion), "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shapes32", help="a preset name, or 'shipped' for the shipped model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.preset).requires_grad_(False)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # the layout models had before
    net, size = model.net, model.image_size
    taps = tuple(net.default_taps())
    spec = FeatureSpec(taps, (300,))
    cfg = HeadConfig(kind="classifier", classes=["0", "1"], spec=spec.to_dict(),
                     in_channels=sum(net.block_channels(b) for b in taps), image_size=size)
    torch.manual_seed(1)
    guides = [Guide(Head(cfg, "").eval(), 1.0, 1)]
    x = torch.randn(args.batch, net.cfg.in_channels, size, size, generator=torch.Generator().manual_seed(2))
    t = torch.full((args.batch,), 500)
    indices = list(range(args.batch))
    auto = resolve_precision("auto", torch.device("cpu"))

    def step(precision: str, grad: str | None, model: Model = model):
        base = denoiser(model, precision=precision)
        den = base if grad is None else head_guidance(base, model, guides, 1.0, indices, grad=grad,
                                                      precision=precision)
        if grad is None:
            def run() -> None:
                with torch.no_grad():
                    den(x, t)
            return run
        return lambda: den(x, t)

    def feature_pass() -> None:  # what a verifier pays per candidate it scores (--search, --particles)
        with torch.no_grad(), autocast(x.device, auto):
            compute(model, x, spec, indices)

    variants = {"unguided, fp32": step("fp32", None), f"unguided, auto ({auto})": step(auto, None),
                f"heads' feature pass, auto ({auto})": feature_pass,
                f"guided x0, auto ({auto})": step(auto, "x0"), f"guided full, auto ({auto})": step(auto, "full"),
                "guided x0, fp32": step("fp32", "x0"), "guided full, fp32": step("fp32", "full"),
                "unguided, fp32, NCHW": step("fp32", None, nchw),
                f"guided x0, auto ({auto}), NCHW": step(auto, "x0", nchw)}
    for fn in variants.values():
        fn()  # warm-up: oneDNN builds its kernels on the first call
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ref = np.array(times["unguided, fp32"])
    print(f"{args.preset} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, channels_last; the "
          f"NCHW rows: the layout before), batch {args.batch}, {args.threads} thread(s), taps {' '.join(taps)} @ 300; "
          f"time over the fp32 unguided step of the same round ({ref.mean() * 1000 / args.batch:.1f} ms per image), "
          f"median and quartiles of {args.rounds} rounds:")
    for name, ts in times.items():
        r = np.array(ts) / ref
        q1, q2, q3 = np.percentile(r, (25, 50, 75))
        print(f"  {name:<40} {q2:5.2f}x  (quartiles {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main()
