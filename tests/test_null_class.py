"""Class-conditional models with and without a null class.

guided-diffusion's class-conditional checkpoints (64x64_diffusion, 128x128_diffusion, 256x256_diffusion) have one
embedding row per class and no null class; ddguide's `finetune` adds a null row last. The artifact says which
(``null_class``), every class of a converted model can be sampled, and CFG on a model without a null class takes
its null branch from an unconditional model (``--cfg-uncond``) or is refused in one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny, cli, expect_ok, expect_user_error
from ddguide.core import artifacts
from ddguide.core.model import load_model, save_model
from ddguide.core.sampling import image_generators, per_image_randn

CLASSES = 4  # a tiny stand-in for ImageNet's 1000: rows 0..3 are all real classes


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A guided-diffusion-layout class-conditional checkpoint (.pt and .safetensors) converted, an unconditional
    model of the same size and schedule, and unconditional models that differ in size, channels or schedule."""
    root = tmp_path_factory.mktemp("null-class")
    cond_sd = build_tiny(seed=3, num_classes=CLASSES).net.state_dict()  # the reference key layout
    torch.save(cond_sd, root / "cond.pt")
    save_file({k: v.contiguous() for k, v in cond_sd.items()}, str(root / "cond_st.safetensors"))
    arch = json.dumps({"num_classes": CLASSES})
    for name in ("cond.pt", "cond_st.safetensors"):
        expect_ok(cli("convert", root / name, "--preset", "tiny", "--arch", arch,
                      "--out", root / f"converted-{Path(name).stem}.safetensors"))
    paths = {"cond": root / "converted-cond.safetensors", "cond_st": root / "converted-cond_st.safetensors"}
    variants = {"uncond": {}, "size": {"image_size": 32}, "channels": {"in_channels": 1, "out_channels": 1}}
    for name, overrides in variants.items():
        save_model(root / f"{name}.safetensors", build_tiny(seed=4, **overrides))
        paths[name] = root / f"{name}.safetensors"
    cosine = build_tiny(seed=4)
    cosine.diffusion = type(cosine.diffusion)(steps=1000, schedule="cosine")
    save_model(root / "schedule.safetensors", cosine)
    paths["schedule"] = root / "schedule.safetensors"
    return paths


def sample(model: Path, out: Path, *options) -> list[dict[str, str]]:
    expect_ok(cli("sample", "--model", model, "-n", 2, "--steps", 2, "--device", "cpu", "--precision", "fp32",
                  "--out", out, *options))
    return list(csv.DictReader(open(out / "index.csv")))


# ------------------------------------------------------------------------------------------- the artifact


def test_a_converted_class_conditional_model_has_no_null_class(models):
    for name in ("cond", "cond_st"):
        assert artifacts.describe(models[name]).config["null_class"] is False
        model = load_model(models[name])
        assert (model.labels, model.num_classes, model.null_label, model.has_null_class) == (4, 4, None, False)
    r = expect_ok(cli("info", models["cond"]))
    assert "null class" in r.output and "no (4 classes" in r.output


def test_a_fine_tuned_model_records_its_null_class(tmp_path):
    cond = build_tiny(seed=1, num_classes=CLASSES)
    cond.classes, cond.info["finetuned_from"] = ["a", "b", "c"], "0123456789abcdef"
    save_model(tmp_path / "ft.safetensors", cond)
    assert artifacts.describe(tmp_path / "ft.safetensors").config["null_class"] is True
    model = load_model(tmp_path / "ft.safetensors")
    assert (model.num_classes, model.null_label) == (3, 3)
    assert "yes (row 3; 3 classes)" in expect_ok(cli("info", tmp_path / "ft.safetensors")).output


def test_an_unconditional_model_says_nothing_about_a_null_class(models):
    assert "null_class" not in artifacts.describe(models["uncond"]).config
    assert "null class" not in expect_ok(cli("info", models["uncond"])).output


@pytest.mark.parametrize("converted", [False, True])
def test_older_files_without_the_field_keep_their_reading(tmp_path, converted):
    """Written before the field: a fine-tuned model's last row is null, a converted checkpoint's is a class."""
    model = build_tiny(seed=1, num_classes=CLASSES)
    model.info["converted_from" if converted else "finetuned_from"] = "x"
    config = model.config()
    del config["null_class"]
    sd = {k: v.contiguous() for k, v in model.net.state_dict().items()}
    artifacts.save(tmp_path / "old.safetensors", sd, kind="model", config=config, fingerprint=artifacts.fingerprint(sd))
    loaded = load_model(tmp_path / "old.safetensors")
    assert loaded.null_class is None and loaded.has_null_class is (not converted)
    assert loaded.num_classes == (CLASSES if converted else CLASSES - 1)


def test_a_null_class_that_is_not_true_or_false_is_refused(tmp_path):
    model = build_tiny(seed=1, num_classes=CLASSES)
    config = {**model.config(), "null_class": "yes"}
    sd = {k: v.contiguous() for k, v in model.net.state_dict().items()}
    artifacts.save(tmp_path / "bad.safetensors", sd, kind="model", config=config, fingerprint="0")
    expect_user_error(cli("info", tmp_path / "bad.safetensors"), "null_class")


