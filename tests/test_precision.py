"""--precision auto: bf16 autocast where the device has fast bf16, fp32 otherwise, and bf16 guided samples
within a stated tolerance of fp32 on the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ddguide.cli import app
from ddguide.core import runtime as models
from ddguide.core.errors import UserError
from ddguide.shapes import oracles
from ddguide.shapes.demo import DemoConfig, _read_images, run_demo
from ddguide.stages.sample import SampleConfig, sample

CPU = torch.device("cpu")
# bf16 against fp32, the same seeds, 8 guided DDIM samples of 10 steps on the shipped model: the mean absolute
# pixel difference (0-255) and the oracle's share with the guided attribute. Measured here: MAE 5.1, shares
# 0.375 / 0.5 (a sampler amplifies bf16's rounding over its steps; the images are the same scenes, and the
# shares differ by at most 2 of 8 images).
MAX_PIXEL_MAE = 10.0
MAX_SHARE_GAP = 0.25


def test_auto_is_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.setattr(models, "bf16_is_fast", lambda device: True)
    assert models.resolve_precision("auto", CPU) == "bf16"
    assert models.resolve_precision("auto", CPU, compile=True) == "fp32"  # compiled bf16 backward is wrong on CPU
    assert "bf16 autocast (auto" in models.describe_precision("auto", CPU)
    monkeypatch.setattr(models, "bf16_is_fast", lambda device: False)
    assert models.resolve_precision("auto", CPU) == "fp32"
    assert models.describe_precision("auto", CPU).startswith("precision: fp32 (auto: cpu lacks fast bf16")
    for explicit in ("fp32", "bf16"):
        assert models.resolve_precision(explicit, CPU) == explicit
    with pytest.raises(UserError, match="auto, fp32, bf16, fp16"):
        with models.autocast(CPU, "fp8"):
            pass


def test_autocast_auto_follows_the_device(monkeypatch):
    for fast, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "bf16_is_fast", lambda device, fast=fast: fast)
        with models.autocast(CPU, "auto"):
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        assert out.dtype == dtype


def test_sample_defaults_to_auto_and_says_which(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "bf16_is_fast", lambda device: True)
    r = CliRunner().invoke(app, ["sample", "--model", str(tiny_model_path), "--out", str(tmp_path / "s"), "-n", "1",
                                 "--steps", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "precision: bf16 autocast (auto" in r.output
    r = CliRunner().invoke(app, ["sample", "--model", str(tiny_model_path), "--out", str(tmp_path / "t"), "-n", "1",
                                 "--steps", "2", "--device", "cpu", "--precision", "fp32"])
    assert r.exit_code == 0 and "precision: fp32" in r.output


@pytest.mark.slow  # ~40 s alone, 100 s inside the suite on this shared 2-core CPU: `pytest -m slow`
@pytest.mark.skipif(not models.bf16_is_fast(CPU), reason="this CPU has no native bf16")
def test_bf16_guided_samples_stay_close_to_fp32(tmp_path):
    demo = run_demo(DemoConfig(out=str(tmp_path / "demo"), n=1, steps=1, labels=20, device="cpu",
                               precision="fp32"))
    cfg = DemoConfig(out="")
    images, shares = {}, {}
    for precision in ("fp32", "bf16"):
        sample(SampleConfig(out=str(tmp_path / precision), n=8, steps=10, seed=0, batch=8, device="cpu",
                            precision=precision, guides=[str(tmp_path / "demo" / "head.safetensors")], target="1",
                            lam=cfg.lam, guide_grad=cfg.grad))
        images[precision] = _read_images(tmp_path / precision, 8)
        shares[precision] = float(oracles.predict_attributes(images[precision])[demo.attribute].mean())
    mae = np.abs(images["fp32"].astype(np.float64) - images["bf16"]).mean()
    assert mae < MAX_PIXEL_MAE, mae
    assert abs(shares["fp32"] - shares["bf16"]) <= MAX_SHARE_GAP, shares
