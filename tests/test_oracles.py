"""The shapes oracles on held-out real images, perturbed images and images they must reject."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ddguide.shapes import dataset as shapes
from ddguide.shapes import oracles
from ddguide.shapes.dataset import ShapesConfig

N = 200


@pytest.fixture(scope="module")
def held_out():
    """Images, masks, attributes and classes of a split and seed the oracles were not tuned on."""
    cfg = ShapesConfig(n=N, seed=2024, split="test")
    samples = [shapes.sample(cfg, i) for i in range(N)]
    images = np.stack([s[0] for s in samples])
    masks = np.stack([s[1] for s in samples]).astype(np.int64)
    attrs = [shapes.scene_attributes(s[2], cfg.size) for s in samples]
    labels = {name: np.array([a[name] for a in attrs]) for name in shapes.ATTRIBUTES}
    classes = np.array([shapes.scene_class(s[2]) for s in samples])
    return images, masks, labels, classes


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="nearest")
    return np.rint(out).clip(0, 255).astype(np.uint8)


def _perturb(images: np.ndarray) -> np.ndarray:
    """What slightly imperfect samples look like: blur of sigma 0.5 px, then noise of std 8/255."""
    noise = np.random.default_rng(0).normal(0, 8, images.shape)
    return np.rint(_blur(images, 0.5) + noise).clip(0, 255).astype(np.uint8)


def _check_accuracy(images, masks, labels, classes, at_least: float, valid_at_least: float) -> None:
    predicted = oracles.predict_attributes(images)
    for name in shapes.ATTRIBUTES:
        assert np.mean(predicted[name] == labels[name]) >= at_least, name
    assert np.mean(oracles.predict_classes(images) == classes) >= at_least
    assert oracles.miou(oracles.predict_masks(images), masks, len(shapes.MASK_CLASSES)) >= 0.95
    assert oracles.is_valid(images).mean() >= valid_at_least


def test_oracles_read_real_images(held_out):
    _check_accuracy(*held_out, at_least=0.99, valid_at_least=0.99)


def test_oracles_tolerate_slight_noise_and_blur(held_out):
    images, *rest = held_out
    _check_accuracy(_perturb(images), *rest, at_least=0.97, valid_at_least=0.95)


def test_is_valid_rejects_noise_blur_and_foreign_colours(held_out):
    images = held_out[0][:50]
    rng = np.random.default_rng(1)
    assert not oracles.is_valid(rng.integers(0, 256, images.shape, dtype=np.uint8)).any()
    assert not oracles.is_valid(_blur(images, 1.5)).any()
    blobbed = images.copy()
    for im, colour in zip(blobbed, rng.choice([(255, 140, 0), (160, 40, 200), (240, 240, 240)], len(images))):
        y, x = rng.integers(0, 27, size=2)
        im[y:y + 5, x:x + 5] = colour
    assert not oracles.is_valid(blobbed).any()


def _scene(*objects: shapes.Shape) -> np.ndarray:
    return shapes.render(shapes.Scene(background=0, gradient_axis=0, gradient=0, objects=objects), 32)[0][None]


def test_is_valid_follows_the_scene_rules():
    square, circle = shapes.MASK_CLASSES.index("square"), shapes.MASK_CLASSES.index("circle")
    assert oracles.is_valid(_scene(shapes.Shape(square, 0, 14, 4, 4), shapes.Shape(circle, 1, 9, 20, 20))).all()
    broken = {
        "touches the border": _scene(shapes.Shape(square, 0, 14, 4, 0)),
        "objects touch": _scene(shapes.Shape(square, 0, 14, 4, 4), shapes.Shape(circle, 1, 9, 6, 18)),
        "no main object": _scene(shapes.Shape(square, 0, 12, 2, 2), shapes.Shape(circle, 1, 12, 18, 18)),
        "too small": _scene(shapes.Shape(square, 0, 4, 4, 4)),
        "four objects": _scene(*(shapes.Shape(circle, 2, 10 if k else 13, 2 + 16 * (k // 2), 2 + 16 * (k % 2))
                                 for k in range(4))),
        "background only": _scene(),
    }
    for why, image in broken.items():
        assert not oracles.is_valid(image).any(), why
    # the rule each scene breaks is named
    named = {"touches the border": "touching", "objects touch": "touching", "no main object": "no main object",
             "too small": "object size", "four objects": "object count", "background only": "object count"}
    for why, rule in named.items():
        assert rule in oracles.rejection_reasons(broken[why][0]), (why, oracles.rejection_reasons(broken[why][0]))
    assert oracles.rejection_reasons(_scene(shapes.Shape(square, 0, 14, 4, 4))[0]) == []


def _painted(shape: int, height: int, width: int) -> np.ndarray:
    """A one-object scene whose object is the template stretched to (height, width) at (9, 9)."""
    image = _scene()[0].copy()
    image[9:9 + height, 9:9 + width][shapes.shape_mask(shape, height, width)] = list(shapes.PALETTE.values())[0]
    return image


def test_a_box_one_pixel_off_square_is_matched_stretched():
    for shape in range(1, len(shapes.MASK_CLASSES)):
        for height, width in ((13, 14), (12, 11), (9, 10)):
            (obj,) = oracles.read(_painted(shape, height, width)).objects
            assert obj.shape == shape and obj.iou == 1.0, (shape, height, width)
            assert oracles.rejection_reasons(_painted(shape, height, width)) == [], (shape, height, width)
    # further from square the data has no such object: a 9 x 14 box fits no template
    square = shapes.MASK_CLASSES.index("square")
    assert "shape fit" in oracles.rejection_reasons(_painted(square, 9, 14))


def test_outputs_have_documented_types(held_out):
    image = held_out[0][0]
    assert oracles.predict_masks(image).dtype == np.int64 and oracles.predict_masks(image).shape == (1, 32, 32)
    assert oracles.predict_classes(image).dtype == np.int64
    assert oracles.is_valid(image).dtype == bool
    assert all(v.dtype == bool and v.shape == (1,) for v in oracles.predict_attributes(image).values())
    with pytest.raises(ValueError):
        oracles.predict_classes(image.astype(np.float32))


def test_miou():
    target = np.array([[0, 0, 1, 1]])
    assert oracles.miou(target, target, 3) == 1.0
    # class 0: 1/2, class 1: 2/3 (class 2 is absent from both and not counted)
    assert oracles.miou(np.array([[0, 1, 1, 1]]), target, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