# ------------------------------------------------------------------------------------------- sampling


def test_the_last_class_of_a_converted_model_can_be_sampled(models, tmp_path):
    rows = sample(models["cond"], tmp_path / "last", "--class", CLASSES - 1)
    assert [r["class"] for r in rows] == [str(CLASSES - 1)] * 2
    every = sample(models["cond"], tmp_path / "all", "-n", 4, "--class", "all")
    assert [r["class"] for r in every] == ["0", "1", "2", "3"]
    expect_user_error(cli("sample", "--model", models["cond"], "--class", CLASSES, "--device", "cpu",
                          "--out", tmp_path / "x"), "class id 4 is out of range", "4 classes")


def test_cfg_without_a_null_class_is_refused_in_one_line(models, tmp_path):
    expect_user_error(cli("sample", "--model", models["cond"], "--class", 1, "--cfg", 2, "--device", "cpu",
                          "--out", tmp_path / "x"), "has no null class", "--cfg-uncond")
    assert not (tmp_path / "x").exists()
    expect_user_error(cli("sample", "--model", models["cond"], "--class", 1, "--cfg-uncond", models["uncond"],
                          "--device", "cpu", "--out", tmp_path / "y"), "--cfg-uncond", "--cfg W")


@pytest.mark.parametrize("name, says", [("size", "32 px"), ("channels", "1 channels"),
                                        ("schedule", "cosine 1000"), ("cond_st", "class rows")])
def test_a_cfg_uncond_model_that_does_not_match_is_refused(models, tmp_path, name, says):
    expect_user_error(cli("sample", "--model", models["cond"], "--class", 1, "--cfg", 2, "--cfg-uncond", models[name],
                          "--device", "cpu", "--out", tmp_path / "x"), "--cfg-uncond", says)
    assert not (tmp_path / "x").exists()


def test_cfg_uncond_combines_the_two_models_epsilon(models):
    """One step of the composed denoiser is (1 + w) eps(x, c) - w eps_uncond(x), computed here by hand."""
    from ddguide.stages.sample import SampleConfig, prepare

    w, labels = 2.5, torch.tensor([3, 0])
    run = prepare(SampleConfig(out="unused", model=str(models["cond"]), classes=["3", "0"], cfg_scale=w,
                               cfg_uncond=str(models["uncond"]), device="cpu"))
    cond, uncond = load_model(models["cond"]), load_model(models["uncond"])
    x = per_image_randn((3, 16, 16), image_generators(0, [0, 1]), "cpu")
    t = torch.full((2,), 999)
    with torch.no_grad():
        got = run.denoiser_for(labels, [0, 1])(x, t).eps
        hand = (1 + w) * cond(x, t, labels) - w * uncond(x, t)
        plain = cond(x, t, labels)
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the unconditional branch changed it


def test_cfg_uncond_sampling_matches_a_hand_step(models):
    """`sample --steps 1` with --cfg-uncond: x0_hat of Eq. 11 from the combined epsilon, image by image."""
    from ddguide.core.diffusion import eps_to_x0
    from ddguide.stages.sample import SampleConfig, generate

    w = 2.0
    got = generate(SampleConfig(out="unused", model=str(models["cond"]), n=2, steps=1, classes=["2"], cfg_scale=w,
                                cfg_uncond=str(models["uncond"]), device="cpu", precision="fp32"))
    cond, uncond = load_model(models["cond"]), load_model(models["uncond"])
    x = per_image_randn((3, 16, 16), image_generators(0, [0, 1]), "cpu")
    t, y = torch.zeros(2, dtype=torch.long), torch.tensor([2, 2])
    with torch.no_grad():
        eps = (1 + w) * cond(x, t, y) - w * uncond(x, t)
    hand = eps_to_x0(x, t, eps, cond.abar).clamp(-1, 1)
    torch.testing.assert_close(got.x, hand, atol=1e-5, rtol=0)
    assert [r["class"] for r in got.rows] == [2, 2]


def test_cfg_uncond_from_the_command_line(models, tmp_path):
    rows = sample(models["cond"], tmp_path / "cfg", "--class", 1, "--cfg", 1.5, "--cfg-uncond", models["uncond"])
    assert [r["class"] for r in rows] == ["1", "1"] and rows[0]["guidance"] == "cfg:1.5"


def test_a_fine_tuned_model_still_uses_its_own_null_class(tmp_path):
    cond = build_tiny(seed=1, num_classes=CLASSES)
    cond.classes, cond.info["finetuned_from"] = ["a", "b", "c"], "0123456789abcdef"
    save_model(tmp_path / "ft.safetensors", cond)
    rows = sample(tmp_path / "ft.safetensors", tmp_path / "out", "--class", "c", "--cfg", 1.0)
    assert [r["class"] for r in rows] == ["c", "c"]
    expect_user_error(cli("sample", "--model", tmp_path / "ft.safetensors", "--class", 3, "--device", "cpu",
                          "--out", tmp_path / "x"), "out of range", "3 classes")
