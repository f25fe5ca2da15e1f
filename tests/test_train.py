"""`ddguide train` on a tiny model: artifact contents, resume after a kill, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ddguide.cli import app
from ddguide.core import artifacts
from ddguide.core.checkpoint import checkpoint_path
from ddguide.stages.train import TrainConfig, train, train_recipe
from ddguide.stages.training import Recipe, cpp_compiler_found


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def cfg(images, out, steps=6, init=None, **recipe):
    return TrainConfig(data=str(images), out=str(out), preset="tiny", init=init, device="cpu",
                       recipe=train_recipe(steps=steps, batch=4, checkpoint_every=2, precision="fp32", **recipe))


def test_training_writes_ema_weights_config_and_loss_curve(images, tmp_path):
    out = tmp_path / "m.safetensors"
    train(cfg(images, out))
    art = artifacts.load(out, "model")
    assert art.config["preset"] == "tiny" and art.config["trained_steps"] == 6
    assert art.config["train"]["batch"] == 4 and art.fingerprint == artifacts.fingerprint(art.tensors)
    assert (tmp_path / "m.loss.png").is_file() and checkpoint_path(out).is_file()


def test_a_killed_run_resumes_to_the_same_weights(images, tmp_path):
    whole, killed = tmp_path / "whole.safetensors", tmp_path / "killed.safetensors"
    train(cfg(images, whole))

    def kill_at_5(done, total, info):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(images, killed), progress=kill_at_5)
    assert not killed.exists()
    assert artifacts.load(checkpoint_path(killed), "checkpoint").config["step"] == 4
    steps = []
    train(cfg(images, killed), progress=lambda done, total, info: steps.append(done))
    assert steps == [5, 6]  # continued from the checkpoint at step 4
    a, b = artifacts.load(whole, "model").tensors, artifacts.load(killed, "model").tensors
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_checkpoint_of_another_run_is_refused(images, tmp_path):
    out = tmp_path / "m.safetensors"
    train(cfg(images, out))
    r = CliRunner().invoke(app, ["train", str(images), "--out", str(out), "--preset", "tiny", "--steps", "8",
                                 "--batch", "4", "--lr", "1e-3", "--device", "cpu"])
    assert r.exit_code == 2 and "different training run" in r.output


def test_init_starts_from_a_model(images, tmp_path):
    first = tmp_path / "first.safetensors"
    train(cfg(images, first))
    train(cfg(images, tmp_path / "second.safetensors", init=str(first)))
    assert artifacts.load(tmp_path / "second.safetensors", "model").config["train"]["init"] == str(first)


@pytest.mark.slow  # two minutes of compilation: run with `pytest -m slow`
@pytest.mark.skipif(not cpp_compiler_found(), reason="torch.compile on the CPU needs a C++ compiler")
def test_a_run_resumed_with_compile_trains_the_same_weights(images, tmp_path):
    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    train(cfg(images, whole))
    train(cfg(images, resumed, steps=4))  # a plain checkpoint at step 4, continued compiled from the CLI
    r = CliRunner().invoke(app, ["train", str(images), "--out", str(resumed), "--preset", "tiny", "--steps", "6",
                                 "--batch", "4", "--checkpoint-every", "2", "--precision", "fp32", "--device",
                                 "cpu", "--compile"])
    assert r.exit_code == 0, r.output
    art = artifacts.load(resumed, "model")
    assert art.config["trained_steps"] == 6 and art.config["train"]["compile"] is True
    assert "compile" not in cfg(images, whole, compile=True).identity()
    a, b = artifacts.load(whole, "model").tensors, art.tensors
    assert a.keys() == b.keys()  # no "_orig_mod." prefix
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_compile_without_a_cpp_compiler_is_one_line(images, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-cxx")
    one_line_error(_train_cli(images, tmp_path, "--compile"), "C++ compiler")


def test_compile_with_bf16_on_the_cpu_is_one_line(images, tmp_path):
    # the compiled bf16 backward gives the deeper U-Net blocks zero gradients on the CPU (torch 2.13)
    one_line_error(_train_cli(images, tmp_path, "--compile", "--precision", "bf16"), "--precision fp32")


def test_learning_rate_schedule():
    recipe = Recipe(steps=1000, batch=4, lr=1e-3, warmup=100, ema_decay=0.999, grad_clip=1.0, precision="fp32",
                    checkpoint_every=10)
    assert recipe.lr_at(0) == pytest.approx(1e-5) and recipe.lr_at(99) == recipe.lr_at(999) == 1e-3
    recipe.lr_final = 1e-4
    assert recipe.lr_at(99) == pytest.approx(1e-3)  # the decay starts where the warm-up ends
    assert recipe.lr_at(549) == pytest.approx(5.5e-4)  # half way down the cosine
    assert recipe.lr_at(999) == pytest.approx(1e-4)
    lrs = [recipe.lr_at(s) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_decaying_run_is_tied_to_its_step_count(images, tmp_path):
    out = tmp_path / "m.safetensors"
    plain = cfg(images, out)
    assert "lr_final" not in plain.identity() and "steps" not in plain.identity()  # older checkpoints resume
    train(cfg(images, out, lr_final=0.0))
    art = artifacts.load(out, "model")
    assert art.config["train"]["lr_final"] == 0.0
    r = CliRunner().invoke(app, ["train", str(images), "--out", str(out), "--preset", "tiny", "--steps", "8",
                                 "--batch", "4", "--lr-final", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "different training run" in r.output
    one_line_error(_train_cli(images, tmp_path, "--lr-final", "1"), "--lr-final")


def test_p2_weights_favour_the_noisy_steps():
    recipe = Recipe(steps=10, batch=4, lr=1e-3, warmup=0, ema_decay=0.999, grad_clip=1.0, precision="fp32",
                    checkpoint_every=10)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.0], dtype=torch.float64)
    t = torch.arange(5)
    assert recipe.loss_weights(t, abar) is None  # plain L_simple
    recipe.p2_gamma, recipe.p2_k = 1.0, 1.0
    w = recipe.loss_weights(t, abar)
    snr = abar / (1 - abar)
    assert torch.allclose(w.double(), 1 / (1 + snr), rtol=1e-6)
    assert w[2] == pytest.approx(0.5) and w[4] == pytest.approx(1.0)  # SNR 1 and 0
    assert all(a < b for a, b in zip(w, w[1:]))  # more noise, more weight
    recipe.p2_gamma, recipe.p2_k = 0.5, 2.0
    assert torch.allclose(recipe.loss_weights(t, abar).double(), (2 + snr) ** -0.5, rtol=1e-6)


def test_a_p2_run_is_its_own_run(images, tmp_path):
    plain, p2 = tmp_path / "plain.safetensors", tmp_path / "p2.safetensors"
    assert "p2_gamma" not in cfg(images, plain).identity()  # older checkpoints resume
    train(cfg(images, plain))
    train(cfg(images, p2, p2_gamma=1.0))
    art = artifacts.load(p2, "model")
    assert art.config["train"]["p2_gamma"] == 1.0 and art.config["train"]["p2_k"] == 1.0
    a, b = artifacts.load(plain, "model").tensors, art.tensors
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same batches and noise, other weights: other updates
    r = CliRunner().invoke(app, ["train", str(images), "--out", str(p2), "--preset", "tiny", "--steps", "8",
                                 "--batch", "4", "--device", "cpu"])
    assert r.exit_code == 2 and "different training run" in r.output
    one_line_error(_train_cli(images, tmp_path, "--p2-gamma", "-1"), "--p2-gamma")
    one_line_error(_train_cli(images, tmp_path, "--p2-gamma", "1", "--p2-k", "0"), "--p2-k")


def _train_cli(folder, tmp_path, *extra):
    return CliRunner().invoke(app, ["train", str(folder), "--out", str(tmp_path / "m.safetensors"), "--preset",
                                    "tiny", "--steps", "1", "--batch", "2", "--device", "cpu", *extra])


def one_line_error(r, fragment):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert fragment in r.output


def test_bad_training_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(_train_cli(empty, tmp_path), "holds no images")
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(broken / "a.png")
    (broken / "b.png").write_bytes((broken / "a.png").read_bytes()[:40])  # truncated
    one_line_error(_train_cli(broken, tmp_path), "not a readable image")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(mixed / "b.png")
    one_line_error(_train_cli(mixed, tmp_path), "--resize")
    assert not (tmp_path / "m.safetensors").exists()  # nothing written by the refused runs
    assert _train_cli(mixed, tmp_path, "--resize", "center-crop").exit_code == 0
    assert (tmp_path / "m.safetensors").is_file()

