"""Grey data: `train` makes a 1-channel model from grey images (or as `--channels` says), and every command that
reads or writes images for a model does so at the model's channel count (grey PNGs out of a 1-channel model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli, expect_ok, expect_user_error
from ddguide.core import artifacts

FAST = ("--preset", "tiny", "--steps", 3, "--batch", 4, "--preview", 0, "--precision", "fp32")


def _digits(folder, n: int = 8, seed: int = 0):
    """``n`` grey 8x8 strokes upscaled to 16 px, in two class folders (``a/`` vertical, ``b/`` horizontal)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.zeros((8, 8), np.uint8)
        k = int(rng.integers(1, 7))
        cls = "ab"[i % 2]
        if cls == "a":
            a[:, k] = 255
        else:
            a[k, :] = 200
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a, "L").resize((16, 16), Image.NEAREST).save(folder / cls / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    return _digits(tmp_path_factory.mktemp("grey") / "digits")


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colour") / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def grey_model(grey, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "grey.safetensors"
    r = expect_ok(cli("train", grey, "--out", out, *FAST, "--json"))
    assert json.loads(r.stdout.splitlines()[0])["channels"] == 1
    return out


def test_grey_images_train_a_one_channel_model(grey_model):
    unet = artifacts.describe(grey_model, "model").config["unet"]
    assert (unet["in_channels"], unet["out_channels"]) == (1, 1)


def test_rgb_files_without_colour_count_as_grey(grey, tmp_path):
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for f in sorted(grey.rglob("*.png"))[:4]:
        Image.open(f).convert("RGB").save(rgb / f.name)
    expect_ok(cli("train", rgb, "--out", tmp_path / "m.safetensors", *FAST))
    assert artifacts.describe(tmp_path / "m.safetensors").config["unet"]["in_channels"] == 1


def test_channels_3_trains_an_rgb_model_on_grey_images(grey, tmp_path):
    expect_ok(cli("train", grey, "--out", tmp_path / "m.safetensors", *FAST, "--channels", 3))
    assert artifacts.describe(tmp_path / "m.safetensors").config["unet"]["in_channels"] == 3


def test_a_one_channel_model_samples_grey_pngs(grey_model, tmp_path):
    expect_ok(cli("sample", "--model", grey_model, "-n", 3, "--steps", 2, "--out", tmp_path / "s"))
    for name in ("000000.png", "000002.png", "grid.png"):
        assert Image.open(tmp_path / "s" / name).mode == "L"


def test_extract_train_head_and_guided_sampling_on_grey_images(grey, grey_model, tmp_path):
    feats, head = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    expect_ok(cli("extract", grey, "--model", grey_model, "--blocks", "mid", "--timesteps", 100, "--out", feats))
    art = artifacts.load(feats, "features")
    assert tuple(art.tensors["images"].shape) == (8, 16, 16, 1)
    expect_ok(cli("train-head", feats, "--kind", "classifier", "--steps", 3, "--out", head))
    expect_ok(cli("sample", "--model", grey_model, "--guide", head, "--target", "a", "-n", 2, "--steps", 2,
                  "--out", tmp_path / "s"))
    assert Image.open(tmp_path / "s" / "000001.png").mode == "L"


def test_fid_reads_grey_images_at_the_models_channels(grey, grey_model):
    r = expect_ok(cli("fid", grey, grey, "--features", "denoiser", "--model", grey_model, "--precision", "fp32"))
    assert "denoiser" in r.output


def test_inception_features_take_grey_images_as_rgb(grey):
    import torch

    from ddguide.core.data import list_images
    from ddguide.metrics.fid import InceptionFeatures, compute_stats

    seen = []

    class Stub(torch.nn.Module):  # stands in for the Inception network: records what it is given
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            seen.append(tuple(x.shape))
            return x.mean(dim=(2, 3)) * self.w

    stats = compute_stats(list_images(grey), InceptionFeatures(network=Stub()))
    assert stats.n == 8 and seen[0][1] == 3


def test_finetune_a_one_channel_model_on_grey_classes(grey, grey_model, tmp_path):
    cond = tmp_path / "cond.safetensors"
    expect_ok(cli("finetune", grey, "--model", grey_model, "--out", cond, "--steps", 2, "--batch", 4,
                  "--precision", "fp32"))
    expect_ok(cli("sample", "--model", cond, "--class", "a", "--cfg", 0.1, "-n", 2, "--steps", 2,
                  "--out", tmp_path / "s"))
    assert Image.open(tmp_path / "s" / "000000.png").mode == "L"
    # the rejection filter reads the grey samples with the unconditional model's features
    feats, head = tmp_path / "f.safetensors", tmp_path / "rej.safetensors"
    expect_ok(cli("extract", grey, "--model", grey_model, "--out", feats))
    expect_ok(cli("train-head", feats, "--kind", "rejection", "--steps", 3, "--out", head))
    r = expect_ok(cli("filter", tmp_path / "s", "--head", head, "--model", grey_model, "--threshold", 0.0,
                      "--out", tmp_path / "kept"))
    assert "kept 2 of 2" in r.output and Image.open(tmp_path / "kept" / "grid.png").mode == "L"


def test_channels_1_on_colour_images_is_refused_and_writes_nothing(colour, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = cli("train", colour, "--out", out / "m.safetensors", *FAST, "--channels", 1)
    expect_user_error(r, "0.png: a colour image", "--channels")
    assert list(out.iterdir()) == []


def test_channels_other_than_1_or_3_are_refused(grey, tmp_path):
    expect_user_error(cli("train", grey, "--out", tmp_path / "m.safetensors", *FAST, "--channels", 2),
                      "--channels 2", "1 (grey) or 3 (RGB)")
    assert list(tmp_path.iterdir()) == []


def test_colour_images_for_a_one_channel_model_are_refused(colour, grey_model, tmp_path):
    r = cli("extract", colour, "--model", grey_model, "--blocks", "mid", "--out", tmp_path / "f.safetensors")
    expect_user_error(r, "0.png: a colour image", "1-channel")
    assert list(tmp_path.iterdir()) == []


def test_an_rgb_model_reads_grey_images_as_rgb(grey, tiny_model_path, tmp_path):
    feats = tmp_path / "f.safetensors"
    expect_ok(cli("extract", grey, "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 100, "--out", feats))
    images = artifacts.load(feats, "features").tensors["images"].numpy()
    assert images.shape == (8, 16, 16, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    expect_ok(cli("sample", "--model", tiny_model_path, "-n", 1, "--steps", 2, "--out", tmp_path / "s"))
    assert Image.open(tmp_path / "s" / "000000.png").mode == "RGB"
