"""Reading what users already have: image folders (flat or class sub-folders), label files and masks,
Tiny ImageNet's layout and ddguide sample indexes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddguide.core.errors import UserError

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


MAX_PIXELS = 2**26  # 8192 x 8192: larger images are refused before they are decoded


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """A decoded image, refused in one line when unreadable or larger than :data:`MAX_PIXELS` (checked from the
    header, before decoding: a few-KB PNG may claim 20000 x 20000 pixels)."""
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{path}: {what} is {w}x{h}, more than the {MAX_PIXELS:,} pixels ddguide reads")
            im.load()
            return im.copy() if im.mode not in ("P", "PA") else im.convert("RGBA" if "transparency" in im.info
                                                                           or im.mode == "PA" else "RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: {what} is larger than the {MAX_PIXELS:,} pixels ddguide reads") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise UserError(f"{path}: not a readable {what} ({e.__class__.__name__})") from None


def to_rgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """8-bit RGB from any mode PIL decodes: 16-bit grey is scaled (not clipped) to 8 bits, float images are refused."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UserError(f"{path}: {im.mode} image values outside 0..65535 (convert it to 8-bit RGB)")
        im = Image.fromarray((a >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        raise UserError(f"{path}: a floating-point image (convert it to 8-bit RGB)")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: image mode {im.mode} cannot be read as RGB ({e.__class__.__name__})") from None


def load_image(path: str | os.PathLike, size: int | None = None, resize: str = "refuse",
               channels: int = 3) -> np.ndarray:
    """An image as uint8 (H, W, channels): RGB for ``channels=3`` (grey repeated), grey for ``channels=1``.

    ``size`` asks for a square image of that side: ``resize='refuse'`` raises on any other size,
    ``'resize'`` resizes with bicubic filtering (``'center-crop'`` crops to a square first). A colour image read
    for a 1-channel model is refused in one line (its colour would be lost without a word).
    """
    path = Path(path)
    check_channels(channels)
    im = to_rgb(open_image(path), path)
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
        im = im.resize((size, size), Image.BICUBIC)  # per channel: a grey image stays grey
    rgb = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    if channels == 3:
        return rgb
    if not is_grey(rgb):
        raise UserError(f"{path}: a colour image, but the model reads 1-channel (grey) images")
    return rgb[..., :1].copy()  # (H, W, 1)


IMAGE_CHANNELS = (1, 3)  # grey or RGB: what a model reads and writes


def check_channels(channels: int, what: str = "channels") -> int:
    """``channels`` if a model can read images with that many (1 or 3), else one line."""
    if channels not in IMAGE_CHANNELS:
        raise UserError(f"{what} {channels}: images have 1 (grey) or 3 (RGB) channels")
    return channels


def is_grey(rgb: np.ndarray) -> bool:
    """Whether uint8 (..., H, W, 3) images hold no colour: R == G == B at every pixel."""
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def first_colour(images: np.ndarray) -> int | None:
    """The index of the first image of uint8 (N, H, W, 3) with colour in it, or None when all are grey."""
    colour = (images[..., 0] != images[..., 1]).any(axis=(1, 2)) | (images[..., 1] != images[..., 2]).any(axis=(1, 2))
    hits = np.flatnonzero(colour)
    return int(hits[0]) if len(hits) else None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) or (H, W, C) -> float32 (N, C, H, W) in [-1, 1] (C = 1 for grey, 3 for RGB)."""
    if images.ndim == 3:
        images = images[None]
    return pixels_to_unit(torch.from_numpy(np.ascontiguousarray(images)))


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) on any device -> float32 (N, C, H, W) in [-1, 1] on the same device."""
    return pixels.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
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
            raise UserError(f"{path}: row {row[0][:80]!r} has {len(row) - 1} values for {len(names)} attributes")
        cells = [v.strip() for v in row[1:]]
        if any(v not in ("0", "1", "-1", "+1") for v in cells):
            bad = next(v for v in cells if v not in ("0", "1", "-1", "+1"))
            raise UserError(f"{path}: row {row[0][:80]!r} holds {bad[:20]!r}; binary labels are 0/1 or -1/1")
        values[row[0].strip()] = [1 if v in ("1", "+1") else 0 for v in cells]
    if not values:
        raise UserError(f"{path}: holds no labels")
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


def labelled_files(files: list[Path], root: str | os.PathLike, table: str | os.PathLike) -> list[Path]:
    """The images of ``files`` that have a row in the attribute ``table`` (matched as :func:`attribute_labels`
    matches them), so a table may label a subset of a folder. A CSV row naming no image of the folder is refused
    (a typo or a file left behind); CelebA's ``list_attr_celeba.txt`` lists the whole dataset, and labels
    whichever of its images the folder holds."""
    _, values = read_attribute_table(table)
    by_name: dict[str, list[str]] = {}
    for key in values:
        by_name.setdefault(Path(key).name, []).append(key)
    kept, used = [], set()
    for f in files:
        keys = [k for k in (_relative(f, root), _relative(f, Path(table).parent)) if k in values]
        keys = keys or by_name.get(f.name, [])
        if keys:
            kept.append(f)
            used.update(keys)
    celeba = Path(table).read_text(encoding="utf-8", errors="replace").lstrip().split("\n", 1)[0].strip().isdigit()
    unused = [k for k in values if k not in used]
    if unused and not celeba:
        raise UserError(f"{table}: lists {len(unused)} file(s) not in {root}, e.g. {unused[0][:120]!r}")
    if not kept:
        raise UserError(f"{table}: labels none of the images in {root}")
    return kept


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask of class ids (H, W) from a PNG (palette or grey values are ids) or a ``.npy`` array."""
    path = Path(path)
    if path.suffix == ".npy":
        try:  # memory-mapped first: the header's shape and dtype are checked before anything is read
            mask = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"{path}: not a readable mask ({e.__class__.__name__})") from None
    else:
        im = open_image(path, "mask")
        mask = np.asarray(im if im.mode in ("L", "P", "I", "I;16", "1") else im.convert("L"))
    if mask.ndim != 2:
        raise UserError(f"{path}: a mask must be 2-D class ids, got shape {mask.shape}")
    if mask.size > MAX_PIXELS:
        raise UserError(f"{path}: mask has more than {MAX_PIXELS:,} pixels")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        values = np.asarray(mask)
        if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all() \
                or (values != np.round(values)).any():
            raise UserError(f"{path}: mask values must be whole class ids (found {mask.dtype} values)")
    mask = np.array(mask, dtype=np.int64)
    if mask.size and mask.min() < 0:
        raise UserError(f"{path}: mask ids must be >= 0 (found {int(mask.min())})")
    return mask


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


def inside(root: str | os.PathLike, name: str, source: str | os.PathLike) -> Path:
    """``root / name`` for a path read from a file (an index or annotation ``source``), refused in one line
    unless it is relative and stays inside ``root`` (links resolved)."""
    root = Path(root)
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"{source}: names {name[:120]!r}, which is not a path inside {root}")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{source}: names {name[:120]!r}, which leads outside {root}")
    return path


def _relative(path: Path, root: str | os.PathLike) -> str:
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path.name


# --- labelled image sets: class folders, Tiny ImageNet, sample indexes ----------------------------------------
#
# Every reader returns ``(files, labels, class_names)``: image paths, one class id per file (its position in
# ``class_names``) and the sorted class names. Consumers match classes of different sets by name.

Labelled = tuple[list[Path], list[int], list[str]]


def _image_files(folder: Path) -> list[Path]:
    """Images under ``folder`` (recursively), sorted; the same filter as :func:`list_images`, without raising."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not p.name.startswith(".") and p.name != "grid.png")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _require_folder(root: Path) -> None:
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{root}: is not a folder")


def class_folders(root: str | os.PathLike) -> Labelled:
    """``root/<class>/**/*.png`` (or ``root/images/<class>/...`` as ``ddguide data shapes`` writes it);
    classes are the sub-folder names in sorted order, as torchvision's ImageFolder numbers them."""
    root = Path(root)
    _require_folder(root)
    base = root / "images" if (root / "images").is_dir() and _subfolders(root / "images") else root
    classes = _subfolders(base)
    if not classes and not _image_files(root):
        raise UserError(f"{root}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if not classes:
        hint = " and its index.csv has no 'class' column" if (root / "index.csv").is_file() else ""
        raise UserError(f"{root}: no class sub-folders (expected {root}/<class>/*.png){hint}")
    files, labels, empty = [], [], []
    for label, folder in enumerate(classes):
        found = _image_files(folder)
        if not found:
            empty.append(folder.name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise UserError(f"{base}: class folder(s) without images: {', '.join(empty)}")
    return files, labels, [c.name for c in classes]


def folder_classes(files: list[Path], root: str | os.PathLike) -> tuple[list[int], list[str]] | None:
    """The class of each of ``files`` from the folders they lie in, or None when the folder has no class layout.

    Images in two or more sibling folders are classed by those folders (``data/<class>/*.png``); otherwise by
    the first folder below ``root`` (or below ``root/images``), so Tiny ImageNet's ``train/<wnid>/images/*.JPEG``
    is classed by its wnids. Classes are numbered in sorted order, as :func:`class_folders` numbers them."""
    root = Path(root)
    parents = sorted({f.parent for f in files})
    if len(parents) > 1 and all(p.parent == parents[0].parent for p in parents):
        names = [p.name for p in parents]
        return [names.index(f.parent.name) for f in files], names
    base = root / "images" if all(f.is_relative_to(root / "images") for f in files) else root
    tops = [f.relative_to(base).parts for f in files]
    if any(len(parts) < 2 for parts in tops):  # an image outside every class folder: no class layout
        return None
    names = sorted({parts[0] for parts in tops})
    if len(names) < 2:
        return None
    return [names.index(parts[0]) for parts in tops], names


def _tiny_imagenet_root(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val" / "val_annotations.txt").is_file()


def _wnids(root: Path) -> list[str] | None:
    """Tiny ImageNet's class ids from ``wnids.txt`` (sorted), or from the train folders, or None."""
    if (root / "wnids.txt").is_file():
        return sorted({line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip()})
    if (root / "train").is_dir():
        return [d.name for d in _subfolders(root / "train")]
    return None


def _tiny_imagenet_val(val: Path, class_names: list[str] | None) -> Labelled:
    """``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated ``file wnid box...``)."""
    annotations = val / "val_annotations.txt"
    try:
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{annotations}: unreadable ({e.__class__.__name__})") from None
    if not rows or any(len(r) < 2 for r in rows):
        raise UserError(f"{annotations}: expected tab-separated lines 'file<TAB>wnid...'")
    names = class_names or sorted({r[1] for r in rows})
    unknown = sorted({r[1] for r in rows} - set(names))
    if unknown:
        raise UserError(f"{annotations}: classes not in wnids.txt: {', '.join(unknown[:5])}")
    files = [inside(val / "images", r[0], annotations) for r in rows]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{annotations}: lists {len(missing)} missing file(s), e.g. {missing[0]}")
    ids = {name: i for i, name in enumerate(names)}
    return files, [ids[r[1]] for r in rows], names


def tiny_imagenet(root: str | os.PathLike, split: str = "train") -> Labelled:
    """Tiny ImageNet's own layout: ``train/<wnid>/images/*.JPEG`` and ``val/images`` + ``val_annotations.txt``.
    Both splits number the classes the same way (sorted wnids); the test split has no labels."""
    root = Path(root)
    _require_folder(root)
    if split == "train":
        return class_folders(root / "train")
    if split == "val":
        return _tiny_imagenet_val(root / "val", _wnids(root))
    raise UserError(f"Tiny ImageNet split {split!r} has no labels (use train or val)")


def indexed_images(root: str | os.PathLike) -> Labelled:
    """A folder with an ``index.csv`` holding ``file`` and ``class`` columns: ddguide samples or shapes data."""
    from ddguide.core.samples import read_samples

    rows = read_samples(root, require=("class",))
    names = sorted({r.values["class"] for r in rows})
    ids = {name: i for i, name in enumerate(names)}
    return [r.path for r in rows], [ids[r.values["class"]] for r in rows], names


def labelled_images(root: str | os.PathLike, split: str = "train") -> Labelled:
    """Any labelled image set, by its layout: an ``index.csv`` with a ``class`` column, Tiny ImageNet's root
    (``split`` picks train or val) or its ``val`` folder, else class sub-folders."""
    root = Path(root)
    _require_folder(root)
    from ddguide.core import samples

    if (root / samples.INDEX).is_file() and samples.has_column(root, "class"):
        return indexed_images(root)
    if _tiny_imagenet_root(root):
        return tiny_imagenet(root, split)
    if (root / "val_annotations.txt").is_file():  # Tiny ImageNet's val/ folder itself
        return _tiny_imagenet_val(root, _wnids(root.parent))
    return class_folders(root)


def load_images(files: list[Path], size: int, resize: str = "refuse",
                progress: Callable[[int, int], None] | None = None, channels: int = 3) -> np.ndarray:
    """Images as one uint8 array (N, size, size, channels), filled in place (no second copy of a large set); see
    :func:`load_image` for ``channels``. ``progress(done, total)`` is called every 1024 images only, so small sets
    that fail show no progress bar."""
    out = np.empty((len(files), size, size, check_channels(channels)), np.uint8)
    for i, f in enumerate(files):
        out[i] = load_image(f, size, resize, channels)
        if progress and (i + 1) % 1024 == 0:
            progress(i + 1, len(files))
    return out
