"""A new user's first day (issue 23): the options every command shares, labelled subsets, the commands'
outputs named the way the others name them, and distances labelled by their feature space."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, expect_ok, expect_user_error, shapes_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 shapes images of 16 px in class folders, with index.csv (a class column) and attributes.csv."""
    return shapes_data(tmp_path_factory, n=12, size=16)


# ------------------------------------------------------------------------- --threads, --device, --precision


# (cas keeps its fp32 default, which its reported accuracies use)
@pytest.mark.parametrize("command", ["sample", "extract", "train-head", "filter", "fid", "demo", "train", "finetune",
                                     "cas"])
def test_every_computing_command_takes_threads_device_and_precision(command):
    from typer.main import get_command

    from ddguide.cli import app

    params = {p.name: p for p in get_command(app).commands[command].params}
    assert "threads" in params and params["device"].default == "auto"
    assert params["precision"].default == ("fp32" if command == "cas" else "auto")


@pytest.mark.parametrize("argv", [
    ["extract", "x", "--out", "f.safetensors"],
    ["filter", "x", "--head", "h.safetensors", "--out", "kept"],
    ["fid", "a", "b"],
    ["demo", "--out", "d"],
    ["sample", "--out", "s"],
    ["train-head", "f.safetensors", "--out", "h.safetensors"],
])
def test_threads_zero_is_refused_before_anything_runs(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expect_user_error(cli(*argv, "--threads", 0), "--threads must be in 1..4096, got 0")
    assert list(tmp_path.iterdir()) == []


def test_extract_filter_and_fid_run_with_threads_device_and_precision(data, tiny_model_path, tmp_path):
    cpu = ("--device", "cpu", "--threads", 1)
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--out",
                  tmp_path / "f.safetensors", "--precision", "fp32", *cpu))
    expect_ok(cli("train-head", tmp_path / "f.safetensors", "--kind", "rejection", "--steps", 5, "--out",
                  tmp_path / "rej.safetensors"))
    r = expect_ok(cli("filter", data, "--head", tmp_path / "rej.safetensors", "--model", tiny_model_path,
                      "--threshold", 0.0, "--out", tmp_path / "kept", "--precision", "bf16", *cpu))
    assert "kept 12 of 12" in r.output and "precision: bf16 autocast" in r.output
    r = expect_ok(cli("fid", data / "images", data / "images", "--features", "denoiser", "--model",
                      tiny_model_path, "--precision", "fp32", *cpu))
    assert "FID" not in r.stdout


def test_data_shapes_takes_out_as_the_other_commands_do(tmp_path):
    expect_ok(cli("data", "shapes", "--out", tmp_path / "a", "-n", 2, "--size", 16))
    expect_ok(cli("data", "shapes", tmp_path / "b", "-n", 2, "--size", 16))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    expect_user_error(cli("data", "shapes", tmp_path / "c", "--out", tmp_path / "d", "-n", 2), "once")
    expect_user_error(cli("data", "shapes", "-n", 2), "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ------------------------------------------------------------------------------------- extract --labels


def test_extract_labels_extracts_only_the_images_the_table_lists(data, tiny_model_path, tmp_path):
    from ddguide.core import artifacts

    lines = (data / "attributes.csv").read_text().splitlines()
    (tmp_path / "subset.csv").write_text("\n".join(lines[:6]) + "\n")  # the header and 5 of the 12 images
    r = expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--labels",
                      tmp_path / "subset.csv", "--label", "has_circle", "--out", tmp_path / "f.safetensors",
                      "--device", "cpu", "--json"))
    assert json.loads(r.stdout.splitlines()[-1])["images"] == 5
    art = artifacts.load(tmp_path / "f.safetensors", "features")
    assert art.config["count"] == 5 and art.tensors["labels"].shape == (5,)


def test_extract_labels_listing_a_file_not_in_the_folder_is_refused(data, tiny_model_path, tmp_path):
    lines = (data / "attributes.csv").read_text().splitlines()
    (tmp_path / "typo.csv").write_text("\n".join(lines[:4] + ["images/red_circle/nope.png,1,0,0,0,0"]) + "\n")
    expect_user_error(cli("extract", data / "images", "--model", tiny_model_path, "--labels", tmp_path / "typo.csv",
                          "--label", "has_circle", "--out", tmp_path / "f.safetensors", "--device", "cpu"),
                      "lists 1 file(s) not in", "nope.png")
    assert not (tmp_path / "f.safetensors").exists()


# ------------------------------------------------------------------------------------- fid's label


