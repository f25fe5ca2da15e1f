"""diffusers ``UNet2DModel`` folders: `convert` and `--model` read them with their scheduler config, the network
gives diffusers' own outputs, and feature taps on ``down.<i>``, ``mid`` and ``up.<i>`` drive extract, heads and
sampling as on ADM models. Small random models written with ``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import cli, expect_ok, expect_user_error, shapes_data
from ddguide.core import artifacts
from ddguide.core.model import load_model

UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4, "attention_head_dim": 4}


def random_unet(seed: int, **overrides) -> torch.nn.Module:
    """A UNet2DModel whose every weight is drawn from N(0, 0.2^2) (diffusers zero-initialises none, but its
    defaults are near-identity maps that would hide a wrong tap)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = diffusers.UNet2DModel(**{**UNET, **overrides})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return unet.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A pipeline folder (unet/ and scheduler/, as pipelines save them), a class-conditional model folder with
    its scheduler_config.json beside config.json, and both converted."""
    root = tmp_path_factory.mktemp("diffusers")
    random_unet(0).save_pretrained(root / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "pipe" / "scheduler")
    random_unet(1, num_class_embeds=3).save_pretrained(root / "cond")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "cond")
    expect_ok(cli("convert", root / "pipe" / "unet", "--out", root / "uncond.safetensors"))
    expect_ok(cli("convert", root / "cond", "--out", root / "cond.safetensors"))
    return {"root": root, "pipe": root / "pipe", "unet": root / "pipe" / "unet", "cond_dir": root / "cond",
            "uncond": root / "uncond.safetensors", "cond": root / "cond.safetensors"}


# ------------------------------------------------------------------------------------------- parity


def test_the_converted_model_gives_diffusers_own_output(folders):
    reference = diffusers.UNet2DModel.from_pretrained(folders["unet"]).eval()
    model = load_model(folders["uncond"])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 300, 999])
    with torch.no_grad():
        ours, theirs = model(x, t), reference(x, t).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (model.diffusion.steps, model.diffusion.schedule, model.labels) == (1000, "linear", None)


def test_the_artifact_keeps_diffusers_config_and_tensor_names(folders):
    about = artifacts.describe(folders["uncond"])
    assert about.config["network"] == "diffusers" and about.config["unet"]["block_out_channels"] == [8, 16]
    reference = diffusers.UNet2DModel.from_pretrained(folders["unet"])
    tensors = artifacts.load(folders["uncond"]).tensors
    assert set(tensors) == set(reference.state_dict())
    rebuilt = diffusers.UNet2DModel(**about.config["unet"])
    rebuilt.load_state_dict(tensors)  # loads outside ddguide, strictly
    assert "diffusers" in expect_ok(cli("info", folders["uncond"])).output


def test_a_folder_is_a_model_too_with_the_artifacts_fingerprint(folders):
    from_folder, from_pipeline = load_model(folders["unet"]), load_model(folders["pipe"])
    assert from_folder.fingerprint == from_pipeline.fingerprint == artifacts.describe(folders["uncond"]).fingerprint


def test_scheduler_configs_map_onto_ddguides_schedules(tmp_path, folders):
    """linear and squaredcos_cap_v2 give the abar_t of diffusers' own scheduler."""
    for beta_schedule, ours in (("linear", "linear"), ("squaredcos_cap_v2", "cosine")):
        folder = tmp_path / beta_schedule
        shutil.copytree(folders["unet"], folder)
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
        scheduler.save_pretrained(folder)
        model = load_model(folder)
        assert model.diffusion.schedule == ours
        torch.testing.assert_close(model.abar.float(), scheduler.alphas_cumprod.float(), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------- features


def test_extract_taps_diffusers_blocks(folders, tmp_path):
    data = shapes_data(tmp_path, n=4, size=16)
    out = tmp_path / "feats.safetensors"
    expect_ok(cli("extract", data / "images", "--model", folders["uncond"], "--blocks", "down.1", "mid", "up.0",
                  "--timesteps", 300, "--device", "cpu", "--precision", "fp32", "--out", out))
    from ddguide.method.features import load_features

    feats = load_features(out)
    assert {k: tuple(v.shape) for k, v in feats.taps.items()} == {
        "feat.down.1@300": (4, 16, 8, 8), "feat.mid@300": (4, 16, 8, 8), "feat.up.0@300": (4, 16, 16, 16)}
    # the same taps read from diffusers' own module with hooks of this test
    reference = diffusers.UNet2DModel.from_pretrained(folders["unet"]).eval()
    seen = {}
    for name, module in (("down.1", reference.down_blocks[1]), ("mid", reference.mid_block),
                         ("up.0", reference.up_blocks[0])):
        module.register_forward_hook(lambda m, a, o, name=name: seen.update({name: o[0] if isinstance(o, tuple)
                                                                              else o}))
    x = feats.images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        reference(x, torch.full((4,), 300))
    for name, tap in seen.items():
        torch.testing.assert_close(feats.taps[f"feat.{name}@300"], tap, atol=1e-5, rtol=0)
    expect_user_error(cli("extract", data / "images", "--model", folders["uncond"], "--blocks", "in.1",
                          "--device", "cpu", "--out", tmp_path / "x.safetensors"), "unknown block", "down.0")


def test_a_head_on_diffusers_features_guides_sampling(folders, tmp_path):
    data = shapes_data(tmp_path, n=8, size=16)
    feats, head = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    expect_ok(cli("extract", data / "images", "--model", folders["uncond"], "--labels", data / "attributes.csv",
                  "--label", "has_circle", "--timesteps", 300, "--device", "cpu", "--out", feats))
    assert artifacts.describe(feats).config["spec"]["blocks"] == ["mid", "up.0"]  # the default taps
    expect_ok(cli("train-head", feats, "--steps", 5, "--out", head))
    out = tmp_path / "guided"
    expect_ok(cli("sample", "--model", folders["uncond"], "--guide", head, "--lambda", 2, "-n", 2, "--steps", 3,
                  "--device", "cpu", "--precision", "fp32", "--out", out))
    with open(out / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "head_prob" in rows[0]


# ------------------------------------------------------------------------------------------- sampling


def test_sample_from_a_folder_and_from_its_artifact(folders, tmp_path):
    for name, model in (("folder", folders["unet"]), ("artifact", folders["uncond"])):
        expect_ok(cli("sample", "--model", model, "-n", 2, "--steps", 3, "--device", "cpu", "--precision", "fp32",
                      "--out", tmp_path / name))
    a, b = (sorted((tmp_path / n).glob("0*.png")) for n in ("folder", "artifact"))
    assert len(a) == 2 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_a_class_conditional_diffusers_model_has_no_null_class(folders, tmp_path):
    model = load_model(folders["cond"])
    assert (model.labels, model.num_classes, model.has_null_class) == (3, 3, False)
    expect_ok(cli("sample", "--model", folders["cond"], "--class", 2, "-n", 2, "--steps", 2, "--device", "cpu",
                  "--out", tmp_path / "last"))
    expect_user_error(cli("sample", "--model", folders["cond"], "--class", 1, "--cfg", 1, "--device", "cpu",
                          "--out", tmp_path / "x"), "has no null class", "--cfg-uncond")
    expect_ok(cli("sample", "--model", folders["cond"], "--class", 1, "--cfg", 1, "--cfg-uncond", folders["uncond"],
                  "-n", 2, "--steps", 2, "--device", "cpu", "--out", tmp_path / "cfg"))


# ------------------------------------------------------------------------------------------- bad inputs


def _variant(folders, tmp_path: Path, config: dict | None = None, scheduler: dict | None = None) -> Path:
    """A copy of the unconditional model folder with its config.json and scheduler_config.json edited."""
    folder = tmp_path / "variant"
    shutil.copytree(folders["unet"], folder)
    shutil.copy(folders["pipe"] / "scheduler" / "scheduler_config.json", folder)
    for name, change in (("config.json", config), ("scheduler_config.json", scheduler)):
        if change:
            data = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**data, **change}))
    return folder


