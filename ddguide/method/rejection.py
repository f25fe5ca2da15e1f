"""Rejection with a head on the *unconditional* model's features (paper §5.3).

A sample of class c is kept when the rejection head gives p(c) >= threshold (paper: 0.2). The head reads ``mid``
taps at T_f = 300 and 800, concatenated and L2-normalised over channels — the same ``Head.inputs`` is used in
training and here (the reference code normalised in training but not when filtering). ``filter`` applies it to a
samples folder; ``sample --reject`` applies it inside the sampling loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ddguide.core.data import to_tensor
from ddguide.core.errors import UserError
from ddguide.core.model import Model, load_model
from ddguide.method.features import compute
from ddguide.method.heads import Head, check_compatible, load_head


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")


@dataclass
class Rejector:
    """The rejection head together with the unconditional model whose features it reads."""

    head: Head
    model: Model

    @classmethod
    def load(cls, head_path: str, model_path: str | None, device: torch.device) -> "Rejector":
        head = load_head(head_path, device)
        if head.reads_pixels or head.cfg.dense:
            raise UserError(f"{head_path}: a {head.cfg.kind} head cannot filter; train one with --kind rejection")
        model = load_model(model_path, device).requires_grad_(False)
        check_compatible(head, model.fingerprint, model_path)
        return cls(head, model)

    @property
    def channels(self) -> int:
        """The image channels its model reads (1: grey, 3: RGB)."""
        return self.model.net.cfg.in_channels

    def class_index(self, name: str) -> int:
        if name not in self.head.cfg.classes:
            raise UserError(f"class {name!r} is not among the rejection head's classes "
                            f"({', '.join(self.head.cfg.classes)})")
        return self.head.cfg.classes.index(name)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, targets: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
        """p(target) for uint8 images (N, H, W, C), C the model's channels."""
        size = self.head.cfg.image_size
        if images.shape[1:3] != (size, size):
            raise UserError(f"images are {images.shape[2]}x{images.shape[1]}, the head expects {size}x{size}")
        x = to_tensor(images).to(self.model.device)
        taps = compute(self.model, x, self.head.spec, indices)
        probs = torch.softmax(self.head.calibrated(self.head(self.head.inputs(taps))).float(), dim=1)
        return probs[torch.arange(len(x)), torch.as_tensor(list(targets), device=probs.device)].cpu()