def test_fid_on_denoiser_features_is_not_called_fid(data, tiny_model_path):
    r = expect_ok(cli("fid", data / "images", data / "images", "--features", "denoiser", "--model", tiny_model_path,
                      "--device", "cpu", "--threads", 1))
    assert "FID" not in r.stdout and "Fréchet distance (denoiser-mid-t100 features)" in r.stdout
    r = expect_ok(cli("fid", data / "images", data / "images", "--features", "denoiser", "--model", tiny_model_path,
                      "--device", "cpu", "--json"))
    figures = json.loads(r.stdout)
    assert figures["fid"] is None and abs(figures["distance"]) < 1e-6 and figures["feature_space"] == "denoiser-mid-t100"


# ------------------------------------------------------------------------------------- train --arch, presets


def test_train_arch_replaces_the_presets_options(data, tmp_path):
    from ddguide.core import artifacts

    expect_ok(cli("train", data / "images", "--out", tmp_path / "m.safetensors", "--preset", "tiny", "--arch",
                  '{"model_channels": 16, "channel_mult": [1, 1]}', "--steps", 2, "--batch", 2,
                  "--checkpoint-every", 2, "--device", "cpu", "--precision", "fp32", "--threads", 1))
    unet = artifacts.load(tmp_path / "m.safetensors", "model").config["unet"]
    assert unet["model_channels"] == 16 and unet["channel_mult"] == [1, 1] and unet["image_size"] == 16


@pytest.mark.parametrize("arch, fragment", [
    ("[1, 2]", "--arch: expected a JSON object"),
    ('{"model_channels": 16, "wings": 2}', "--arch: unknown U-Net options: wings"),
    ("{nope", "--arch: not valid JSON"),
])
def test_train_arch_that_is_no_object_or_names_unknown_fields_is_refused(arch, fragment, data, tmp_path):
    expect_user_error(cli("train", data / "images", "--out", tmp_path / "m.safetensors", "--preset", "tiny",
                          "--arch", arch, "--steps", 2, "--device", "cpu"), fragment)
    assert list(tmp_path.iterdir()) == []


def test_presets_lists_sizes_and_parameter_counts():
    r = expect_ok(cli("presets", "--json"))
    rows = {row["name"]: row for row in json.loads(r.stdout)["presets"]}
    assert {"small16", "shapes32", "small64", "tiny"} <= set(rows)
    assert (rows["small16"]["image_size"], rows["small64"]["image_size"]) == (16, 64)
    assert rows["tiny"]["parameters"] < 10**5 < rows["small16"]["parameters"] < 5 * 10**6
    assert rows["small64"]["parameters"] < 5 * 10**6  # trainable on a CPU
    assert rows["256x256_diffusion"]["parameters"] > 5 * 10**8


# ------------------------------------------------------------------------------------- cas


def test_cas_no_hflip_and_a_warning_for_milestones_beyond_the_epochs(data, tmp_path, monkeypatch):
    import ddguide.stages.cas
    from ddguide.core import artifacts

    def no_flips(*_):
        raise AssertionError("--no-hflip flipped")

    monkeypatch.setattr(ddguide.stages.cas, "random_flip", no_flips)
    r = expect_ok(cli("cas", "--train", data / "images", "--test", data / "images", "--epochs", 2, "--batch", 6,
                      "--milestones", 1, 3, "--no-hflip", "--out", tmp_path / "r.safetensors", "--device", "cpu",
                      "--threads", 1))
    assert "warning: --milestones 1 3: 3 is not reached within --epochs 2" in " ".join(r.output.split())
    assert artifacts.load(tmp_path / "r.safetensors", "report").config["cas"]["hflip"] is False
    r = cli("cas", "--train", data / "images", "--test", data / "images", "--epochs", 1, "--hflip", "--out",
            tmp_path / "f.safetensors", "--device", "cpu")
    assert r.exit_code == 1 and "--no-hflip flipped" in r.output  # --hflip (the default) does flip


def test_extract_refuses_labels_and_masks_together(tiny_model_path, tmp_path):
    """An attribute table and masks make two kinds of head; before, the masks were silently dropped."""
    data = shapes_data(tmp_path / "data")
    r = cli("extract", data / "images", "--model", tiny_model_path, "--labels", data / "attributes.csv", "--label",
            "has_red", "--masks", data / "masks", "--device", "cpu", "--out", tmp_path / "f.safetensors")
    expect_user_error(r, "--masks")
    assert not (tmp_path / "f.safetensors").exists()


# ------------------------------------------------------------------- train's preview grid, exporting a stopped run


def _train(data, out, *extra):
    return cli("train", data / "images", "--out", out, "--preset", "tiny", "--steps", 6, "--batch", 4,
               "--checkpoint-every", 2, "--device", "cpu", *extra)


