"""The owner's own commands, as written: list options after one flag, `sample --guide HEAD --lambda 1`, and
what lambda, the target and the temperature mean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli as run
from conftest import expect_ok as ok
from conftest import expect_user_error
from ddguide.cli.args import expand_lists
from ddguide.core import artifacts
from ddguide.method.guidance import head_input
from ddguide.method.heads import load_head
from ddguide.shapes.dataset import ShapesConfig, generate
from ddguide.stages.train_head import calibrate_temperature, chance_warning


@pytest.fixture(scope="module")
def shapes_workdir(tmp_path_factory):
    """48 images of the built-in domain with their attribute table; a `heads/blond.safetensors` on the shipped
    model, trained from `extract DATA --timesteps 300 800` exactly as the owner types it."""
    root = tmp_path_factory.mktemp("owner")
    generate(root / "data", ShapesConfig(n=48, size=32, seed=3, split="val"))
    ok(run("extract", root / "data" / "images", "--labels", root / "data" / "attributes.csv", "--label", "has_red",
           "--timesteps", 300, 800, "--blocks", "mid", "--out", root / "feats.safetensors", "--device", "cpu"))
    (root / "heads").mkdir()
    ok(run("train-head", root / "feats.safetensors", "--kind", "classifier", "--out",
           root / "heads" / "blond.safetensors", "--steps", 30))
    return root


def test_several_values_after_one_flag_equal_the_repeated_form():
    names = {"--timesteps", "--blocks"}
    assert expand_lists(["--timesteps", "300", "800", "--blocks", "mid", "out.2"], names) == \
        ["--timesteps", "300", "--timesteps", "800", "--blocks", "mid", "--blocks", "out.2"]
    assert expand_lists(["--timesteps", "300", "--timesteps", "800"], names) == \
        ["--timesteps", "300", "--timesteps", "800"]
    assert expand_lists(["--timesteps=300", "800", "--out", "x"], names) == \
        ["--timesteps", "300", "--timesteps", "800", "--out", "x"]


def test_the_owners_extract_line_records_both_timesteps(shapes_workdir):
    meta = artifacts.load(shapes_workdir / "feats.safetensors", "features").config
    assert meta["spec"]["timesteps"] == [300, 800] and meta["spec"]["blocks"] == ["mid"]


def test_cas_and_train_head_take_lists_too(shapes_workdir, tmp_path):
    ok(run("train-head", shapes_workdir / "feats.safetensors", "--timesteps", 300, 800, "--blocks", "mid",
           "--out", tmp_path / "h.safetensors", "--steps", 2))
    r = run("cas", "--train", tmp_path / "a", tmp_path / "b", "--test", tmp_path / "t")
    expect_user_error(r, f"{tmp_path / 'a'}: no such folder")  # both folders parsed; the first is missing


@pytest.mark.parametrize("args, fragment", [
    (["--timesteps"], "--timesteps needs at least one value"),
    (["--timesteps", "--blocks", "mid"], "--timesteps needs at least one value"),
    (["--timesteps", "-5"], "must not be negative"),
    (["--timesteps", "300", "-5"], "No such option: -5"),
    (["--blocks", "auto", "mid"], "auto stands alone"),
])
def test_bad_list_values_are_one_line(tmp_path, args, fragment):
    r = subprocess.run([sys.executable, "-m", "ddguide", "extract", str(tmp_path), "--out", str(tmp_path / "f"),
                        *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr
    assert not (tmp_path / "f").exists()


def test_help_shows_the_list_form():
    r = run("extract", "--help")
    assert "T ..." in r.output and "BLOCK ..." in r.output


def test_sample_guide_lambda_1_as_written(shapes_workdir, monkeypatch):
    """`ddguide sample --guide heads/blond.safetensors --lambda 1`, word for word, in the folder holding heads/."""
    monkeypatch.chdir(shapes_workdir)
    ok(run("sample", "--guide", "heads/blond.safetensors", "--lambda", "1"))
    rows = (shapes_workdir / "samples" / "index.csv").read_text().splitlines()
    assert len(rows) == 17 and "head_prob" in rows[0]


def _images(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("0*.png"))]


def test_default_target_is_the_positive_class(shapes_workdir, tmp_path):
    head = shapes_workdir / "heads" / "blond.safetensors"
    base = ("sample", "--guide", head, "--lambda", 3, "-n", 2, "--steps", 3, "--device", "cpu")
    ok(run(*base, "--out", tmp_path / "default"))
    ok(run(*base, "--target", 1, "--out", tmp_path / "one"))
    ok(run(*base, "--target", "has_red", "--out", tmp_path / "label"))
    ok(run(*base, "--target", 0, "--out", tmp_path / "zero"))
    ok(run("sample", "--guide", f"{head}:1:0", "--lambda", 3, "-n", 2, "--steps", 3, "--out", tmp_path / "per-head"))
    assert _images(tmp_path / "default") == _images(tmp_path / "one") == _images(tmp_path / "label")
    assert _images(tmp_path / "zero") == _images(tmp_path / "per-head") != _images(tmp_path / "one")


def test_a_target_the_head_does_not_have(shapes_workdir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddguide", "sample", "--guide",
                        str(shapes_workdir / "heads" / "blond.safetensors"), "--target", "blond", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not among the head's classes (0, 1, or has_red for 1)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_temperature_changes_reported_probabilities_not_the_guidance(shapes_workdir, tmp_path):
    """lambda is the paper's: the calibrated temperature must not scale the guidance gradient."""
    src = shapes_workdir / "heads" / "blond.safetensors"
    art = artifacts.load(src, "head")
    hot = tmp_path / "hot.safetensors"
    artifacts.save(hot, art.tensors, kind="head", config={**art.config, "temperature": 0.05},
                   fingerprint=art.fingerprint)
    for name, head in (("plain", src), ("hot", hot)):
        ok(run("sample", "--guide", head, "--lambda", 3, "-n", 2, "--steps", 3, "--out", tmp_path / name))
    assert _images(tmp_path / "plain") == _images(tmp_path / "hot")
    probs = [(tmp_path / name / "index.csv").read_text().splitlines()[1] for name in ("plain", "hot")]
    assert probs[0] != probs[1]  # head_prob is calibrated


