"""One shard rule for every stage that loops over images: `--shard 0/2` + `--shard 1/2` (joined by the last shard
or by `ddguide merge`) and two torchrun processes write what one process writes. Batch sizes are chosen so that
every shard's batches are batches of the single run too, which makes the images and tensors bitwise equal."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, expect_ok, expect_user_error, torchrun
from ddguide.core import artifacts
from ddguide.metrics.fid import load_stats


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight 16 px images, red and blue, in two class folders."""
    root = tmp_path_factory.mktemp("shards") / "images"
    rng = np.random.default_rng(0)
    for i in range(8):
        name, colour = ("red", (220, 40, 40)) if i % 2 else ("blue", (40, 90, 230))
        (root / name).mkdir(parents=True, exist_ok=True)
        img = np.clip(np.array(colour) + rng.integers(-60, 60, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / name / f"{name}{i}.png")
    return root


def same_files(a, b) -> None:
    """Two folders hold the same visible files, byte for byte."""
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith(".") and ".part" not in p.name)
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith(".") and ".part" not in p.name)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def sharded(*args, out, shards: int = 2):
    """Run ``ddguide ARGS --out OUT --shard i/n`` for every shard; the last one joins."""
    results = [expect_ok(cli(*args, "--out", out, "--shard", f"{i}/{shards}")) for i in range(shards)]
    return results


