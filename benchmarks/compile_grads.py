"""Does ``torch.compile`` give the U-Net the same gradients as eager mode? fp32 and bf16 autocast, side by side.

    python benchmarks/compile_grads.py [--preset shapes32] [--channels 8] [--device cpu]

One batch of noise through the preset's architecture (``--channels`` narrows it to keep compilation short),
loss = mean square of the output; each parameter's gradient is compared with the eager fp32 one. ``train``
refuses ``--compile`` with bf16 on the CPU because of what this prints there with torch 2.13: the compiled bf16
backward leaves every block below the first downsampling with a zero gradient. Rerun it after a torch upgrade.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ddguide.core.presets import get_preset
from ddguide.core.runtime import autocast
from ddguide.core.unet import UNetModel


def gradients(net: UNetModel, model, x, t, device, precision: str) -> dict[str, torch.Tensor]:
    net.zero_grad()
    with autocast(device, precision):
        out = model(x, t)
    out.float().pow(2).mean().backward()
    return {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for k, p in net.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes32")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = dataclasses.replace(get_preset(args.preset).unet, model_channels=args.channels)
    torch.manual_seed(0)
    net = UNetModel(cfg).to(device)
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, 1000, (4,), device=device)
    compiled = torch.compile(net)
    ref = gradients(net, net, x, t, device, "fp32")
    for name, model, precision in (("eager bf16", net, "bf16"), ("compiled fp32", compiled, "fp32"),
                                   ("compiled bf16", compiled, "bf16")):
        g = gradients(net, model, x, t, device, precision)
        lost = [k for k in g if g[k].abs().max() == 0 and ref[k].abs().max() > 0]
        rel = sorted(((g[k] - ref[k]).norm() / ref[k].norm()).item() for k in g if ref[k].norm() > 0)
        print(f"{name:14s} median relative gradient difference to eager fp32 {rel[len(rel) // 2]:.4f}; "
              f"parameters with a zero gradient: {len(lost)} of {len(g)}" + (f" (first: {lost[0]})" if lost else ""))


if __name__ == "__main__":
    main()