@pytest.mark.parametrize("scheduler, says", [
    ({"prediction_type": "v_prediction"}, "prediction_type 'v_prediction'"),
    ({"prediction_type": "sample"}, "prediction_type 'sample'"),
    ({"beta_schedule": "scaled_linear"}, "beta_schedule 'scaled_linear'"),
    ({"beta_end": 0.012}, "beta_end"),
    ({"variance_type": "learned"}, "variance_type 'learned'"),
    ({"variance_type": "learned_range"}, "output channels"),
])
def test_unsupported_scheduler_settings_are_refused(folders, tmp_path, scheduler, says):
    folder = _variant(folders, tmp_path, scheduler=scheduler)
    expect_user_error(cli("convert", folder, "--out", tmp_path / "m.safetensors"), says)
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_folders_are_refused_in_one_line(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_user_error(cli("convert", tmp_path / "empty", "--out", tmp_path / "m.safetensors"), "no config.json")
    expect_user_error(cli("sample", "--model", tmp_path / "empty", "--device", "cpu", "--out", tmp_path / "s"),
                      "no config.json")
    condition = _variant(folders, tmp_path, config={"_class_name": "UNet2DConditionModel"})
    expect_user_error(cli("convert", condition, "--out", tmp_path / "m.safetensors"), "UNet2DConditionModel")
    shutil.rmtree(condition)
    fourier = _variant(folders, tmp_path, config={"time_embedding_type": "fourier"})
    expect_user_error(cli("convert", fourier, "--out", tmp_path / "m.safetensors"), "time_embedding_type")
    shutil.rmtree(fourier)
    bigger = _variant(folders, tmp_path, config={"block_out_channels": [8, 32]})
    expect_user_error(cli("convert", bigger, "--out", tmp_path / "m.safetensors"), "weights do not fit")
    (bigger / "scheduler_config.json").unlink()
    (bigger / "config.json").write_text(json.dumps(UNET))
    expect_user_error(cli("convert", bigger, "--out", tmp_path / "m.safetensors"), "--diffusion")
    expect_ok(cli("convert", bigger, "--diffusion", '{"steps": 1000, "schedule": "cosine"}',
                  "--out", tmp_path / "m.safetensors"))
    expect_user_error(cli("convert", bigger, "--preset", "tiny", "--out", tmp_path / "m.safetensors"), "--preset")
    (bigger / "diffusion_pytorch_model.safetensors").rename(bigger / "diffusion_pytorch_model.bin")
    expect_user_error(cli("convert", bigger, "--diffusion", '{"steps": 1000}', "--out", tmp_path / "n.safetensors"),
                      "safetensors only")
    assert not (tmp_path / "n.safetensors").exists()


def test_without_diffusers_a_diffusers_model_is_refused_in_one_line(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    expect_user_error(cli("sample", "--model", folders["uncond"], "--device", "cpu", "--out", tmp_path / "s"),
                      "needs diffusers", "pip install")
    expect_ok(cli("info", folders["uncond"]))  # describing it needs no network


def test_finetune_refuses_a_diffusers_model(folders):
    from ddguide.core.errors import UserError
    from ddguide.stages.finetune import conditional_net

    with pytest.raises(UserError, match="diffusers UNet2DModel"):
        conditional_net(load_model(folders["uncond"]), 2, torch.Generator(), "m")
