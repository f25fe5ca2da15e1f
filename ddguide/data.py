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


# ------------------------------------------------------------------------------------- labels and masks


def read_attribute_table(path: str | os.PathLike) -> tuple[list[str], dict[str, list[int]]]:
    """Attribute names and a ``file -> values (0/1)`` map from a CSV ``file,attr,...`` (0/1 or -1/1) or
    CelebA's ``list_attr_celeba.txt`` (a count line, a names line, then ``file v1 v2 ...`` with -1/1)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such label file")
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise UserError(f"{path}: holds no labels")
    if lines[0].strip().isdigit():  # CelebA layout
        names, rows = lines[1].split(), [ln.split() for ln in lines[2:]]
    else:
        import csv

        table = list(csv.reader(lines))
        names, rows = [c.strip() for c in table[0][1:]], table[1:]
    values: dict[str, list[int]] = {}
    for row in rows:
        if len(row) != len(names) + 1:
            raise UserError(f"{path}: row {row[0]!r} has {len(row) - 1} values for {len(names)} attributes")
        try:
            values[row[0].strip()] = [1 if int(v) > 0 else 0 for v in row[1:]]
        except ValueError:
            raise UserError(f"{path}: row {row[0]!r} holds a value that is not 0/1 or -1/1") from None
    return names, values


def attribute_labels(files: list[Path], root: str | os.PathLike, table: str | os.PathLike, name: str) -> torch.Tensor:
    """The 0/1 value of attribute ``name`` for each image, matched by path relative to ``root`` or the
    label file's folder, else by file name."""
    names, values = read_attribute_table(table)
    if name not in names:
        raise UserError(f"{table}: no attribute {name!r}; it has {', '.join(names)}")
    col = names.index(name)
    by_name = {Path(k).name: v for k, v in values.items()}
    labels = []
    for f in files:
        keys = [_relative(f, root), _relative(f, Path(table).parent)]
        row = next((values[k] for k in keys if k in values), None) or by_name.get(f.name)
        if row is None:
            raise UserError(f"{f}: no row in {table}")
        labels.append(row[col])
    return torch.tensor(labels, dtype=torch.long)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask of class ids (H, W) from a PNG (palette or grey values are ids) or a ``.npy`` array."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            mask = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                mask = np.asarray(im if im.mode in ("L", "P", "I", "I;16") else im.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: not a readable mask ({e.__class__.__name__})") from None
    if mask.ndim != 2:
        raise UserError(f"{path}: a mask must be 2-D class ids, got shape {mask.shape}")
    return mask.astype(np.int64)


def paired_masks(files: list[Path], mask_dir: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Masks paired with images by file stem (ddpm-segmentation's few-shot layout), (N, H, W) int64."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise UserError(f"{mask_dir}: no such mask folder")
    by_stem = {p.stem: p for p in mask_dir.rglob("*") if p.suffix.lower() in (".png", ".npy")}
    masks = []
    for f in files:
        if f.stem not in by_stem:
            raise UserError(f"{f.name}: no mask with stem {f.stem!r} in {mask_dir}")
        m = read_mask(by_stem[f.stem])
        if size is not None and m.shape != (size, size):
            raise UserError(f"{by_stem[f.stem]}: mask is {m.shape[1]}x{m.shape[0]}, the images are {size}x{size}")
        masks.append(m)
    return torch.from_numpy(np.stack(masks))


def _relative(path: Path, root: str | os.PathLike) -> str:
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path.name
