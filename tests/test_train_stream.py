"""The device stream of `train` and `finetune` (t and noise drawn on the device, losses read every few steps),
run on the CPU with a CPU generator in the device's place: the same code CUDA runs by default."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import cli, expect_user_error, noise_images
from ddguide.core import artifacts
from ddguide.core.checkpoint import checkpoint_path
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.presets import PRESETS
from ddguide.core.unet import UNetModel
from ddguide.stages import train as train_stage
from ddguide.stages.finetune import FinetuneConfig, finetune, finetune_recipe
from ddguide.stages.train import TrainConfig, train, train_recipe
from ddguide.stages.training import Recipe, fit


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight 16 px images in two class folders."""
    return noise_images(tmp_path_factory.mktemp("stream") / "images", 8)


def cfg(images, out, stream=True, steps=6, **recipe):
    return TrainConfig(data=str(images), out=str(out), preset="tiny", device="cpu", preview=0,
                       recipe=train_recipe(steps=steps, batch=4, checkpoint_every=2, precision="fp32",
                                           device_stream=stream, **recipe))


def tensors(path) -> dict[str, torch.Tensor]:
    return artifacts.load(path).tensors


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_stream_run_resumes_bit_for_bit(images, tmp_path):
    whole, killed = tmp_path / "whole.safetensors", tmp_path / "killed.safetensors"
    train(cfg(images, whole, report_every=3))

    def stop_at_3(done, total, info):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(images, killed, report_every=3), progress=stop_at_3)
    assert not killed.exists() and artifacts.load(checkpoint_path(killed)).config["step"] == 2
    steps = []
    train(cfg(images, killed, report_every=3), progress=lambda done, total, info: steps.append(done))
    assert steps == [3, 4, 6]  # reports at the reads: every 3 steps and at each checkpoint
    assert same(tensors(whole), tensors(killed))
    ckpt_a, ckpt_b = tensors(checkpoint_path(whole)), tensors(checkpoint_path(killed))
    assert same(ckpt_a, ckpt_b) and "rng.device" in ckpt_a  # the device stream's state, saved and restored


def test_reading_the_losses_less_often_changes_nothing(images, tmp_path):
    every, rarely, host = (tmp_path / f"{n}.safetensors" for n in ("every", "rarely", "host"))
    train(cfg(images, every, report_every=1))
    train(cfg(images, rarely, report_every=50))
    train(cfg(images, host, stream=None))  # None: off on the CPU
    assert same(tensors(every), tensors(rarely))
    losses = tensors(checkpoint_path(rarely))["losses"]
    assert torch.equal(losses, tensors(checkpoint_path(every))["losses"])
    assert len(losses) == 6 and bool(torch.isfinite(losses).all())
    assert "rng.device" not in tensors(checkpoint_path(host))  # the host path's checkpoint, as before
    assert not same(tensors(host), tensors(every))  # other noise, other weights


def test_a_checkpoint_resumes_in_the_other_mode(images, tmp_path):
    for first, then in ((False, True), (True, False)):
        runs = [tmp_path / f"{first}-{then}-{i}.safetensors" for i in range(2)]
        for out in runs:
            train(cfg(images, out, stream=first, steps=4))
            train(cfg(images, out, stream=then, steps=6))
            assert artifacts.load(out).config["trained_steps"] == 6
            assert ("rng.device" in tensors(checkpoint_path(out))) == then
        assert same(tensors(runs[0]), tensors(runs[1]))  # still one fixed sequence


def test_a_finetune_stream_run_resumes_bit_for_bit(images, tiny_model_path, tmp_path):
    def run(out, steps):
        finetune(FinetuneConfig(data=str(images), out=str(out), model=str(tiny_model_path), device="cpu",
                                recipe=finetune_recipe(steps=steps, batch=4, checkpoint_every=2, precision="fp32",
                                                       device_stream=True)))

    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    run(whole, 4)
    run(resumed, 2)
    run(resumed, 4)
    assert same(tensors(whole), tensors(resumed))
    assert same(tensors(checkpoint_path(whole)), tensors(checkpoint_path(resumed)))


def test_a_nan_is_caught_at_the_next_read_naming_its_step(tmp_path):
    torch.manual_seed(0)
    net = UNetModel(PRESETS["tiny"].unet)
    pixels = torch.randint(0, 255, (6, 16, 16, 3), dtype=torch.uint8)
    recipe = Recipe(steps=8, batch=2, lr=1e-3, warmup=0, precision="fp32", checkpoint_every=2, report_every=50,
                    device_stream=True)

    def poison(ema, state):  # the weights break after the checkpoint at step 2: step 3's loss is NaN
        if state.step == 2:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))

    ckpt = tmp_path / "m.ckpt.safetensors"
    with pytest.raises(UserError, match="the loss is nan at step 3: .*nothing was written after the last checkpoint"):
        fit(net, DiffusionConfig(1000, "linear"), recipe, ckpt, {"run": 1}, torch.Generator().manual_seed(0),
            lambda: (pixels, None), torch.device("cpu"), on_checkpoint=poison)
    kept = artifacts.load(ckpt)
    assert kept.config["step"] == 2 and len(kept.tensors["losses"]) == 2  # found at step 4's read, before its save


def test_a_nan_loss_from_the_cli_is_one_line_and_keeps_the_checkpoint(images, tmp_path, monkeypatch):
    monkeypatch.setattr(train_stage, "TRAIN_RECIPE", replace(train_stage.TRAIN_RECIPE, device_stream=True))
    out = tmp_path / "m.safetensors"
    r = cli("train", images, "--out", out, "--preset", "tiny", "--steps", 6, "--batch", 4, "--checkpoint-every", 1,
            "--precision", "fp32", "--device", "cpu", "--preview", 0, "--lr", 1e30)
    expect_user_error(r, "the loss is", "at step 2", "--lr 1e+30")
    kept = artifacts.load(checkpoint_path(out))
    assert kept.config["step"] == 1 and "rng.device" in kept.tensors and not out.exists()