def flat(result) -> str:
    """A command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def same_features(a, b) -> None:
    x, y = artifacts.load(a, "features"), artifacts.load(b, "features")
    assert x.config == y.config and x.fingerprint == y.fingerprint and set(x.tensors) == set(y.tensors)
    for k in x.tensors:
        assert torch.equal(x.tensors[k], y.tensors[k]), k


# ------------------------------------------------------------------------------------------------ --shard I/N


@pytest.mark.parametrize("text, fragment", [("2/2", "0 <= i < n"), ("x", "expected i/n"), ("0/0", "n >= 1"),
                                            ("-1/2", "expected i/n")])
def test_a_bad_shard_is_one_line(text, fragment, tmp_path):
    expect_user_error(cli("sample", "--out", tmp_path / "s", "--shard", text), f"--shard {text}", fragment)
    assert not (tmp_path / "s").exists()


def test_shard_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expect_user_error(cli("extract", tmp_path, "--out", tmp_path / "f.safetensors", "--shard", "0/2"),
                      "torchrun", "one or the other")


def test_sample_shards_equal_one_process(tiny_model_path, tmp_path):
    base = ("sample", "--model", tiny_model_path, "-n", 6, "--steps", 3, "--batch", 3, "--device", "cpu")
    expect_ok(cli(*base, "--out", tmp_path / "one"))
    first, last = sharded(*base, out=tmp_path / "two")
    assert "the last shard joins" in flat(first) and "joined every shard" in flat(last)
    same_files(tmp_path / "one", tmp_path / "two")  # PNGs, index.csv and grid.png


def test_guided_particle_shards_equal_one_process(tiny_model_path, tmp_path):
    plugin = tmp_path / "bright.py"
    plugin.write_text("def log_p(x0):\n    return x0.mean(dim=(1, 2, 3)) * 10\n")
    base = ("sample", "--model", tiny_model_path, "-n", 2, "--steps", 4, "--batch", 1, "--guide",
            f"{plugin}:log_p", "--particles", 2, "--resample-every", 2, "--device", "cpu", "--precision", "fp32")
    expect_ok(cli(*base, "--out", tmp_path / "one"))
    sharded(*base, out=tmp_path / "two")
    same_files(tmp_path / "one", tmp_path / "two")


def test_reject_refuses_shards(tiny_model_path, tmp_path):
    expect_user_error(cli("sample", "--model", tiny_model_path, "--reject", tmp_path / "h.safetensors",
                          "--out", tmp_path / "s", "--shard", "0/2", "--device", "cpu"), "--shard")


def test_merge_joins_shards_run_apart(tiny_model_path, tmp_path):
    """Shards that ran in different places: their files gathered into one folder, `ddguide merge` joins them."""
    base = ("sample", "--model", tiny_model_path, "-n", 4, "--steps", 2, "--batch", 2, "--device", "cpu")
    expect_ok(cli(*base, "--out", tmp_path / "one"))
    expect_ok(cli(*base, "--out", tmp_path / "a", "--shard", "0/2"))
    expect_ok(cli(*base, "--out", tmp_path / "b", "--shard", "1/2"))
    assert not (tmp_path / "a" / "index.csv").exists()
    expect_user_error(cli("merge", tmp_path / "a"), "1 of 2 parts missing", "--shard 1/2")
    for p in (tmp_path / "b").iterdir():
        shutil.copy(p, tmp_path / "a")
    r = expect_ok(cli("merge", tmp_path / "a", "--json"))
    assert '"parts": 2' in flat(r) and '"images": 4' in flat(r)
    same_files(tmp_path / "one", tmp_path / "a")
    expect_user_error(cli("merge", tmp_path / "nothing.safetensors"), "no shard parts")


def test_extract_shards_equal_one_process(images, tiny_model_path, tmp_path):
    base = ("extract", images, "--model", tiny_model_path, "--blocks", "mid", "--blocks", "out.2", "--timesteps", 10,
            "--timesteps", 500, "--noise", "fixed", "--batch", 2, "--device", "cpu", "--precision", "fp32")
    expect_ok(cli(*base, "--out", tmp_path / "one.safetensors"))
    first, _ = sharded(*base, out=tmp_path / "two.safetensors")
    assert "the last shard to finish joins" in flat(first)
    same_features(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
    assert not [p.name for p in tmp_path.iterdir() if ".part" in p.name or "join-lock" in p.name]
    # parts written apart, joined by `ddguide merge`
    elsewhere = tmp_path / "elsewhere"
    expect_ok(cli(*base, "--out", tmp_path / "three.safetensors", "--shard", "1/2"))
    expect_ok(cli(*base, "--out", elsewhere / "three.safetensors", "--shard", "0/2"))
    shutil.move(elsewhere / "three.part0of2.safetensors", tmp_path)
    expect_ok(cli("merge", tmp_path / "three.safetensors"))
    same_features(tmp_path / "one.safetensors", tmp_path / "three.safetensors")


def test_fid_statistics_merge_from_shards(images, tiny_model_path, tmp_path):
    base = ("fid", images, "--features", "denoiser", "--model", tiny_model_path, "--batch", 3, "--device", "cpu")
    expect_ok(cli(*base, "--save-stats", tmp_path / "one.safetensors"))
    for i in range(3):  # 8 images in shards of 2, 3 and 3
        r = expect_ok(cli(*base, "--save-stats", tmp_path / "three.safetensors", "--shard", f"{i}/3"))
    assert "joins the parts" not in flat(r)
    one, three = load_stats(tmp_path / "one.safetensors"), load_stats(tmp_path / "three.safetensors")
    a, b = artifacts.describe(tmp_path / "one.safetensors"), artifacts.describe(tmp_path / "three.safetensors")
    assert (a.config, a.fingerprint) == (b.config, b.fingerprint) and one.n == 8
    np.testing.assert_allclose(three.mu, one.mu, rtol=1e-13, atol=1e-15)  # sums add up to float64 rounding
    np.testing.assert_allclose(three.sigma, one.sigma, rtol=1e-11, atol=1e-14)
    # a part alone is refused as statistics, and --shard needs --save-stats without B
    expect_ok(cli(*base, "--save-stats", tmp_path / "part.safetensors", "--shard", "0/2"))
    expect_user_error(cli("fid", tmp_path / "part.part0of2.safetensors", tmp_path / "one.safetensors"),
                      "shard 0/2", "ddguide merge")
    expect_user_error(cli(*base[:2], images, *base[2:], "--shard", "0/2"), "--save-stats")


@pytest.fixture(scope="module")
def rejection(images, tiny_model_path, tmp_path_factory):
    """A rejection head on the red and blue images, and a samples folder of them with a class column."""
    root = tmp_path_factory.mktemp("reject")
    expect_ok(cli("extract", images, "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 300,
                  "--timesteps", 800, "--out", root / "f.safetensors", "--device", "cpu"))
    expect_ok(cli("train-head", root / "f.safetensors", "--kind", "rejection", "--out", root / "rej.safetensors",
                  "--steps", 10))
    folder = root / "samples"
    folder.mkdir()
    rows = []
    for k, path in enumerate(sorted(images.rglob("*.png"))):
        shutil.copy(path, folder / f"{k:06d}.png")
        rows.append({"file": f"{k:06d}.png", "index": k, "seed": k, "class": path.parent.name})
    with open(folder / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_filter_shards_equal_one_process(rejection, tiny_model_path, tmp_path):
    base = ("filter", rejection / "samples", "--head", rejection / "rej.safetensors", "--model", tiny_model_path,
            "--batch", 2, "--device", "cpu", "--precision", "fp32")
    expect_ok(cli(*base, "--threshold", 0.0, "--out", tmp_path / "all"))
    probs = sorted(float(r["reject_prob"]) for r in csv.DictReader(open(tmp_path / "all" / "index.csv")))
    threshold = (probs[3] + probs[4]) / 2  # about half pass
    expect_ok(cli(*base, "--threshold", threshold, "--out", tmp_path / "one"))
    sharded(*base, "--threshold", threshold, out=tmp_path / "two")
    same_files(tmp_path / "one", tmp_path / "two")


# ------------------------------------------------------------------------------------------------ torchrun

RANKS = """
import sys
import torch
from ddguide.metrics.fid import FidConfig, run_fid
from ddguide.stages.extract import ExtractConfig, extract
from ddguide.stages.sample import SampleConfig, sample

