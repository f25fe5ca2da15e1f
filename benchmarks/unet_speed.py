"""U-Net forward speed at fp32 and bf16 autocast, next to this machine's matmul ceiling.

    python benchmarks/unet_speed.py [--preset imagenet64_uncond_100M_1500K] [--batch 8] [--repeats 3]

Weights are random (speed does not depend on them). FLOPs are counted by torch's FlopCounterMode
(2 per multiply-add), so "achieved GFLOP/s" compares directly with the matmul figure measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddguide.models import autocast
from ddguide.unet import UNetModel, get_preset


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagenet64_uncond_100M_1500K")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = get_preset(args.preset).unet
    net = UNetModel(cfg).eval()
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (args.batch,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    flops = counter.get_total_flops()
    params = sum(p.numel() for p in net.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, {flops / args.batch / 1e9:.1f} GFLOP per image, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'precision':<10}{'images/s':>10}{'GFLOP/s':>10}{'matmul GFLOP/s':>16}{'of ceiling':>12}")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        def forward() -> None:
            with torch.no_grad(), autocast(torch.device("cpu"), precision):
                net(x, t)
        seconds = best_time(forward, args.repeats)
        achieved = flops / seconds / 1e9
        ceiling = matmul_ceiling(dtype)
        print(f"{precision:<10}{args.batch / seconds:>10.2f}{achieved:>10.1f}{ceiling:>16.1f}"
              f"{achieved / ceiling:>12.0%}")


if __name__ == "__main__":
    main()
