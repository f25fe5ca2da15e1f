"""Training step time with and without ``--compile``, measured side by side in one process.

    python benchmarks/train_speed.py [--preset shapes32] [--batch 64] [--steps 20] [--threads 2] [--device cpu]

All runs go through ``ddguide.train.fit`` (the loop of ``ddguide train``) from the same initial weights on
random images: eager with bf16 autocast (``train``'s default), eager fp32, and compiled fp32 (on the CPU
``--compile`` is refused with bf16, whose compiled backward loses gradients; on CUDA compiled bf16 is timed too).
The first step of each run is
reported apart: for the compiled run it holds the one-off compilation. Ratios compare the medians of the
remaining steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddguide.models import resolve_device
from ddguide.train import Recipe, fit
from ddguide.unet import UNetModel, get_preset


class _Key:
    def identity(self) -> dict:
        return {"benchmark": "train_speed"}


def step_times(preset: str, batch: int, steps: int, compile_: bool, precision: str,
               device: torch.device) -> list[float]:
    p = get_preset(preset)
    torch.manual_seed(0)
    net = UNetModel(p.unet).to(device)
    size = p.unet.image_size
    images = torch.randint(0, 256, (256, size, size, 3), dtype=torch.uint8)
    recipe = Recipe(steps, batch, 2e-4, 0, 0.999, 1.0, precision, steps + 1, compile=compile_)
    stamps = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as tmp:
        fit(net, p.diffusion, recipe, Path(tmp) / "ckpt.safetensors", _Key(), torch.Generator().manual_seed(0),
            lambda: (images, None), device, lambda done, total, info: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (where compiled bf16 is timed too)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    runs = [("eager bf16", False, "bf16"), ("eager fp32", False, "fp32"), ("compiled fp32", True, "fp32")]
    if device.type == "cuda":
        runs.append(("compiled bf16", True, "bf16"))
    medians = {}
    for name, compile_, precision in runs:
        times = step_times(args.preset, args.batch, args.steps, compile_, precision, device)
        medians[name] = statistics.median(times[1:])
        print(f"{name:14s} first step {times[0]:7.2f} s   then median {medians[name]:.3f} s/step "
              f"({args.batch / medians[name]:.0f} img/s) over {len(times) - 1} steps", flush=True)
    for compiled in [name for name in medians if name.startswith("compiled")]:
        for base in ("eager fp32", "eager bf16"):
            print(f"{compiled} / {base} step time: {medians[compiled] / medians[base]:.2f}")


if __name__ == "__main__":
    main()
