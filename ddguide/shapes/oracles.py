"""Analytic oracles for the shapes domain: masks, attributes, classes and validity of (generated) images.

Each image is read the way the generator drew it (``ddguide.shapes.dataset``):

1. every pixel takes its nearest palette colour (4 object colours, 3 background tones); pixels far from
   all of them, and background pixels of another tone than the image's dominant one, are *foreign*;
2. the 8-connected components of each object colour are the objects (tiny ones are specks, also foreign);
3. each object's shape is the template (``shapes.shape_mask``) that best overlaps it (IoU), tried at the
   sides and corners its bounding box allows, and stretched to the box when the box is one pixel off
   square, so a pixel or two of noise on an edge changes nothing.

Labels then follow the generator's definitions: the main object is the widest one, the class is its
colour and shape. ``is_valid`` checks the rules every real image obeys (1-3 well-formed objects apart from
each other and the border, a main object that stands out, next to no foreign pixels) and that edges are
sharp, which rejects blurred blobs whatever their colours.

The oracles are exact on real images from 24 px up (tests and benchmarks use 32 px); at 16 px the
smallest objects are 4 px wide and circles, squares and diamonds can no longer be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ddguide.metrics.miou import miou  # noqa: F401  (oracles.miou: the mIoU the benchmarks report)
from ddguide.shapes import dataset as shapes

OBJECT_RGB = np.array(list(shapes.PALETTE.values()), np.float32)  # (4, 3)
BACKGROUND_RGB = np.array(list(shapes.BACKGROUNDS.values()), np.float32)  # (3, 3)
PALETTE_RGB = np.concatenate([OBJECT_RGB, BACKGROUND_RGB])  # (7, 3): object colours first
N_OBJECT = len(OBJECT_RGB)
COLOUR_TOL = 50.0  # RGB distance to the nearest palette colour beyond which a pixel is foreign
SPECK_AREA = 6  # components smaller than this are noise, not objects
MAX_FOREIGN = 0.06  # a valid image has at most this fraction of foreign pixels ...
MIN_EDGE_CONTRAST = 0.45  # ... edges at least this sharp (see _edge_contrast) ...
MIN_IOU = 0.8  # ... and every object overlaps its best template at least this much
MIN_IOU_LEAD = 0.08  # ... and clearly better than any other shape's template
_EIGHT = np.ones((3, 3), bool)


@dataclass
class DetectedObject:
    """A component of one object colour and what it looks like."""

    colour: int  # index into shapes.COLOURS
    shape: int  # mask id (shapes.MASK_CLASSES)
    pixels: np.ndarray  # (H, W) bool
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive)
    iou: float  # overlap with the best template
    lead: float  # best IoU minus the best IoU of another shape

    @property
    def poor_fit(self) -> bool:
        """Overlaps even its best template too little (validity rule "shape fit")."""
        return self.iou < MIN_IOU

    @property
    def ambiguous(self) -> bool:
        """Not clearly better matched by one shape than by another (validity rule "ambiguous shape")."""
        return self.lead < MIN_IOU_LEAD

    @property
    def side(self) -> int:
        y0, x0, y1, x1 = self.box
        return max(y1 - y0, x1 - x0)

    @property
    def centre(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.box
        return (y0 + y1) / 2, (x0 + x1) / 2


@dataclass
class Reading:
    """What the oracle sees in one image. ``objects`` are sorted widest first: objects[0] is the main one."""

    objects: list[DetectedObject]
    foreign: np.ndarray  # (H, W) bool: off-palette, stray background tone, or speck
    edge_contrast: float  # 1 for hard edges, lower the blurrier the image

    def mask(self) -> np.ndarray:
        out = np.zeros(self.foreign.shape, np.int64)
        for obj in self.objects:
            out[obj.pixels] = obj.shape
        return out


# --- public API ---------------------------------------------------------------------------------------


def read(image: np.ndarray) -> Reading:
    """Analyse one uint8 (H, W, 3) image."""
    rgb = image.astype(np.float32)
    dist = np.linalg.norm(rgb[:, :, None] - PALETTE_RGB, axis=-1)  # (H, W, 7)
    label = dist.argmin(-1)  # nearest palette entry: < N_OBJECT is an object colour
    foreign = dist.min(-1) > COLOUR_TOL
    background = label >= N_OBJECT
    if background.any():
        foreign |= background & (label != np.bincount(label[background]).argmax())
    objects = []
    for c in range(N_OBJECT):
        components, _ = ndimage.label(label == c, structure=_EIGHT)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            pixels = components == k
            if pixels.sum() < SPECK_AREA:
                foreign |= pixels
            else:
                objects.append(_recognise(c, pixels, box))
    objects.sort(key=lambda o: (o.side, o.pixels.sum()), reverse=True)
    return Reading(objects, foreign, _edge_contrast(rgb, label))


def _edge_contrast(rgb: np.ndarray, label: np.ndarray) -> float:
    """Mean colour step across object/background edges, as a fraction of the palette step (1 = sharp).

    A neighbouring pair of pixels labelled object and background differs by the full palette distance in
    a real image; blur spreads the step over several pixels, so the fraction falls (about 0.7 at a blur
    of sigma 0.5 px, 0.35 at 1 px, 0.2 at 1.5 px) whatever the objects' size or number.
    """
    steps, full = [], []
    for axis in (0, 1):
        a, b = np.moveaxis(rgb, axis, 0), np.moveaxis(label, axis, 0)
        edge = (b[1:] < N_OBJECT) != (b[:-1] < N_OBJECT)  # (H-1, W) or (W-1, H)
        steps.append(np.linalg.norm(a[1:][edge] - a[:-1][edge], axis=-1))
        full.append(np.linalg.norm(PALETTE_RGB[b[1:][edge]] - PALETTE_RGB[b[:-1][edge]], axis=-1))
    steps, full = np.concatenate(steps), np.concatenate(full)
    return float((steps / full).mean()) if steps.size else 1.0


def predict_masks(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> int64 (N, H, W) of shapes.MASK_CLASSES ids (0 = background)."""
    return np.stack([read(im).mask() for im in _batch(images)])


