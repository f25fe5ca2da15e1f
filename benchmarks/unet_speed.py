"""U-Net speed at fp32 and bf16 autocast, as a share of the same convolutions' own speed on this machine.

    python benchmarks/unet_speed.py [--preset imagenet64_uncond_100M_1500K] [--batch 8] [--repeats 3] [--threads N]
        [--layouts nchw channels_last]

Weights are random (speed does not depend on them). FLOPs are counted by torch's FlopCounterMode (2 per
multiply-add). The ceiling is measured, not assumed: every convolution the network runs (same input, weight,
stride, padding) is timed alone, back to back, in the same mode (forward; forward and backward to the input,
as a guided step needs; forward and backward to input and weights, as training does) and precision; the
ceiling is their FLOPs over their summed best times. "of ceiling" is the whole network's GFLOP/s over that:
what GroupNorm, SiLU, attention, concatenation and Python cost on top of oneDNN's convolutions. (A square
fp32 matmul, the former yardstick, reaches far less than oneDNN's convolutions on this CPU; it is printed too.)

Each row runs in each of ``--layouts``: NCHW, and channels_last (NHWC), the layout `load_model` puts models in on
the CPU (core.runtime.fast_layout); the ceiling is measured in the row's layout, and the last lines give
channels_last's speed over NCHW's per mode and precision, both measured in this run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ddguide.core.presets import get_preset
from ddguide.core.runtime import autocast
from ddguide.core.unet import UNetModel

MODES = ("forward", "guided step", "training step")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN builds its kernels on the first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeats) / 1e9


def run_mode(fn, mode: str, precision: str):
    """A callable running ``fn`` (inputs -> output) in ``mode`` under ``precision``."""
    def call(*inputs: torch.Tensor) -> None:
        if mode == "forward":
            with torch.no_grad(), autocast(torch.device("cpu"), precision):
                fn(*inputs)
            return
        with autocast(torch.device("cpu"), precision):
            out = fn(*inputs)
        out.float().square().mean().backward()
    return call


def network_step(net: UNetModel, x: torch.Tensor, t: torch.Tensor, mode: str, precision: str):
    for p in net.parameters():
        p.requires_grad_(mode == "training step")

    def step() -> None:
        xx = x.clone().requires_grad_(mode == "guided step")
        run_mode(lambda a: net(a, t), mode, precision)(xx)
        net.zero_grad(set_to_none=True)
    return step


def conv_calls(net: UNetModel, x: torch.Tensor, t: torch.Tensor) -> dict[tuple, int]:
    """Every convolution one forward runs: (input shape, weight shape, stride, padding, dilation, dim) -> count."""
    calls: dict[tuple, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        key = (tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding,
               module.dilation, module.weight.dim() - 2, type(module))
        calls[key] = calls.get(key, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    with torch.no_grad():
        net(x, t)
    for h in handles:
        h.remove()
    return calls


def conv_ceiling(calls: dict[tuple, int], mode: str, precision: str, repeats: int,
                 layout: torch.memory_format = torch.contiguous_format) -> float:
    """GFLOP/s of the network's convolutions run alone (each the way the network runs it), in ``mode``."""
    flops = seconds = 0.0
    for (shape, wshape, stride, padding, dilation, dim, kind), count in calls.items():
        conv = kind(wshape[1], wshape[0], wshape[2:], stride=stride, padding=padding, dilation=dilation)
        conv.requires_grad_(mode == "training step")
        x = torch.randn(shape)
        if dim == 2:
            conv.to(memory_format=layout)
            x = x.contiguous(memory_format=layout)
        x.requires_grad_(mode != "forward")
        step = run_mode(conv, mode, precision)
        with FlopCounterMode(display=False) as counter:
            step(x)
        flops += count * counter.get_total_flops()
        seconds += count * best_time(lambda: step(x), repeats)
    return flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagenet64_uncond_100M_1500K")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = get_preset(args.preset).unet
    net = UNetModel(cfg).eval()
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (args.batch,))
    calls = conv_calls(net, x, t)
    params = sum(p.numel() for p in net.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{sum(calls.values())} convolutions ({len(calls)} shapes)")
    print(f"{'mode':<15}{'precision':<10}{'layout':<15}{'images/s':>10}{'GFLOP/img':>10}{'GFLOP/s':>10}"
          f"{'conv ceiling':>14}{'of ceiling':>12}")
    speed: dict[tuple[str, str, str], float] = {}
    for mode in args.modes:
        for precision in ("fp32", "bf16"):
            for layout in args.layouts:
                net.to(memory_format=LAYOUTS[layout])
                step = network_step(net, x.contiguous(memory_format=LAYOUTS[layout]), t, mode, precision)
                with FlopCounterMode(display=False) as counter:
                    step()
                flops = counter.get_total_flops()
                seconds = best_time(step, args.repeats)
                speed[mode, precision, layout] = args.batch / seconds
                achieved = flops / seconds / 1e9
                ceiling = conv_ceiling(calls, mode, precision, args.repeats, LAYOUTS[layout])
                print(f"{mode:<15}{precision:<10}{layout:<15}{args.batch / seconds:>10.2f}"
                      f"{flops / args.batch / 1e9:>10.1f}{achieved:>10.1f}{ceiling:>14.1f}{achieved / ceiling:>12.0%}",
                      flush=True)
    if len(args.layouts) == 2:
        print("channels_last over nchw (images/s): " + ", ".join(
            f"{mode} {precision} {speed[mode, precision, 'channels_last'] / speed[mode, precision, 'nchw']:.2f}x"
            for mode in args.modes for precision in ("fp32", "bf16")))
    print("square 2048 matmul GFLOP/s: " + ", ".join(f"{name} {matmul_ceiling(dtype):.1f}" for name, dtype in
                                                  (("fp32", torch.float32), ("bf16", torch.bfloat16))))


if __name__ == "__main__":
    main()
