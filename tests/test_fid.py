"""FID: the distance against closed forms and pytorch-fid's formula, the FID Inception's layout and outputs,
streaming statistics, stats files, input resolution and the errors users see."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy import linalg

from conftest import expect_user_error
from ddguide.core.errors import UserError
from ddguide.metrics import fid, inception
from ddguide.metrics.fid import FeatureExtractor, FidConfig, FidStats, compute_stats, frechet_distance, run_fid

DATA = Path(__file__).parent / "data"
MANIFEST = json.loads((DATA / "pytorch_fid_inception_manifest.json").read_text())


# --- helpers --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _quiet_sqrtm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        yield


def reference_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, with sqrtm called without the removed ``disp``."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("imaginary component")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


class PixelFeatures(FeatureExtractor):
    """A cheap stand-in feature space: 2x2 average-pooled pixels (12-d)."""

    name, dim, fingerprint, config = "test-pixels", 12, "pixels", {}

    def __call__(self, x):
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


def write_images(folder: Path, n: int, seed: int, size: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Well-scaled random weights in the layout of pt_inception-2015-12-05 (He-normal convs, random BN)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in MANIFEST.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("conv.weight") or key == "fc.weight":
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def random_inception():
    net = inception.FIDInceptionV3()
    net.load_state_dict(random_inception_state())
    return net.eval()


@pytest.fixture(scope="module")
def random_weights_file(tmp_path_factory, random_inception):
    path = tmp_path_factory.mktemp("weights") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in random_inception.state_dict().items()}, str(path))
    return path


def random_gaussian(rng, d, n=None):
    x = rng.normal(size=(n or 4 * d, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


# --- the distance ---------------------------------------------------------------------------------

def test_identical_statistics_give_zero():
    mu, sigma = random_gaussian(np.random.default_rng(0), 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # The same Gaussians in a rotated basis: the distance is invariant.
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("d, n", [(16, 200), (64, 40)])  # well-conditioned, and rank-deficient (n < d)
def test_agrees_with_pytorch_fid_formula(d, n):
    rng = np.random.default_rng(d)
    mu1, s1 = random_gaussian(rng, d, n)
    mu2, s2 = random_gaussian(rng, d, n)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(reference_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)


def test_singular_product_is_regularised_like_pytorch_fid():
    # A nilpotent product has no square root (sqrtm gives inf): both add eps to the diagonals and retry.
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    mu = np.zeros(2)
    assert not np.isfinite(fid._sqrtm(s1 @ s2)).all()
    expected = reference_frechet_distance(mu, s1, mu, s2)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("d, n", [(128, 1000), (256, 250), (256, 2000)])  # full rank, singular (rank 249), full
def test_symmetric_form_agrees_with_sqrtm_to_8_digits(d, n):
    # The symmetric-form trace replaces scipy's sqrtm; the distances agree to >= 8 significant digits.
    rng = np.random.default_rng(d + n)
    mu1, s1 = random_gaussian(rng, d, n)
    mu2, s2 = random_gaussian(rng, d, n)
    assert fid._trace_sqrt_product(s1, s2) is not None  # the fast path is the one tested
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_frechet_distance(mu1, s1, mu2, s2),
                                                                rel=1e-8)


@pytest.mark.parametrize("d, n", [(64, 40), (256, 100)])
def test_symmetric_form_is_exact_on_rank_deficient_covariances(d, n):
    # With n < d samples, Tr (S1 S2)^(1/2) is the nuclear norm of C1 C2^T / (n - 1) (C: centred samples),
    # an exact reference: the symmetric form meets it to ~1e-14; sqrtm is off by ~1e-8 (so only 1e-7 against it).
    rng = np.random.default_rng(d)
    x1, x2 = (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) for _ in range(2))
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    nuclear = np.linalg.svd((x1 - mu1) @ (x2 - mu2).T / (n - 1), compute_uv=False).sum()
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_frechet_distance(mu1, s1, mu2, s2),
                                                                rel=1e-7)


def test_non_finite_symmetric_trace_is_regularised_and_retried(monkeypatch):
    # pytorch-fid's retry: a non-finite root is computed again with eps on both diagonals.
    mu1, s1 = random_gaussian(np.random.default_rng(3), 8)
    mu2, s2 = random_gaussian(np.random.default_rng(4), 8)
    real, calls = fid._trace_sqrt_product, []

    def first_fails(a, b):
        calls.append(a.copy())
        return float("nan") if len(calls) == 1 else real(a, b)

    monkeypatch.setattr(fid, "_trace_sqrt_product", first_fails)
    got = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    assert len(calls) == 2 and np.allclose(calls[1] - s1, np.eye(8) * 1e-3)
    offset = np.eye(8) * 1e-3
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * real(s1 + offset, s2 + offset)
    assert got == pytest.approx(expected, rel=1e-12)


def test_indefinite_input_takes_pytorch_fids_general_path():
    # Not a covariance (a clearly negative eigenvalue): the symmetric form declines and sqrtm's steps apply.
    s1, s2 = np.diag([1.0, -1.0]), np.eye(2)
    assert fid._trace_sqrt_product(s1, s2) is None
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), s1, np.zeros(2), s2)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- streaming statistics -------------------------------------------------------------------------

def test_streaming_statistics_equal_numpy():
    x = torch.rand(23, 3, 8, 8) * 2 - 1
    ext = PixelFeatures()
    stats = compute_stats(x, ext, batch=5)
    feats = ext(x).double().numpy()
    assert stats.n == 23 and stats.dim == 12
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-14)


def test_file_order_does_not_matter(tmp_path):
    files = write_images(tmp_path / "imgs", 9, seed=0)
    # The same images listed in reverse order by a sample index.
    (tmp_path / "imgs" / "index.csv").write_text("file,seed\n" + "".join(f"{p.name},{i}\n"
                                                                          for i, p in enumerate(reversed(files))))
    forward = compute_stats(files, PixelFeatures(), batch=4)
    backward = compute_stats(fid.resolve_source(tmp_path / "imgs").files, PixelFeatures(), batch=2)
    np.testing.assert_allclose(forward.mu, backward.mu, rtol=1e-12)
    np.testing.assert_allclose(forward.sigma, backward.sigma, rtol=1e-9, atol=1e-15)
    assert abs(frechet_distance(forward.mu, forward.sigma, backward.mu, backward.sigma)) < 1e-9


def test_mixed_image_sizes_in_one_batch(tmp_path):
    files = write_images(tmp_path / "a", 3, seed=1, size=16) + write_images(tmp_path / "b", 3, seed=2, size=24)
    stats = compute_stats(files, PixelFeatures(), batch=6)
    assert stats.n == 6


def test_stats_roundtrip(tmp_path):
    mu, sigma = random_gaussian(np.random.default_rng(3), 5)
    stats = FidStats(mu=mu, sigma=sigma, n=20, feature_space="test-pixels", fingerprint="abc",
                     features={"k": 1}, source="somewhere")
    back = fid.load_stats(fid.save_stats(tmp_path / "s.safetensors", stats))
    assert back.mu.dtype == np.float64 and np.array_equal(back.mu, mu) and np.array_equal(back.sigma, sigma)
    assert (back.n, back.feature_space, back.fingerprint, back.features) == (20, "test-pixels", "abc", {"k": 1})


def test_pytorch_fid_npz_stats_are_read(tmp_path):
    mu, sigma = random_gaussian(np.random.default_rng(4), 2048, n=50)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    stats = fid.load_stats(tmp_path / "ref.npz")
    assert stats.feature_space == fid.INCEPTION_SPACE and stats.dim == 2048


# --- the FID Inception ----------------------------------------------------------------------------

def test_inception_state_dict_matches_pytorch_fid_weight_file():
    state = inception.FIDInceptionV3().state_dict()
    assert list(state) == list(MANIFEST)
    assert {k: list(v.shape) for k, v in state.items()} == MANIFEST


def test_random_inception_matches_pytorch_fid_outputs(random_inception):
    """Regression numbers from pytorch-fid 0.3.0's InceptionV3([3]) (torchvision 0.29) loaded with the same
    random weights, fed the same images in [0, 1]: a different pooling, padding or resize moves them."""
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        feats = random_inception(x).double()  # (2, 2048)
    assert feats.shape == (2, 2048)
    w = torch.cos(torch.arange(2048, dtype=torch.float64) * 0.37)
    idx = [3, 4, 5, 100, 500, 1000, 1500, 2047]
    close = dict(rel=1e-5, abs=1e-5)
    assert feats.sum(1).tolist() == pytest.approx([1871.3516116741448, 1869.468156871484], **close)
    assert feats.norm(dim=1).tolist() == pytest.approx([68.67071538662572, 68.5896711322321], **close)
    assert (feats * w).sum(1).tolist() == pytest.approx([-39.36216241394148, -40.62355058596005], **close)
    assert (feats[0] - feats[1]).norm().item() == pytest.approx(1.5390923247398087, **close)
    assert feats[0, idx].tolist() == pytest.approx(
        [3.7213475704193115, 2.7468514442443848, 2.643300771713257, 0.894784688949585, 0.0, 0.0,
         0.3102925419807434, 4.2279791831970215], **close)
    assert feats[1, idx].tolist() == pytest.approx(
        [3.747642993927002, 2.7539243698120117, 2.52742862701416, 0.9162992835044861, 0.0,
         0.00022130220895633101, 0.35297155380249023, 4.16011381149292], **close)


def test_weights_load_from_pth_and_safetensors(tmp_path, random_inception, random_weights_file):
    pth = tmp_path / inception.WEIGHTS_FILE
    torch.save(random_inception.state_dict(), pth)
    for path in (pth, random_weights_file):
        net = inception.load_inception(path)
        assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, random_inception.Mixed_7c.branch_pool.conv.weight)


def test_weights_search_order(tmp_path, monkeypatch, random_weights_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    assert inception.find_weights() is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    assert inception.hub_weights_path() == cached
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert inception.find_weights() == cached
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(random_weights_file))
    assert inception.find_weights() == random_weights_file
    assert inception.find_weights(cached) == cached


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError, match="checkpoints/pt_inception-2015-12-05-6726825d.pth") as err:
        inception.require_weights()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        inception.require_weights(tmp_path / "nope.pth")
    write_images(tmp_path / "a", 2, seed=0)
    with pytest.raises(UserError, match="Inception weights not found"):
        run_fid(FidConfig(a=str(tmp_path / "a"), b=str(tmp_path / "a"), features="inception"))


def test_wrong_weights_name_the_differences(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError) as err:
        inception.load_inception(path)
    msg = str(err.value)
    assert "missing" in msg and "head.weight" in msg and "(32, 3, 5, 5)" in msg and "\n" not in msg
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable weight file"):
        inception.load_inception(tmp_path / "garbage.pth")


# --- the stage ------------------------------------------------------------------------------------

def test_run_fid_with_inception_and_reused_stats(tmp_path, monkeypatch, random_weights_file):
    a, b = tmp_path / "a", tmp_path / "b"
    write_images(a, 3, seed=0)
    write_images(b, 2, seed=1, size=20)
    stats_path = tmp_path / "a.safetensors"
    cfg = FidConfig(a=str(a), features="auto", inception_weights=str(random_weights_file), batch=2,
                    device="cpu", save_stats=str(stats_path))
    calls = []
    first = run_fid(cfg, progress=lambda label, done, total: calls.append((label, done, total)))
    assert first.fid is None and first.saved == stats_path and "inception" in first.note
    assert first.feature_space == fid.INCEPTION_SPACE and first.a.dim == 2048 and first.a.n == 3
    assert calls == [(str(a), 2, 3), (str(a), 3, 3)]
    # Saved statistics stand in for the folder. (A 2048-d matrix square root takes tens of seconds on a
    # small CPU; the distance itself is tested above, here only what reaches it.)
    seen = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: seen.append(args) or 1.5)
    again = run_fid(FidConfig(a=str(stats_path), b=str(b), inception_weights=str(random_weights_file)))
    assert again.fid == 1.5 and again.b.n == 2 and again.b.fingerprint == first.a.fingerprint
    mu1, sigma1, mu2, sigma2 = seen[0]
    assert np.array_equal(mu1, first.a.mu) and np.array_equal(sigma1, first.a.sigma)
    assert np.array_equal(mu2, again.b.mu) and sigma2.shape == (2048, 2048)


def test_different_feature_spaces_are_refused(tmp_path):
    mu, sigma = random_gaussian(np.random.default_rng(5), 4)
    fid.save_stats(tmp_path / "x.safetensors", FidStats(mu, sigma, 16, "denoiser-mid-t100", "m1"))
    fid.save_stats(tmp_path / "y.safetensors", FidStats(mu, sigma, 16, "denoiser-mid-t300", "m1"))
    fid.save_stats(tmp_path / "z.safetensors", FidStats(mu, sigma, 16, "denoiser-mid-t100", "m2"))
    with pytest.raises(UserError, match="different feature spaces"):
        run_fid(FidConfig(a=str(tmp_path / "x.safetensors"), b=str(tmp_path / "y.safetensors")))
    with pytest.raises(UserError, match="different networks"):
        run_fid(FidConfig(a=str(tmp_path / "x.safetensors"), b=str(tmp_path / "z.safetensors")))
    with pytest.raises(UserError, match="not comparable"):
        run_fid(FidConfig(a=str(tmp_path / "x.safetensors"), b=str(tmp_path / "x.safetensors"),
                          features="inception"))
    assert run_fid(FidConfig(a=str(tmp_path / "x.safetensors"), b=str(tmp_path / "x.safetensors"))).fid == \
        pytest.approx(0, abs=1e-9)


def tiny_model():
    from ddguide.core.model import Model
    from ddguide.core.presets import get_preset
    from ddguide.core.unet import UNetModel

    torch.manual_seed(0)
    preset = get_preset("tiny")  # 16x16 images, mid block of 16 channels
    return Model(UNetModel(preset.unet), preset.diffusion, fingerprint="tinyfp")


def test_denoiser_features_pool_the_mid_block():
    model = tiny_model()
    ext = fid.DenoiserFeatures(model, "cpu", timestep=100)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        feats = ext(x)
        expected = model.features(x, torch.full((3,), 100), ["mid"])["mid"].mean(dim=(2, 3))
        other_t = fid.DenoiserFeatures(model, "cpu", timestep=800)(x)
    assert (ext.dim, ext.input_size, ext.name, ext.fingerprint) == (16, 16, "denoiser-mid-t100", "tinyfp")
    assert ext.config["noise"] == "none" and feats.shape == (3, 16)
    torch.testing.assert_close(feats, expected)
    assert not torch.allclose(feats, other_t)


def test_auto_falls_back_to_denoiser_features(tmp_path, monkeypatch):
    from ddguide.core.model import save_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    model_path = tmp_path / "tiny.safetensors"
    fingerprint = save_model(model_path, tiny_model())
    write_images(tmp_path / "a", 4, seed=0)
    write_images(tmp_path / "b", 4, seed=1)
    write_images(tmp_path / "big", 2, seed=1, size=32)
    cfg = FidConfig(a=str(tmp_path / "a"), b=str(tmp_path / "b"), model=str(model_path), device="cpu",
                    save_stats=str(tmp_path / "s.safetensors"))
    result = run_fid(cfg)
    assert result.feature_space == "denoiser-mid-t100" and "no Inception weights" in result.note
    assert result.fid > 0 and result.a.dim == 16
    saved = fid.load_stats(tmp_path / "s.safetensors")
    assert saved.fingerprint == fingerprint and saved.features["timestep"] == 100
    # Images compared with saved denoiser statistics reuse their T_f; a wrong image size is refused.
    cfg = FidConfig(a=str(tmp_path / "s.safetensors"), b=str(tmp_path / "a"), model=str(model_path),
                    timestep=500, device="cpu")
    assert run_fid(cfg).b.feature_space == "denoiser-mid-t100"
    with pytest.raises(UserError, match="expected 16x16"):
        run_fid(FidConfig(a=str(tmp_path / "big"), b=str(tmp_path / "a"), model=str(model_path), device="cpu"))
    resized = run_fid(FidConfig(a=str(tmp_path / "big"), b=str(tmp_path / "a"), model=str(model_path),
                                device="cpu", resize="resize"))
    assert resized.a.n == 2


# --- bad input ------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "one", 1, seed=0)
    write_images(tmp_path / "broken", 2, seed=0)
    (tmp_path / "broken" / "001.png").write_bytes(b"not an image")
    (tmp_path / "bad_index").mkdir()
    (tmp_path / "bad_index" / "index.csv").write_text("file\nmissing.png\n")
    cases = {
        "empty": "holds no images",
        "one": "at least 2 images",
        "broken": "not a readable image",
        "bad_index": "missing file",
        "nowhere": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            stats = fid.resolve_source(tmp_path / name)
            compute_stats(stats.files, PixelFeatures(), label=name)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--save-stats"):
        run_fid(FidConfig(a=str(tmp_path / "one")))


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddguide.cli import app
    from ddguide.core.model import save_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "one", 1, seed=0)
    write_images(tmp_path / "two", 2, seed=0)
    write_images(tmp_path / "broken", 2, seed=0)
    (tmp_path / "broken" / "000.png").write_bytes(b"\x89PNG garbage")
    model = tmp_path / "tiny.safetensors"
    save_model(model, tiny_model())
    runner = CliRunner()
    cases = [
        (["fid", str(tmp_path / "empty"), str(tmp_path / "two")], "holds no images"),
        (["fid", str(tmp_path / "one"), str(tmp_path / "two"), "--features", "denoiser"], "at least 2 images"),
        (["fid", str(tmp_path / "broken"), str(tmp_path / "two"), "--model", str(model)], "not a readable"),
        (["fid", str(tmp_path / "two"), str(tmp_path / "two"), "--features", "inception"], "hub/checkpoints"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        expect_user_error(result, message)
        assert result.output.startswith("error:"), result.output


def test_cli_denoiser_fid_and_saved_stats(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddguide.cli import app
    from ddguide.core.model import save_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    model_path = tmp_path / "tiny.safetensors"
    save_model(model_path, tiny_model())
    write_images(tmp_path / "a", 3, seed=0)
    write_images(tmp_path / "b", 3, seed=1)
    runner = CliRunner()
    stats = tmp_path / "a.safetensors"
    saved = runner.invoke(app, ["fid", str(tmp_path / "a"), "--model", str(model_path), "--save-stats", str(stats),
                                "--device", "cpu"])
    assert saved.exit_code == 0, saved.output
    result = runner.invoke(app, ["fid", str(stats), str(tmp_path / "b"), "--model", str(model_path)])
    assert result.exit_code == 0, result.output
    assert "FID" not in result.stdout and "no Inception weights" not in result.stdout  # not an FID: named by
    assert "Fréchet distance (denoiser-mid-t100 features) " in result.stdout  # the features it was computed on
    direct = run_fid(FidConfig(a=str(tmp_path / "a"), b=str(tmp_path / "b"), model=str(model_path), device="cpu"))
    assert float(result.stdout.split("features) ")[1].split()[0]) == pytest.approx(direct.fid, abs=1e-4)