def predict_attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 3) -> {attribute: bool (N,)} for every name in shapes.ATTRIBUTES."""
    rows = [_attributes(read(im), im.shape[0]) for im in _batch(images)]
    return {name: np.array([row[name] for row in rows], bool) for name in shapes.ATTRIBUTES}


def predict_classes(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> int64 (N,) index into shapes.CLASS_NAMES; -1 where no object is seen."""
    return np.array([_class(read(im)) for im in _batch(images)], np.int64)


def is_valid(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> bool (N,): does each image look like a real image of the domain?"""
    return np.array([_valid(read(im), im.shape[0]) for im in _batch(images)], bool)


# --- reading one image --------------------------------------------------------------------------------


def _batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _recognise(colour: int, pixels: np.ndarray, box: tuple[slice, slice]) -> DetectedObject:
    """Match a component against every shape's template at the sides and corners its box allows, and against
    the box itself when it is one pixel off square."""
    y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
    fits = {(side, side, ty, tx) for side in {y1 - y0, x1 - x0} for ty in {y0, y1 - side} for tx in {x0, x1 - side}}
    if abs((y1 - y0) - (x1 - x0)) == 1:
        fits.add((y1 - y0, x1 - x0, y0, x0))
    best = np.zeros(len(shapes.MASK_CLASSES))
    for shape in range(1, len(shapes.MASK_CLASSES)):
        best[shape] = max(_iou_at(pixels, shape, *fit) for fit in fits)
    ranked = np.argsort(best)[::-1]
    return DetectedObject(colour, int(ranked[0]), pixels, (y0, x0, y1, x1),
                          float(best[ranked[0]]), float(best[ranked[0]] - best[ranked[1]]))


def _iou_at(pixels: np.ndarray, shape: int, height: int, width: int, ty: int, tx: int) -> float:
    """IoU of a component with a (height, width) template whose top-left corner is (ty, tx)."""
    template = np.zeros_like(pixels)
    window = template[max(ty, 0):ty + height, max(tx, 0):tx + width]
    mask = shapes.shape_mask(shape, height, width)
    window[...] = mask[max(-ty, 0):, max(-tx, 0):][:window.shape[0], :window.shape[1]]
    inter = np.count_nonzero(template & pixels)
    return inter / (np.count_nonzero(template) + np.count_nonzero(pixels) - inter)


# --- labels and validity ------------------------------------------------------------------------------


def _class(reading: Reading) -> int:
    if not reading.objects:
        return -1
    main = reading.objects[0]
    return shapes.CLASS_NAMES.index(f"{shapes.COLOURS[main.colour]}_{shapes.MASK_CLASSES[main.shape]}")


def _attributes(reading: Reading, size: int) -> dict[str, bool]:
    """The generator's attribute definitions (shapes.scene_attributes) applied to detected objects."""
    objs = reading.objects
    if not objs:
        return dict.fromkeys(shapes.ATTRIBUTES, False)
    cy, cx = objs[0].centre
    return {
        "has_red": any(shapes.COLOURS[o.colour] == "red" for o in objs),
        "has_circle": any(shapes.MASK_CLASSES[o.shape] == "circle" for o in objs),
        "multiple_objects": len(objs) > 1,
        "main_left": cx < size / 2,
        "main_top": cy < size / 2,
    }


def rejection_reasons(image: np.ndarray) -> list[str]:
    """Why ``is_valid`` rejects one uint8 (H, W, 3) image: the names of the broken rules (empty when valid)."""
    return _broken_rules(read(image), image.shape[0])


def _valid(reading: Reading, size: int) -> bool:
    return not _broken_rules(reading, size)


def _broken_rules(reading: Reading, size: int) -> list[str]:
    """The rules every real image obeys, with a little slack for imperfect samples, that this one breaks."""
    objs, foreign = reading.objects, reading.foreign
    lim = shapes.size_limits(size)
    rules = {
        "object count": not 1 <= len(objs) <= 3,
        "foreign pixels": foreign.mean() > MAX_FOREIGN,
        "blur": reading.edge_contrast < MIN_EDGE_CONTRAST,
        # a 3x3 blob of a colour the data never has
        "foreign blob": bool(ndimage.binary_opening(foreign, structure=_EIGHT).any()),
        "shape fit": any(o.poor_fit for o in objs),
        "ambiguous shape": any(o.ambiguous for o in objs),
        "object size": any(not lim.other_min - 1 <= o.side <= lim.main_max + 1 for o in objs),
        # the main object must stand out
        "no main object": len(objs) > 1 and objs[0].side - objs[1].side < lim.margin - 1,
        "touching": bool(objs) and not _apart(objs, size),
    }
    return [name for name, broken in rules.items() if broken]


def _apart(objs: list[DetectedObject], size: int) -> bool:
    """Objects keep off the border and do not touch each other (their boxes are >= 1 px apart)."""
    for i, a in enumerate(objs):
        ay0, ax0, ay1, ax1 = a.box
        if min(ay0, ax0) < 1 or max(ay1, ax1) > size - 1:
            return False
        for b in objs[i + 1:]:
            by0, bx0, by1, bx1 = b.box
            if not (ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0):
                return False
    return True
