"""Peak memory (RSS) of `ddguide extract` at a large layout, one fresh process per measurement.

    python benchmarks/extract_memory.py [--preset ffhq] [--images 0 8 16] [--batch 8]
                                        [--blocks out.10 out.12 out.14] [--workdir /tmp/ddguide-extract-memory]

Builds a model with random weights at the preset's layout once (ffhq: 553M parameters, 2.2 GB in fp32) in the
work folder (not in the repository), writes N random images at the model's size, and runs `ddguide extract`
in a subprocess per N; prints the subprocess's peak RSS (ru_maxrss of the child; give N in increasing order).
N = 0 measures `load_model` alone.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

LOAD_ONLY = """
import resource, sys
from ddguide.core.model import load_model
load_model(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ffhq")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 8, 16])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--blocks", nargs="+", default=["out.10", "out.12", "out.14"])
    parser.add_argument("--timesteps", nargs="+", default=[], help="default: extract's")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ddguide-extract-memory"))
    args = parser.parse_args()

    import torch

    from ddguide.core.model import Model, save_model
    from ddguide.core.presets import get_preset
    from ddguide.core.unet import UNetModel

    args.workdir.mkdir(parents=True, exist_ok=True)
    preset = get_preset(args.preset)
    model_path = args.workdir / f"{args.preset}-random.safetensors"
    if not model_path.exists():
        torch.manual_seed(0)
        net = UNetModel(preset.unet)
        save_model(model_path, Model(net, preset.diffusion, fingerprint="", classes=None, info={}))
        del net
    size = preset.unet.image_size
    print(f"{args.preset}: {model_path.stat().st_size / 1e9:.2f} GB of weights, {size} px, taps "
          f"{' '.join(args.blocks)} at T_f {' '.join(args.timesteps) or 'default'}, batch {args.batch}, "
          f"--precision {args.precision}")
    for n in args.images:
        start = time.perf_counter()
        if n == 0:
            out = subprocess.run([sys.executable, "-c", LOAD_ONLY, str(model_path)], check=True,
                                 capture_output=True, text=True)
            peak_kb = int(out.stdout.split()[-1])
            print(f"load the model only: peak RSS {peak_kb / 1e6:.2f} GB ({time.perf_counter() - start:.0f} s)")
            continue
        images = args.workdir / f"images{n}"
        if not images.exists():
            images.mkdir()
            rng = np.random.default_rng(n)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-m", "ddguide", "extract", str(images), "--model", str(model_path),
                        "--out", str(args.workdir / f"features{n}.safetensors"), "--blocks", *args.blocks,
                        *(["--timesteps", *args.timesteps] if args.timesteps else []), "--batch", str(args.batch), "--device", "cpu",
                        "--precision", args.precision, "--quiet"], check=True)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        note = "" if peak_kb > before else " (not above an earlier child's peak: run one N per call)"
        print(f"{n} images: peak RSS {peak_kb / 1e6:.2f} GB{note} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
