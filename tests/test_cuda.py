"""Every command that takes --device, run on CUDA: skipped where none is present (CI runs on CPUs only).

DDGUIDE_TEST_DEVICE=cpu runs the same checks on the CPU, to check the tests themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli as run
from conftest import expect_ok as ok
from ddguide.core import artifacts
from ddguide.core.checkpoint import checkpoint_path

DEVICE = os.environ.get("DDGUIDE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two classes of 16 px images (left half red or blue), labels, masks of the red half."""
    root = tmp_path_factory.mktemp("cuda")
    rng = np.random.default_rng(0)
    rows = ["file,red"]
    for i in range(16):
        red = i % 2
        name = "red" if red else "blue"
        img = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        img[:, :8, 0 if red else 2] = 220
        mask[:, :8] = red
        for folder in (root / "images" / name, root / "masks" / name):
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / name / f"im{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / name / f"im{i:02d}.png")
        rows.append(f"{name}/im{i:02d}.png,{red}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), np.float64) for p in sorted(folder.glob("*.png"))
                     if p.name != "grid.png"])


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_samples_on_the_device_equal_those_on_the_cpu(tiny_model_path, tmp_path, sampler, eta):
    extra = ("--eta", eta) if eta is not None else ()
    for dev in ("cpu", DEVICE):
        ok(run("sample", "--model", tiny_model_path, "-n", 3, "--steps", 6, "--sampler", sampler, *extra,
               "--precision", "fp32", "--device", dev, "--out", tmp_path / dev))
    a, b = pngs(tmp_path / "cpu"), pngs(tmp_path / DEVICE)
    assert a.shape == b.shape == (3, 16, 16, 3)
    assert np.abs(a - b).mean() < 2.0  # the same seeds and noise: only float rounding differs (TF32 on GPUs)


def test_training_on_the_device_draws_its_noise_there_and_resumes_exactly(root, tmp_path):
    args = ["train", root / "images", "--preset", "tiny", "--batch", 4, "--checkpoint-every", 2, "--precision", "fp32",
            "--preview", 0, "--device", DEVICE]
    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    ok(run(*args, "--steps", 4, "--out", whole))
    ok(run(*args, "--steps", 2, "--out", resumed))
    ok(run(*args, "--steps", 4, "--out", resumed))  # continues from the checkpoint at step 2
    a, b = (artifacts.load(checkpoint_path(p)).tensors for p in (whole, resumed))
    assert a.keys() == b.keys() and ("rng.device" in a) == DEVICE.startswith("cuda")  # the default on CUDA
    for key in ("rng", "rng.device"):  # the same draws: the generators' states are restored exactly
        assert key not in a or torch.equal(a[key], b[key]), key
    assert len(b["losses"]) == 4 and torch.allclose(a["losses"], b["losses"], rtol=1e-3, atol=1e-6)
    for k in a:  # the same steps; only the GPU's nondeterministic reductions may differ
        if k.startswith(("model.", "ema.")):
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k


def test_the_method_on_the_device(root, tiny_model_path, tmp_path):
    feats, head = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    ok(run("extract", root / "images", "--model", tiny_model_path, "--blocks", "mid", "--blocks", "out.1",
           "--timesteps", 100, "--timesteps", 500, "--labels", root / "labels.csv", "--label", "red",
           "--out", feats, "--device", DEVICE, "--batch", 5))
    ok(run("train-head", feats, "--out", head, "--steps", 20))
    for grad in ("x0", "full"):
        ok(run("sample", "--model", tiny_model_path, "--guide", head, "--target", 1, "--lambda", 10,
               "--guide-grad", grad, "-n", 2, "--steps", 4, "--device", DEVICE, "--out", tmp_path / grad))
        assert len(pngs(tmp_path / grad)) == 2

    seg_feats, seg = tmp_path / "fm.safetensors", tmp_path / "seg.safetensors"
    ok(run("extract", root / "images", "--model", tiny_model_path, "--blocks", "out.1", "--timesteps", 500,
           "--masks", root / "masks", "--out", seg_feats, "--device", DEVICE))
    ok(run("train-head", seg_feats, "--kind", "segmentation", "--out", seg, "--steps", 20))
    ok(run("sample", "--model", tiny_model_path, "--guide", seg, "--mask", root / "masks" / "red" / "im01.png",
           "--lambda", 0.01, "-n", 2, "--steps", 4, "--device", DEVICE, "--out", tmp_path / "seg"))
    assert len(pngs(tmp_path / "seg")) == 2


def test_training_fine_tuning_and_rejection_on_the_device(root, tiny_model_path, tmp_path):
    out = tmp_path / "m.safetensors"
    ok(run("train", root / "images", "--out", out, "--preset", "tiny", "--steps", 4, "--batch", 4,
           "--checkpoint-every", 2, "--device", DEVICE))
    ok(run("train", root / "images", "--out", out, "--preset", "tiny", "--steps", 6, "--batch", 4,
           "--checkpoint-every", 2, "--device", DEVICE))  # resumes from step 4
    assert out.exists()

    cond = tmp_path / "cond.safetensors"
    ok(run("finetune", root / "images", "--model", tiny_model_path, "--out", cond, "--steps", 4, "--batch", 4,
           "--device", DEVICE))
    ok(run("sample", "--model", cond, "--class", "all", "--cfg", 1.0, "-n", 2, "--steps", 3,
           "--device", DEVICE, "--out", tmp_path / "cfg"))

    feats, rej = tmp_path / "r.safetensors", tmp_path / "rej.safetensors"
    ok(run("extract", root / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 300,
           "--out", feats, "--device", DEVICE))
    ok(run("train-head", feats, "--kind", "rejection", "--out", rej, "--steps", 10))
    ok(run("filter", tmp_path / "cfg", "--head", rej, "--model", tiny_model_path, "--threshold", 0.0,
           "--out", tmp_path / "kept", "--device", DEVICE))
    ok(run("cas", "--train", root / "images", "--test", root / "images", "--epochs", 1, "--batch", 8,
           "--milestones", 1, 1, "--out", tmp_path / "cas.safetensors", "--device", DEVICE))
    ok(run("fid", root / "images" / "red", root / "images" / "blue", "--features", "denoiser",
           "--model", tiny_model_path, "--device", DEVICE))