model, images, out = sys.argv[1:4]
torch.set_num_threads(1)
sample(SampleConfig(out=out + "/samples", model=model, n=4, steps=3, batch=2, device="cpu"))
extract(ExtractConfig(data=images, out=out + "/f.safetensors", model=model, blocks=("mid",), timesteps=(10, 500),
                      noise="fixed", batch=2, device="cpu"))
run_fid(FidConfig(a=images, features="denoiser", model=model, batch=2, device="cpu", save_stats=out + "/s.safetensors"))
"""


def test_two_torchrun_processes_equal_one(images, tiny_model_path, tmp_path):
    from ddguide.metrics.fid import FidConfig, run_fid
    from ddguide.stages.extract import ExtractConfig, extract
    from ddguide.stages.sample import SampleConfig, sample

    one, two = tmp_path / "one", tmp_path / "two"
    sample(SampleConfig(out=str(one / "samples"), model=str(tiny_model_path), n=4, steps=3, batch=2, device="cpu"))
    extract(ExtractConfig(data=str(images), out=str(one / "f.safetensors"), model=str(tiny_model_path),
                          blocks=("mid",), timesteps=(10, 500), noise="fixed", batch=2, device="cpu"))
    run_fid(FidConfig(a=str(images), features="denoiser", model=str(tiny_model_path), batch=2, device="cpu",
                      save_stats=str(one / "s.safetensors")))
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    two.mkdir()
    r = torchrun(script, tiny_model_path, images, two)
    assert r.returncode == 0, r.stderr[-3000:]
    same_files(one / "samples", two / "samples")
    same_features(one / "f.safetensors", two / "f.safetensors")
    a, b = load_stats(one / "s.safetensors"), load_stats(two / "s.safetensors")
    assert a.n == b.n == 8
    np.testing.assert_allclose(b.mu, a.mu, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(b.sigma, a.sigma, rtol=1e-11, atol=1e-14)
