"""Guidance composes with classes, CFG and rejection: `sample --model COND --class C --cfg W --guide HEAD`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import build_tiny, cli, expect_ok, expect_user_error


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """A class-conditional model 'fine-tuned' from the tiny model, a head on the tiny model's features and one
    on the conditional model's own features."""
    from ddguide.core.model import load_model, save_model
    from ddguide.shapes.dataset import ShapesConfig, generate

    root = tmp_path_factory.mktemp("guided-cfg")
    data = generate(root / "data", ShapesConfig(n=12, size=16, seed=0))
    cond = build_tiny(seed=1, num_classes=4)
    cond.classes = ["a", "b", "c"]
    cond.info["finetuned_from"] = load_model(tiny_model_path).fingerprint
    save_model(root / "cond.safetensors", cond)
    for name, model in (("base", tiny_model_path), ("own", root / "cond.safetensors")):
        expect_ok(cli("extract", data / "images", "--model", model, "--blocks", "mid", "--timesteps", 300,
                      "--labels", data / "attributes.csv", "--label", "has_circle", "--device", "cpu",
                      "--out", root / f"f-{name}.safetensors"))
        expect_ok(cli("train-head", root / f"f-{name}.safetensors", "--steps", 20,
                      "--out", root / f"head-{name}.safetensors"))
    for k, png in enumerate(sorted((data / "images").rglob("*.png"))):  # three class folders named like cond's
        (root / "abc" / "abc"[k % 3]).mkdir(parents=True, exist_ok=True)
        (root / "abc" / "abc"[k % 3] / png.name).write_bytes(png.read_bytes())
    expect_ok(cli("extract", root / "abc", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 300,
                  "--timesteps", 800, "--device", "cpu", "--out", root / "f-rej.safetensors"))
    expect_ok(cli("train-head", root / "f-rej.safetensors", "--kind", "rejection", "--steps", 5,
                  "--out", root / "rej.safetensors"))
    return {"tiny": tiny_model_path, "cond": root / "cond.safetensors", "base": root / "head-base.safetensors",
            "own": root / "head-own.safetensors", "rej": root / "rej.safetensors"}


def sample(files, out: Path, *options) -> list[dict[str, str]]:
    expect_ok(cli("sample", "--model", files["cond"], "-n", 3, "--steps", 3, "--device", "cpu",
                  "--precision", "fp32", "--out", out, *options))
    return list(csv.DictReader(open(out / "index.csv")))


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


def test_guided_cfg_end_to_end(files, tmp_path):
    cfg = ("--class", "b", "--cfg", 2.0)
    plain = sample(files, tmp_path / "cfg", *cfg)
    guide = ("--guide", files["base"], "--guide-model", files["tiny"])
    zero = sample(files, tmp_path / "zero", *cfg, *guide, "--lambda", 0)
    guided = sample(files, tmp_path / "guided", *cfg, *guide, "--lambda", 5)
    assert np.array_equal(pixels(tmp_path / "zero"), pixels(tmp_path / "cfg"))  # lambda 0 under CFG is CFG
    assert not np.array_equal(pixels(tmp_path / "guided"), pixels(tmp_path / "cfg"))
    assert [r["class"] for r in guided] == ["b"] * 3 == [r["class"] for r in plain]
    assert guided[0]["guidance"] == "cfg:2.0+heads:lambda=5.0:full" and 0 <= float(guided[0]["head_prob"]) <= 1
    assert zero[0]["head_prob"] != "" and "head_prob" not in plain[0]


def test_a_head_on_the_conditional_models_own_features_needs_no_guide_model(files, tmp_path):
    rows = sample(files, tmp_path / "s", "--class", "all", "--guide", files["own"], "--guide-grad", "x0")
    assert [r["class"] for r in rows] == ["a", "b", "c"]


def test_a_head_of_the_model_it_was_fine_tuned_from_asks_for_guide_model(files, tmp_path):
    r = cli("sample", "--model", files["cond"], "--class", "a", "--guide", files["base"], "-n", 1, "--steps", 2,
            "--device", "cpu", "--out", tmp_path / "s")
    expect_user_error(r, "--guide-model", str(files["base"]))
    assert not (tmp_path / "s").exists()


def test_guidance_classes_and_rejection_in_one_run(files, tmp_path, monkeypatch):
    """Rejection is an accept test inside the same loop, so it composes with guidance: only draws that pass are
    kept, each class gets its quota, and the kept rows carry both the head and the rejection probabilities."""
    import torch

    from ddguide.method.rejection import Rejector

    verdicts = iter([0.9, 0.1] * 20)  # the rejection head's p for successive draws: every other one passes
    monkeypatch.setattr(Rejector, "probabilities",
                        lambda self, images, *_: torch.tensor([next(verdicts) for _ in range(len(images))]))
    rows = sample(files, tmp_path / "s", "--class", "a", "b", "--guide", files["own"], "--lambda", 1,
                  "--reject", files["rej"], "--reject-model", files["tiny"], "--threshold", 0.5, "--batch", 3)
    assert sorted(r["class"] for r in rows) == ["a", "a", "a", "b", "b", "b"]
    assert all(float(r["reject_prob"]) == 0.9 and r["head_prob"] for r in rows)
    # batches of 3 cycle a, b, a while both need images; even draws pass; draw 8 passed but a had its quota
    assert [int(r["index"]) for r in rows] == [0, 2, 4, 6, 10, 12]
    assert len(list((tmp_path / "s").glob("0*.png"))) == 6


def test_a_model_fine_tuned_from_the_shipped_one_is_guided_by_heads_on_the_shipped_features(tmp_path):
    """The README's pipeline: `finetune` from the shipped model, a head on the shipped model's features, then
    `sample --model cond --class C --cfg W --guide HEAD` with no --guide-model."""
    import dataclasses

    import torch

    from ddguide.core.model import Model, load_model, save_model
    from ddguide.core.unet import UNetModel
    from ddguide.shapes.dataset import ShapesConfig, generate

    shipped = load_model()
    net = UNetModel(dataclasses.replace(shipped.net.cfg, num_classes=3))
    net.load_state_dict({**shipped.net.state_dict(), "label_emb.weight": torch.zeros(3, net.label_emb.weight.shape[1])})
    cond = Model(net, shipped.diffusion, classes=["x", "y"], info={"finetuned_from": shipped.fingerprint})
    save_model(tmp_path / "cond.safetensors", cond)
    data = generate(tmp_path / "data", ShapesConfig(n=8, size=32, seed=0))
    expect_ok(cli("extract", data / "images", "--blocks", "mid", "--timesteps", 300, "--labels",
                  data / "attributes.csv", "--label", "has_red", "--device", "cpu", "--out", tmp_path / "f.safetensors"))
    expect_ok(cli("train-head", tmp_path / "f.safetensors", "--steps", 5, "--out", tmp_path / "h.safetensors"))
    expect_ok(cli("sample", "--model", tmp_path / "cond.safetensors", "--class", "y", "--cfg", 1, "--guide",
                  tmp_path / "h.safetensors", "--guide-grad", "x0", "-n", 1, "--steps", 2, "--device", "cpu",
                  "--out", tmp_path / "s"))
    row = next(csv.DictReader(open(tmp_path / "s" / "index.csv")))
    assert row["class"] == "y" and row["guidance"].startswith("cfg:1.0+heads:")
