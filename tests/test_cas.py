"""Classification Accuracy Score: the ResNet family, augmentation, training, resume and bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli as run
from conftest import expect_user_error as assert_user_error
from ddguide.core import artifacts
from ddguide.metrics.resnet import ARCHITECTURES, resnet18
from ddguide.stages.cas import CasConfig, cas, learning_rate, mixup_cutmix, random_flip

COLOURS = {"blue": (40, 90, 230), "red": (220, 40, 40)}


def write_images(folder: Path, colour, n: int, seed: int, size: int = 16) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        im = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(folder / f"{seed}_{i:03d}.png")
        names.append(f"{seed}_{i:03d}.png")
    return names


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    """A class-folder training set and a real test set of two flat noisy colours (16 px)."""
    root = tmp_path_factory.mktemp("cas")
    for k, (name, colour) in enumerate(COLOURS.items()):
        write_images(root / "train" / name, colour, 12, seed=k)
        write_images(root / "test" / name, colour, 4, seed=10 + k)
    return root / "train", root / "test"


def config(train, test: Path, out: Path, **kw) -> CasConfig:
    base = dict(epochs=2, batch=8, milestones=[1, 2], device="cpu")
    return CasConfig(train=[str(t) for t in train], test=str(test), out=str(out), **{**base, **kw})


# --- the networks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                         ("resnet50", 25_557_032), ("wide_resnet50_2", 68_883_240),
                                         ("resnext50_32x4d", 25_028_904)])
def test_parameter_counts_equal_torchvision(name, count):
    with torch.device("meta"):
        net = ARCHITECTURES[name](1000)
    assert sum(p.numel() for p in net.parameters()) == count


def test_small_input_stem():
    net = resnet18(10, small_input=True)
    assert net.conv1.weight.shape == (64, 3, 3, 3) and isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert {k for k in net.state_dict()} == {k for k in resnet18(10).state_dict()}


# --- augmentation and schedule ----------------------------------------------------------------------------------


def test_flip_and_mixing_keep_shapes_and_weights_in_range():
    x = torch.randn(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    flipped = random_flip(x, gen)
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(2)) for f, a in zip(flipped, x))
    for _ in range(10):
        mixed, perm, lam = mixup_cutmix(x, gen)
        assert mixed.shape == x.shape and sorted(perm.tolist()) == list(range(6)) and 0.0 <= lam <= 1.0


def test_step_decay_at_the_milestones():
    cfg = CasConfig(train=["a"], test="b", lr=1e-3, milestones=[20, 30])
    assert [round(learning_rate(cfg, e), 8) for e in (0, 19, 20, 29, 30, 39)] == [1e-3, 1e-3, 1e-4, 1e-4,
                                                                                    1e-5, 1e-5]


# --- the score --------------------------------------------------------------------------------------------------


def test_separable_classes_are_learned(sets, tmp_path):
    train, test = sets
    out = tmp_path / "report.safetensors"
    r = run("cas", "--train", train, "--test", test, "--epochs", 3, "--batch", 8, "--milestones", 5, 6,
            "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "top-1" in r.output and "class red" in r.output
    report = artifacts.load(out, "report")
    assert report.config["metrics"]["top1"] >= 0.9 and report.config["classes"] == ["blue", "red"]
    assert not (tmp_path / "report.ckpt.safetensors").exists()  # removed once the report is written
    assert report.tensors["per_class_accuracy"].shape == (2,) and report.tensors["epoch_loss"].shape == (3,)


def test_resume_after_a_kill_gives_the_same_classifier(sets, tmp_path):
    train, test = sets
    whole = cas(config([train], test, tmp_path / "a.safetensors", mixup_cutmix=0.5, keep_checkpoint=True))

    def kill_in_epoch_2(done, total, info):
        if info.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cas(config([train], test, tmp_path / "b.safetensors", mixup_cutmix=0.5), progress=kill_in_epoch_2)
    assert artifacts.load(tmp_path / "b.ckpt.safetensors", "checkpoint").config["step"] == 1
    seen = []
    resumed = cas(config([train], test, tmp_path / "b.safetensors", mixup_cutmix=0.5, keep_checkpoint=True),
                  progress=lambda d, t, info: seen.append(info))
    assert not any(info.startswith("epoch 1") for info in seen)
    assert resumed.epoch_losses[1] == whole.epoch_losses[1] and resumed.per_class == whole.per_class
    a, b = (artifacts.load(tmp_path / f"{x}.ckpt.safetensors", "checkpoint").tensors for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "adam.")))
    assert not any(k.startswith("ema.") for k in b)  # a classifier's checkpoint is saved with ema=None


def test_samples_folders_are_matched_by_class_name(sets, tmp_path):
    """Two samples folders (flat PNGs + index.csv, one class each) together train the classifier."""
    _, test = sets
    folders = []
    for k, (name, colour) in enumerate(COLOURS.items()):
        folder = tmp_path / f"samples_{name}"
        files = write_images(folder, colour, 8, seed=20 + k)
        with open(folder / "index.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "index", "seed", "class", "guidance"])
            writer.writerows([file, i, i, name, "cfg:0.01"] for i, file in enumerate(files))
        folders.append(folder)
    result = cas(config(folders, test, tmp_path / "r.safetensors", epochs=1))
    assert result.n_train == 16 and set(result.per_class) == {"blue", "red"}


# --- bad input: one line, exit 2 ----------------------------------------------------------------------------------


def test_an_empty_train_folder(sets, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run("cas", "--train", tmp_path / "empty", "--test", sets[1], "--out",
                          tmp_path / "r.safetensors", "--device", "cpu"), "holds no images")


def test_test_classes_missing_from_training(sets, tmp_path):
    for k, name in enumerate(("blue", "green")):
        write_images(tmp_path / "train" / name, (0, 200 * k, 0), 2, seed=k)
    assert_user_error(run("cas", "--train", tmp_path / "train", "--test", sets[1], "--out",
                          tmp_path / "r.safetensors", "--device", "cpu"), "missing from the training set", "red")


def test_an_unreadable_image(sets, tmp_path):
    train = tmp_path / "train"
    for k, (name, colour) in enumerate(COLOURS.items()):
        write_images(train / name, colour, 2, seed=k)
    (train / "red" / "broken.png").write_bytes(b"not a png")
    assert_user_error(run("cas", "--train", train, "--test", sets[1], "--out", tmp_path / "r.safetensors",
                          "--device", "cpu"), "broken.png", "not a readable image")


def test_an_unknown_architecture(sets, tmp_path):
    assert_user_error(run("cas", "--train", sets[0], "--test", sets[1], "--arch", "vgg16", "--device", "cpu",
                          "--out", tmp_path / "r.safetensors"), "vgg16", "resnet18")
