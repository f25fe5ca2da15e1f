"""Training step time with and without ``--compile``, measured side by side in one process.

    python benchmarks/train_speed.py [--preset shapes32] [--batch 64] [--steps 20] [--threads 2] [--device cpu]

All runs go through ``ddguide.stages.training.fit`` (the loop of ``ddguide train``) from the same initial weights on
random images: eager with bf16 autocast (``train``'s default), eager fp32, and compiled fp32 (on the CPU
``--compile`` is refused with bf16, whose compiled backward loses gradients; on CUDA compiled bf16 is timed too).
The first step of each run is reported apart: for the compiled run it holds the one-off compilation. Ratios
compare the medians of the remaining steps. Last, the EMA update ``fit`` makes after every step (one fused
operation over all weights) is timed against a loop of two operations per tensor, and checked to give the same
values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddguide.core.presets import get_preset
from ddguide.core.runtime import resolve_device
from ddguide.core.unet import UNetModel
from ddguide.stages.training import Recipe, ema_update, fit


def step_times(preset: str, batch: int, steps: int, compile_: bool, precision: str,
               device: torch.device) -> list[float]:
    p = get_preset(preset)
    torch.manual_seed(0)
    net = UNetModel(p.unet).to(device)
    size = p.unet.image_size
    images = torch.randint(0, 256, (256, size, size, 3), dtype=torch.uint8)
    recipe = Recipe(steps=steps, batch=batch, lr=2e-4, warmup=0, precision=precision, checkpoint_every=steps + 1,
                    compile=compile_)
    stamps = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as tmp:
        fit(net, p.diffusion, recipe, Path(tmp) / "ckpt.safetensors", {"benchmark": "train_speed"},
            torch.Generator().manual_seed(0), lambda: (images, None), device,
            lambda done, total, info: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _ema_per_tensor(ema: dict[str, torch.Tensor], net: torch.nn.Module, decay: float, step: int) -> None:
    """The update ``fit`` made before it was fused: the baseline of the EMA timing."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(d).add_(v, alpha=1 - d)
            else:
                ema[k].copy_(v)


def ema_times(preset: str, device: torch.device, rounds: int = 50) -> tuple[float, float, bool]:
    """Median seconds of the per-tensor and the fused EMA update, timed in turn, and whether they agree."""
    net = UNetModel(get_preset(preset).unet).to(device)
    fresh = lambda: {k: v.detach().clone() for k, v in net.state_dict().items()}  # noqa: E731
    loop, fused = fresh(), fresh()
    times: dict[str, list[float]] = {"loop": [], "fused": []}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for step in range(rounds):
            for p in net.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)  # weights that move, as in training
            for name, fn, ema in (("loop", _ema_per_tensor, loop), ("fused", ema_update, fused)):
                sync()
                start = time.perf_counter()
                fn(ema, net, 0.999, step)
                sync()
                times[name].append(time.perf_counter() - start)
    same = all(torch.equal(loop[k], fused[k]) for k in loop)
    return statistics.median(times["loop"][1:]), statistics.median(times["fused"][1:]), same


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
    loop, fused, same = ema_times(args.preset, device)
    print(f"EMA update: per-tensor loop {loop * 1000:.2f} ms, fused {fused * 1000:.2f} ms ({loop / fused:.2f}x); "
          f"same values: {same}")


if __name__ == "__main__":
    main()
