"""Reading what users already have: image folders (flat or class sub-folders), label files and masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddguide.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All images under ``folder`` (recursively), sorted by relative path so the order is stable."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not p.name.startswith(".") and p.name != "grid.png")
    if not files:
        raise UserError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: str | os.PathLike, size: int | None = None, resize: str = "refuse") -> np.ndarray:
    """An RGB image as uint8 (H, W, 3).

    ``size`` asks for a square image of that side: ``resize='refuse'`` raises on any other size,
    ``'resize'`` resizes with bicubic filtering (``'center-crop'`` crops to a square first).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if size is not None and im.size != (size, size):
        if resize == "refuse":
            raise UserError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size} "
                            "(pass --resize resize or --resize center-crop to convert)")
        if resize == "center-crop":
            side = min(im.size)
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            im = im.crop((left, top, left + side, top + side))
        elif resize != "resize":
            raise UserError(f"unknown resize policy {resize!r} (refuse, resize, center-crop)")
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    if images.ndim == 3:
        images = images[None]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
