"""A plug-in guide written by hand: a pixel classifier of "this image is red", with no training and no head.

ddguide calls ``redness(x0_hat)`` during sampling with x0_hat float (N, 3, H, W) in [-1, 1] and differentiates
the returned log-likelihoods (N,) as it does a head's (Eq. 13):

    ddguide sample --guide plugin_guide.py:redness --lambda 0.05 --normalize-grad --out red/

Run as a script it prints the mean score of the images in samples folders: python3 plugin_guide.py plain/ red/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def redness(x0: torch.Tensor) -> torch.Tensor:
    """log p(red | x0): a logistic classifier on how far red exceeds the mean of green and blue, over the image."""
    r, g, b = x0[:, 0], x0[:, 1], x0[:, 2]
    margin = (r - (g + b) / 2).mean(dim=(1, 2))  # in [-2, 2]; about 0 for grey images
    return F.logsigmoid(8.0 * (margin - 0.1))


def _folder_score(folder: str) -> float:
    import numpy as np
    from PIL import Image

    files = sorted(Path(folder).glob("[0-9]*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    return float(redness(x.float() / 127.5 - 1).exp().mean())


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(f"{folder}: mean p(red) {_folder_score(folder):.3f}")