def test_temperature_fit_stays_inside_on_a_perfectly_separated_split():
    logits = torch.tensor([[4.0, -4.0]] * 10 + [[-4.0, 4.0]] * 10)
    y = torch.tensor([0] * 10 + [1] * 10)
    t = calibrate_temperature(logits, y)
    assert 0.1 < t < 1.5  # the old search fell to its bound, 0.03
    noisy = torch.cat([logits, torch.tensor([[4.0, -4.0]] * 5)])  # five confident mistakes: T grows
    assert calibrate_temperature(noisy, torch.cat([y, torch.ones(5, dtype=torch.long)])) > 2


def test_both_gradient_modes_pass_the_clamp_straight_through():
    x0 = torch.tensor([-3.0, -0.5, 0.5, 3.0], requires_grad=True)
    seen = head_input(x0)
    assert seen.tolist() == [-1.0, -0.5, 0.5, 1.0]
    (g,) = torch.autograd.grad((seen * torch.arange(1.0, 5.0)).sum(), x0)
    assert g.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_train_head_warns_near_chance(tmp_path, tiny_model_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,coin"]
    for i in range(50):  # labels that no image carries: 10 held out, enough for the warning to apply
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{int(rng.integers(0, 2))}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    ok(run("extract", images, "--model", tiny_model_path, "--labels", tmp_path / "l.csv", "--label", "coin",
           "--blocks", "mid", "--timesteps", 100, "--out", tmp_path / "f.safetensors", "--device", "cpu"))
    r = ok(run("train-head", tmp_path / "f.safetensors", "--out", tmp_path / "h.safetensors", "--steps", 20))
    metrics = load_head(tmp_path / "h.safetensors").cfg.metrics
    assert metrics["val_images"] == 10 and chance_warning(metrics)
    assert "less than half way from chance" in r.output
    assert chance_warning({"val_accuracy": 0.55, "val_chance": 0.5, "val_images": 20})
    assert chance_warning({"val_accuracy": 0.95, "val_chance": 0.5, "val_images": 20}) is None


def test_blocks_auto_picks_a_tap_set_and_prints_the_table(tmp_path, tiny_model_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["file,red"]
    for i in range(18):  # left half red (1) or blue (0)
        img = np.zeros((16, 16, 3), np.uint8)
        img[:, :8, 0 if i % 2 else 2] = 220
        Image.fromarray(img).save(images / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{i % 2}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "f.safetensors"
    r = ok(run("extract", images, "--model", tiny_model_path, "--labels", tmp_path / "l.csv", "--label", "red",
               "--blocks", "auto", "--timesteps", 100, 500, "--out", out, "--device", "cpu"))
    spec = artifacts.load(out, "features").config["spec"]
    assert f"chose --blocks {' '.join(spec['blocks'])} --timesteps {' '.join(map(str, spec['timesteps']))}" in r.output
    assert "held-out accuracy" in r.output and "mid" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors", "images", "l.csv"]  # no scratch left
    r = run("extract", images, "--model", tiny_model_path, "--blocks", "auto", "--out", tmp_path / "g.safetensors")
    expect_user_error(r, "needs labels")
