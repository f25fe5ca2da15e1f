"""The paper's method on tiny models: extract -> train-head -> guided sample, and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli as run
from conftest import expect_ok as ok
from conftest import expect_user_error as user_error
from ddguide.core import artifacts
from ddguide.core.model import denoiser, load_model, save_model
from ddguide.method.features import FeatureSpec, compute, load_features
from ddguide.method.guidance import Guide, head_guidance, log_likelihood
from ddguide.method.heads import load_head


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_path):
    """16 px images: left half red or blue (label 1 = red), masks = the red region, and a features file."""
    root = tmp_path_factory.mktemp("method")
    images, masks = root / "images", root / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,red"]
    for i in range(24):
        red = i % 2
        img = np.zeros((16, 16, 3), np.uint8) + rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        if red:
            img[:, :8, 0], mask[:, :8] = 220, 1
        else:
            img[:, :8, 2] = 220
        Image.fromarray(img).save(images / f"im{i:03d}.png")
        Image.fromarray(mask).save(masks / f"im{i:03d}.png")
        rows.append(f"im{i:03d}.png,{red}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    feats = root / "f.safetensors"
    ok(run("extract", images, "--model", tiny_model_path, "--blocks", "mid", "--blocks", "out.1",
           "--timesteps", 100, "--timesteps", 500, "--labels", root / "labels.csv", "--label", "red",
           "--out", feats, "--device", "cpu", "--batch", 5, "--precision", "fp32"))
    head = root / "h.safetensors"
    ok(run("train-head", feats, "--out", head, "--steps", 60))
    return root


def test_features_are_stored_at_native_resolution(workdir, tiny_model_path):
    f = load_features(workdir / "f.safetensors")
    model = load_model(tiny_model_path)
    assert f.spec == FeatureSpec(("mid", "out.1"), (100, 500))
    assert f.taps["feat.mid@100"].shape == (24, model.net.block_channels("mid"), 8, 8)
    assert f.taps["feat.out.1@500"].shape[-1] == 16 // model.net.block_downsampling("out.1")
    assert f.labels.tolist() == [i % 2 for i in range(24)]
    assert f.fingerprint == model.fingerprint and f.meta.count == 24 and f.meta.images_hash


def test_extracted_taps_equal_a_direct_pass(workdir, tiny_model_path):
    f = load_features(workdir / "f.safetensors")
    model = load_model(tiny_model_path)
    x = f.images[:3].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        direct = compute(model, x, f.spec, range(3))
        single = model.features(x, torch.full((3,), 500), ["out.1"])["out.1"]
    assert torch.allclose(direct["feat.mid@100"], f.taps["feat.mid@100"][:3], atol=1e-5)
    assert torch.allclose(direct["feat.out.1@500"], single, atol=1e-5)  # batched timesteps == separate pass


def test_extract_streams_one_batch_at_a_time(workdir, tiny_model_path, tmp_path, monkeypatch):
    rows = []
    original = artifacts.StreamingWriter.write

    def spy(self, name, start, values):
        if name.startswith("feat."):
            rows.append(len(values))
        return original(self, name, start, values)

    monkeypatch.setattr(artifacts.StreamingWriter, "write", spy)
    ok(run("extract", workdir / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10,
           "--out", tmp_path / "g.safetensors", "--device", "cpu", "--batch", 4, "--storage", "fp16"))
    assert max(rows) == 4 and sum(rows) == 24
    assert load_features(tmp_path / "g.safetensors").meta.storage == "fp16"


def test_fixed_noise_is_deterministic_and_differs_from_clean(tiny_model_path):
    model = load_model(tiny_model_path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    clean = compute(model, x, FeatureSpec(("mid",), (500,), "none"), [0, 1])
    a = compute(model, x, FeatureSpec(("mid",), (500,), "fixed", 3), [0, 1])
    b = compute(model, x, FeatureSpec(("mid",), (500,), "fixed", 3), [0, 1])
    assert torch.equal(a["feat.mid@500"], b["feat.mid@500"])
    assert not torch.allclose(a["feat.mid@500"], clean["feat.mid@500"])


def test_head_records_what_it_needs(workdir, tiny_model_path):
    head = load_head(workdir / "h.safetensors")
    assert head.cfg.kind == "classifier" and head.cfg.classes == ["0", "1"]
    assert head.spec == FeatureSpec(("mid", "out.1"), (100, 500))
    assert head.fingerprint == load_model(tiny_model_path).fingerprint
    assert head.cfg.temperature > 0 and "val_accuracy" in head.cfg.metrics


def test_x0_mode_gradient_is_the_chain_rule(workdir, tiny_model_path):
    """eps_hat = eps - lambda sqrt(1-abar) d log p / d x0 / sqrt(abar) with eps held constant."""
    model = load_model(tiny_model_path).requires_grad_(False)
    head = load_head(workdir / "h.safetensors")
    guides = [Guide(head, 1.0, 1)]
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 300)
    lam = 0.7
    eps_hat = head_guidance(denoiser(model), model, guides, lam, [0, 1], grad="x0")(x, t).eps
    with torch.no_grad():
        eps = model(x, t)
    a = model.abar[300].float()
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1).requires_grad_(True)
    logp, _ = log_likelihood(model, guides, x0, [0, 1])
    (g,) = torch.autograd.grad(logp.sum(), x0)
    assert torch.allclose(eps_hat, eps - lam * (1 - a).sqrt() * g / a.sqrt(), atol=1e-5)


def test_full_mode_differentiates_through_the_denoiser(workdir, tiny_model_path):
    model = load_model(tiny_model_path).requires_grad_(False)
    guides = [Guide(load_head(workdir / "h.safetensors"), 1.0, 1)]
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 300)
    base = denoiser(model)
    full = head_guidance(base, model, guides, 1.0, [0, 1], grad="full")(x, t).eps
    x0 = head_guidance(base, model, guides, 1.0, [0, 1], grad="x0")(x, t).eps
    plain = head_guidance(base, model, guides, 0.0, [0, 1])(x, t).eps
    assert not torch.allclose(full, x0) and not torch.allclose(full, plain)
    outside = head_guidance(base, model, guides, 5.0, [0, 1], window=(200, 0))(x, t).eps  # t=300 outside the window
    assert torch.allclose(outside, plain, atol=1e-6)


@pytest.mark.parametrize("grad", ["full", "x0"])
def test_guidance_with_lambda_0_is_its_inner_denoiser(workdir, tiny_model_path, grad):
    model = load_model(tiny_model_path).requires_grad_(False)
    guides = [Guide(load_head(workdir / "h.safetensors"), 1.0, 1)]
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.full((2,), 300)
    base = denoiser(model)
    inner = lambda x_, t_: base(x_, t_)  # noqa: E731
    assert torch.equal(head_guidance(inner, model, guides, 0.0, [0, 1], grad=grad)(x, t).eps, inner(x, t).eps)


def test_guided_sampling_raises_the_head_probability(workdir, tiny_model_path, tmp_path):
    common = ("--model", tiny_model_path, "-n", 4, "--steps", 8, "--device", "cpu", "--batch", 4)
    ok(run("sample", *common, "--guide", workdir / "h.safetensors", "--target", 1, "--lambda", 0,
           "--out", tmp_path / "u"))
    ok(run("sample", *common, "--guide", workdir / "h.safetensors", "--target", 1, "--lambda", 30,
           "--out", tmp_path / "g"))
    prob = lambda d: np.mean([float(r.split(",")[-1]) for r in (d / "index.csv").read_text().splitlines()[1:]])  # noqa: E731
    assert prob(tmp_path / "g") > prob(tmp_path / "u")


def test_segmentation_pipeline(workdir, tiny_model_path, tmp_path):
    feats, head = tmp_path / "fm.safetensors", tmp_path / "hs.safetensors"
    ok(run("extract", workdir / "images", "--model", tiny_model_path, "--blocks", "out.1", "--blocks", "out.3",
           "--timesteps", 500, "--masks", workdir / "masks", "--out", feats, "--device", "cpu"))
    r = ok(run("train-head", feats, "--kind", "segmentation", "--out", head, "--steps", 60))
    assert "val_miou" in r.output
    ok(run("sample", "--model", tiny_model_path, "--guide", head, "--mask", workdir / "masks" / "im001.png",
           "--lambda", "0.01", "-n", 2, "--steps", 4, "--device", "cpu", "--out", tmp_path / "s"))
    assert len((tmp_path / "s" / "index.csv").read_text().splitlines()) == 3
    # the DDIM-I baseline for masks: a fully convolutional head on pixels, guided the same way
    ok(run("train-head", feats, "--kind", "pixel", "--out", tmp_path / "px.safetensors", "--steps", 20))
    assert load_head(tmp_path / "px.safetensors").cfg.dense
    ok(run("sample", "--model", tiny_model_path, "--guide", tmp_path / "px.safetensors", "--mask",
           workdir / "masks" / "im001.png", "--lambda", "0.01", "-n", 1, "--steps", 3, "--device", "cpu",
           "--out", tmp_path / "p"))


def test_pixel_and_rejection_heads_train(workdir, tmp_path):
    for kind in ("pixel", "rejection"):
        ok(run("train-head", workdir / "f.safetensors", "--kind", kind, "--out", tmp_path / f"{kind}.safetensors",
               "--steps", 20))
    assert load_head(tmp_path / "pixel.safetensors").reads_pixels
    assert load_head(tmp_path / "rejection.safetensors").cfg.normalize


# ------------------------------------------------------------------------------------------- bad input


def test_head_from_another_model_is_refused(workdir, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny

    other = tmp_path / "other.safetensors"
    save_model(other, build_tiny(seed=1))
    out = tmp_path / "o"
    head = workdir / "h.safetensors"
    user_error(run("sample", "--model", other, "--guide", head, "--target", 1, "--out", out, "--device", "cpu"),
               f"{head} was made from model", f"but {other} is model")
    user_error(run("sample", "--guide", head, "--target", 1, "--out", out, "--device", "cpu"),
               f"{head} was made from model", "but the shipped model is model")
    assert not out.exists()


def test_bad_guidance_inputs(workdir, tiny_model_path, tmp_path):
    head, out = workdir / "h.safetensors", tmp_path / "o"
    base = ("sample", "--model", tiny_model_path, "--out", out, "--device", "cpu", "--guide", head)
    user_error(run(*base, "--target", "blond"), "not among the head's classes")
    user_error(run(*base, "--target", 1, "--lambda", -1), "--lambda must be >= 0")
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(big)
    seg = tmp_path / "seg.safetensors"
    ok(run("extract", workdir / "images", "--model", tiny_model_path, "--blocks", "out.3", "--timesteps", 500,
           "--masks", workdir / "masks", "--out", tmp_path / "fm.safetensors", "--device", "cpu"))
    ok(run("train-head", tmp_path / "fm.safetensors", "--kind", "segmentation", "--out", seg, "--steps", 5))
    seg_base = ("sample", "--model", tiny_model_path, "--out", out, "--device", "cpu", "--guide", seg)
    user_error(run(*seg_base, "--mask", big), "expects 16x16")
    unknown = tmp_path / "unknown.png"
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(unknown)
    user_error(run(*seg_base, "--mask", unknown), "outside the head's")
    assert not out.exists()


def test_features_the_head_does_not_expect(workdir, tmp_path):
    user_error(run("train-head", workdir / "f.safetensors", "--timesteps", 999, "--out", tmp_path / "x.safetensors"),
               "feat.mid@999")
    assert not (tmp_path / "x.safetensors").exists()


def test_nan_features_are_refused(workdir, tmp_path):
    art = artifacts.load(workdir / "f.safetensors", "features")
    art.tensors["feat.mid@100"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    artifacts.save(bad, art.tensors, kind="features", config=art.config, fingerprint=art.fingerprint)
    user_error(run("train-head", bad, "--out", tmp_path / "h.safetensors"), "NaN")
    assert not (tmp_path / "h.safetensors").exists()


def test_extract_bad_inputs(workdir, tiny_model_path, tmp_path):
    base = ("extract", workdir / "images", "--model", tiny_model_path, "--out", tmp_path / "f.safetensors",
            "--device", "cpu")
    user_error(run(*base, "--blocks", "out.99"), "unknown block")
    user_error(run(*base, "--timesteps", 5000), "outside the model's")
    user_error(run(*base, "--noise", "gaussian"), "unknown noise mode")
    user_error(run(*base, "--labels", workdir / "labels.csv", "--label", "blond"), "no attribute 'blond'")
    assert not (tmp_path / "f.safetensors").exists()
