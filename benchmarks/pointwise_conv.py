"""1x1 convolutions on oneDNN (ddguide.core.unet.Conv1x1) against PyTorch's own choice, side by side.

    python benchmarks/pointwise_conv.py [--preset imagenet64_uncond_100M_1500K] [--batch 2] [--threads 1] [--rounds 3]

PyTorch gives float32 1x1 convolutions with batch < 16 on one thread to ``_slow_conv2d``; ddguide passes them a
dilation of 2 (the same result for a 1x1 kernel) so oneDNN runs them. Each round times the whole U-Net with
PyTorch's choice ("before") and with ddguide's ("after") back to back, forward and forward + backward to the
input (a guided step's shape); prints before/after per round and the median.
"""

from __future__ import annotations

import argparse
import time

import torch

import ddguide.core.unet as unet
from ddguide.core.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagenet64_uncond_100M_1500K")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset).unet
    net = unet.UNetModel(cfg).eval()
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (args.batch,))
    ours = unet._onednn_1x1

    def forward() -> None:
        with torch.no_grad():
            net(x, t)

    def backward() -> None:
        xx = x.clone().requires_grad_()
        net(xx, t).square().sum().backward()

    for name, fn in (("forward", forward), ("forward + backward to x", backward)):
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for key in times:
                unet._onednn_1x1 = ours if key == "after" else (lambda x: False)
                start = time.perf_counter()
                fn()
                if r:
                    times[key].append(time.perf_counter() - start)
        unet._onednn_1x1 = ours
        ratios = sorted(b / a for b, a in zip(times["before"], times["after"]))
        print(f"{args.preset} batch {args.batch}, {args.threads} thread(s), {name}: before/after per round "
              + " ".join(f"{r:.2f}" for r in ratios) + f", median {ratios[len(ratios) // 2]:.2f}", flush=True)


if __name__ == "__main__":
    main()
