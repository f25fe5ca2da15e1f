"""Rejection with a head on the unconditional model's features: `filter` and `sample --reject`."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import cli as run
from conftest import expect_ok as ok
from conftest import expect_user_error as user_error


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_path):
    """Two classes of flat 16 px images, a rejection head on mid@300,800, a fine-tuned model and its samples."""
    root = tmp_path_factory.mktemp("filter")
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 40, 40)), ("blue", (40, 90, 230))):
        (root / "data" / name).mkdir(parents=True)
        for i in range(8):
            img = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "data" / name / f"{name}{i}.png")
    ok(run("extract", root / "data", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 300,
           "--timesteps", 800, "--out", root / "f.safetensors", "--device", "cpu"))
    ok(run("train-head", root / "f.safetensors", "--kind", "rejection", "--out", root / "rej.safetensors",
           "--steps", 20))
    ok(run("finetune", root / "data", "--model", tiny_model_path, "--out", root / "cond.safetensors",
           "--steps", 4, "--batch", 4, "--device", "cpu"))
    ok(run("sample", "--model", root / "cond.safetensors", "--class", "all", "--cfg", "0.01", "-n", 4,
           "--steps", 3, "--out", root / "samples", "--device", "cpu"))
    return root


def test_filter_keeps_what_passes_the_threshold(setup, tiny_model_path, tmp_path):
    r = ok(run("filter", setup / "samples", "--head", setup / "rej.safetensors", "--threshold", 0.0,
               "--model", tiny_model_path, "--out", tmp_path / "kept", "--device", "cpu"))
    assert "kept 4 of 4" in r.output and "acceptance per class" in r.output
    rows = list(csv.DictReader(open(tmp_path / "kept" / "index.csv")))
    assert len(rows) == 4 and all(0 <= float(row["reject_prob"]) <= 1 for row in rows)


def test_filter_bad_input(setup, tiny_model_path, tmp_path, monkeypatch):
    import torch

    from ddguide.method.rejection import Rejector

    base = ("filter", setup / "samples", "--head", setup / "rej.safetensors", "--model", tiny_model_path,
            "--out", tmp_path / "kept", "--device", "cpu")
    user_error(run(*base, "--threshold", 1.5), "--threshold must be in [0, 1]")
    monkeypatch.setattr(Rejector, "probabilities", lambda self, images, *_: torch.full((len(images),), 0.1))
    user_error(run(*base, "--threshold", 0.5), "nothing written")
    assert not (tmp_path / "kept").exists()
    user_error(run("filter", setup / "samples", "--head", setup / "f.safetensors", "--out", tmp_path / "k"),
               "'features'", "'head'")


def test_sample_with_rejection_reports_acceptance(setup, tiny_model_path, tmp_path):
    r = ok(run("sample", "--model", setup / "cond.safetensors", "--reject", setup / "rej.safetensors",
               "--threshold", 0.0, "--reject-model", tiny_model_path, "-n", 2, "--steps", 2, "--batch", 4,
               "--out", tmp_path / "r", "--device", "cpu"))
    assert "acceptance per class" in r.output
    rows = list(csv.DictReader(open(tmp_path / "r" / "index.csv")))
    assert sorted(row["class"] for row in rows) == ["blue", "blue", "red", "red"]


def test_rejection_head_of_another_model_is_refused(setup, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny
    from ddguide.core.model import save_model

    other = tmp_path / "other.safetensors"
    save_model(other, build_tiny(seed=3))
    head = setup / "rej.safetensors"
    user_error(run("filter", setup / "samples", "--head", head, "--model", other, "--out", tmp_path / "k",
                   "--device", "cpu"), f"{head} was made from model", f"but {other} is model")
    user_error(run("filter", setup / "samples", "--head", head, "--out", tmp_path / "k", "--device", "cpu"),
               f"{head} was made from model", "but the shipped model is model")
    assert not (tmp_path / "k").exists()


def test_filter_under_torchrun_equals_one_process(setup, tiny_model_path, tmp_path):
    from conftest import torchrun

    args = ("filter", setup / "samples", "--head", setup / "rej.safetensors", "--threshold", 0.3, "--model",
            tiny_model_path, "--batch", 1, "--device", "cpu")
    ok(run(*args, "--out", tmp_path / "one"))
    r = torchrun("-m", "ddguide", *args, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "one" / "index.csv").read_text() == (tmp_path / "two" / "index.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert r.stdout.count("kept") == 1  # one rank reports
