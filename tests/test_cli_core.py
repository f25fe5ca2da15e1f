"""The command line on tiny models: outputs, and one readable line + exit 2 for every user error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import build_tiny, expect_user_error
from ddguide.cli import app
from ddguide.core import artifacts

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_sample_writes_images_index_and_grid(tiny_model_path, tmp_path):
    out = tmp_path / "s"
    r = run("sample", "--model", tiny_model_path, "-n", 5, "--steps", 4, "--batch", 2, "--out", out,
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{k:06d}.png" for k in range(5)]
    lines = (out / "index.csv").read_text().splitlines()
    assert lines[0].startswith("file,index,seed") and len(lines) == 6
    assert (out / "grid.png").is_file()


def test_image_k_is_the_same_for_batch_1_and_4(tiny_model_path, tmp_path):
    for batch in (1, 4):
        r = run("sample", "--model", tiny_model_path, "-n", 4, "--steps", 3, "--batch", batch,
                "--out", tmp_path / f"b{batch}", "--device", "cpu", "--sampler", "ddpm")
        assert r.exit_code == 0, r.output
    for k in range(4):
        a = np.asarray(Image.open(tmp_path / "b1" / f"{k:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "b4" / f"{k:06d}.png"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_info_describes_an_artifact(tiny_model_path):
    r = run("info", tiny_model_path)
    assert r.exit_code == 0 and "model" in r.output and '"preset": "tiny"' in r.output


def test_missing_file(tmp_path):
    expect_user_error(run("info", tmp_path / "nope.safetensors"), "no such file")


def test_unknown_preset_lists_valid_ones(tmp_path):
    ckpt = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    expect_user_error(run("convert", ckpt, "--preset", "nope", "--out", tmp_path / "m.safetensors"),
                      "unknown preset", "imagenet64_uncond_100M_1500K", "ffhq")
    assert not (tmp_path / "m.safetensors").exists()


def test_wrong_artifact_kind(tmp_path):
    feats = tmp_path / "f.safetensors"
    artifacts.save(feats, {"x": torch.zeros(2)}, kind="features", config={}, fingerprint="abc")
    expect_user_error(run("sample", "--model", feats, "--out", tmp_path / "o", "--device", "cpu"),
                      "'features'", "'model'")


def test_not_an_artifact(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    expect_user_error(run("info", bad), "not a safetensors file")


def test_checkpoint_with_the_wrong_flag_names_it(tmp_path):
    sd = build_tiny(out_channels=6).net.state_dict()  # a learn_sigma checkpoint
    ckpt = tmp_path / "tiny.pt"
    torch.save(sd, ckpt)
    out = tmp_path / "m.safetensors"
    expect_user_error(run("convert", ckpt, "--preset", "tiny", "--out", out), "learn_sigma=True")
    assert not out.exists()
    r = run("convert", ckpt, "--preset", "tiny", "--arch", '{"out_channels": 6}', "--out", out)
    assert r.exit_code == 0, r.output
    assert out.exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/ddguide-pickle-ran")


def test_pickle_that_runs_code_is_refused(tmp_path):
    MARKER.unlink(missing_ok=True)
    ckpt = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "payload": _RunsCode()}, ckpt)
    out = tmp_path / "m.safetensors"
    expect_user_error(run("convert", ckpt, "--preset", "tiny", "--out", out), "refused")
    assert not MARKER.exists() and not out.exists()


def test_bad_options_are_user_errors(tiny_model_path, tmp_path):
    expect_user_error(run("sample", "--model", tiny_model_path, "--out", tmp_path / "o", "--sampler", "euler",
                          "--device", "cpu"), "unknown sampler")
    expect_user_error(run("sample", "--model", tiny_model_path, "--out", tmp_path / "o", "-n", 0,
                          "--device", "cpu"), ">= 1")
    expect_user_error(run("sample", "--model", tiny_model_path, "--out", tmp_path / "o", "--precision", "fp8",
                          "--device", "cpu"), "unknown precision")
    expect_user_error(run("convert", tmp_path / "none.pt", "--preset", "tiny", "--out", tmp_path / "m"),
                      "no such file")


def test_pytorch_checkpoint_given_as_model_says_convert(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    expect_user_error(run("sample", "--model", ckpt, "--out", tmp_path / "o", "--device", "cpu"), "ddguide convert")


def test_torchrun_shards_give_the_same_images(tiny_model_path, tmp_path, monkeypatch):
    args = ["sample", "--model", tiny_model_path, "-n", 5, "--steps", 3, "--batch", 2, "--device", "cpu"]
    assert run(*args, "--out", tmp_path / "one").exit_code == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        r = run(*args, "--out", tmp_path / "two")
        assert r.exit_code == 0, r.output
    assert (tmp_path / "one" / "index.csv").read_text() == (tmp_path / "two" / "index.csv").read_text()
    for k in range(5):
        a = np.asarray(Image.open(tmp_path / "one" / f"{k:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "two" / f"{k:06d}.png"))
        assert np.array_equal(a, b)


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--no-such-option"], "No such option"),
    (["sample", "-n", "many", "--out", "x"], "Invalid value for '-n' / '--num-images'"),
    (["sample", "--n", "4", "--out", "x"], "it is -n or --num-images now"),
    (["extract"], "Missing argument"),
    (["nosuchcmd"], "No such command"),
])
def test_usage_errors_are_one_line_with_exit_code_2(argv, fragment, monkeypatch, capsys):
    from ddguide.cli import main

    monkeypatch.setattr("sys.argv", ["ddguide", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and fragment in err and len(err.splitlines()) == 1, err