def test_train_draws_a_sample_grid_at_each_checkpoint_without_changing_the_run(data, tmp_path):
    from PIL import Image

    from ddguide.core import artifacts

    expect_ok(_train(data, tmp_path / "a.safetensors"))
    grid = Image.open(tmp_path / "a.samples.png")
    assert grid.size == (4 * 16 + 5 * 2,) * 2  # 16 images of the tiny preset's 16 px, 4 x 4 with 2 px gaps
    expect_ok(_train(data, tmp_path / "b.safetensors", "--preview", 0))
    assert not (tmp_path / "b.samples.png").exists()
    a, b = (artifacts.load(tmp_path / f"{x}.safetensors", "model").tensors for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the previews draw from generators of their own


def test_a_stopped_run_is_exported_from_its_last_checkpoint(data, tmp_path, monkeypatch):
    from ddguide.core import artifacts
    from ddguide.stages import train as stage

    out = tmp_path / "m.safetensors"
    real_fit = stage.fit

    def stop_after_step_4(*args, **kwargs):
        def progress(done, total, info):
            if done == 5:
                raise KeyboardInterrupt

        return real_fit(*args[:8], progress, **kwargs)

    monkeypatch.setattr(stage, "fit", stop_after_step_4)
    r = _train(data, out, "--lr-final", 1e-5)
    assert r.exit_code != 0 and not out.exists()
    monkeypatch.setattr(stage, "fit", real_fit)
    # with --lr-final the run is tied to --steps: a rerun with fewer steps is refused, --export writes step 4
    expect_user_error(cli("train", data / "images", "--out", out, "--preset", "tiny", "--steps", 4, "--batch", 4,
                          "--checkpoint-every", 2, "--device", "cpu", "--lr-final", 1e-5))
    expect_ok(_train(data, out, "--lr-final", 1e-5, "--export"))
    assert artifacts.load(out, "model").config["trained_steps"] == 4


def test_export_without_a_checkpoint_is_refused(data, tmp_path):
    expect_user_error(_train(data, tmp_path / "m.safetensors", "--export"), "no checkpoint")
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------- Tiny ImageNet's train layout, cas's checkpoint


def test_extract_classes_tiny_imagenet_train_folders_by_their_wnids(tiny_model_path, tmp_path):
    import numpy as np
    from PIL import Image

    from ddguide.core import artifacts

    train = tmp_path / "tiny-imagenet-200" / "train"
    rng = np.random.default_rng(0)
    for wnid in ("n01443537", "n01629819"):
        (train / wnid / "images").mkdir(parents=True)
        (train / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                train / wnid / "images" / f"{wnid}_{i}.JPEG")
    feats = tmp_path / "f.safetensors"
    expect_ok(cli("extract", train, "--model", tiny_model_path, "--out", feats, "--device", "cpu"))
    art = artifacts.load(feats, "features")
    assert art.config["classes"] == ["n01443537", "n01629819"]
    assert art.tensors["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    expect_ok(cli("train-head", feats, "--kind", "rejection", "--steps", 3, "--out", tmp_path / "r.safetensors"))


def test_cas_removes_its_checkpoint_once_the_report_is_written_unless_kept(data, tmp_path):
    args = ("cas", "--train", data / "images", "--test", data / "images", "--epochs", 1, "--batch", 6,
            "--milestones", 1, 1, "--no-hflip", "--device", "cpu")
    expect_ok(cli(*args, "--out", tmp_path / "a.safetensors"))
    assert (tmp_path / "a.safetensors").exists() and not (tmp_path / "a.ckpt.safetensors").exists()
    expect_ok(cli(*args, "--out", tmp_path / "b.safetensors", "--keep-checkpoint"))
    assert (tmp_path / "b.ckpt.safetensors").exists()


def test_sample_and_train_head_take_threads(data, tiny_model_path, tmp_path):
    expect_ok(cli("sample", "--model", tiny_model_path, "-n", 2, "--steps", 2, "--threads", 1, "--device", "cpu",
                  "--out", tmp_path / "s"))
    feats = tmp_path / "f.safetensors"
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--labels", data / "attributes.csv",
                  "--label", "has_circle", "--out", feats, "--device", "cpu"))
    expect_ok(cli("train-head", feats, "--steps", 3, "--threads", 1, "--out", tmp_path / "h.safetensors"))
    expect_user_error(cli("train-head", feats, "--steps", 3, "--threads", 0, "--out", tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


def test_sample_defaults_to_the_sampler_that_measured_best_on_the_shipped_model(tiny_model_path, tmp_path):
    """DDPM 50 (README model card: 91.4 % valid against DDIM 50's 86.7 %); a 1-step run records it."""
    from typer.main import get_command

    from ddguide.cli import app

    params = {p.name: p for p in get_command(app).commands["sample"].params}
    assert (params["sampler"].default, params["steps"].default) == ("ddpm", 50)
    expect_ok(cli("sample", "--model", tiny_model_path, "-n", 1, "--steps", 1, "--device", "cpu",
                  "--out", tmp_path / "s"))
    from ddguide.stages.sample import SampleConfig

    assert SampleConfig(out="x").sampler == "ddpm"
