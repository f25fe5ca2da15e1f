"""Fine-tuning an unconditional model into a class-conditional one, the labelled-data readers, and CFG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny
from conftest import cli as run
from conftest import expect_user_error as assert_user_error
from ddguide.core import artifacts
from ddguide.core.data import class_folders, labelled_images, tiny_imagenet
from ddguide.core.model import denoiser, load_model
from ddguide.method.guidance import Guide, classifier_free, conditional, head_guidance
from ddguide.stages.finetune import FinetuneConfig, conditional_net, drop_labels, finetune, finetune_recipe

COLOURS = {"blue": (40, 90, 230), "red": (220, 40, 40)}


def write_images(folder: Path, colour, n: int, size: int = 16, seed: int = 0, suffix: str = ".png") -> None:
    """``n`` noisy flat images of one colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(folder / f"{i:03d}{suffix}")


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "two"
    for k, (name, colour) in enumerate(COLOURS.items()):
        write_images(root / name, colour, 4, seed=k)
    return root


def config(data: Path, model: Path, out: Path, **kw) -> FinetuneConfig:
    recipe = finetune_recipe(**{**dict(steps=4, batch=4, precision="fp32", checkpoint_every=2), **kw})
    return FinetuneConfig(data=str(data), out=str(out), model=str(model), recipe=recipe, device="cpu")


@pytest.fixture(scope="module")
def cond_path(two_classes, tiny_model_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cond") / "cond.safetensors"
    finetune(config(two_classes, tiny_model_path, out))
    return out


# --- readers ---------------------------------------------------------------------------------------------------


def test_class_folders_and_the_shapes_layout(two_classes, tmp_path):
    files, labels, names = class_folders(two_classes)
    assert names == ["blue", "red"] and labels == [0] * 4 + [1] * 4
    assert [f.parent.name for f in files] == ["blue"] * 4 + ["red"] * 4
    write_images(tmp_path / "images" / "a", (0, 0, 0), 1)  # `ddguide data shapes` writes images/<class>/
    write_images(tmp_path / "images" / "b", (0, 0, 0), 2)
    write_images(tmp_path / "masks", (0, 0, 0), 3)
    assert labelled_images(tmp_path)[1:] == ([0, 1, 1], ["a", "b"])


def test_tiny_imagenet_layout(tmp_path):
    wnids = ["n02", "n01"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        write_images(tmp_path / "train" / w / "images", (k * 100, 0, 0), 2, suffix=".JPEG")
        (tmp_path / "train" / w / f"{w}_boxes.txt").write_text("")
    write_images(tmp_path / "val" / "images", (0, 0, 0), 3, suffix=".JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "000.JPEG\tn02\t0\t0\t8\t8\n001.JPEG\tn01\t0\t0\t8\t8\n002.JPEG\tn02\t1\t1\t9\t9\n")
    _, labels, names = tiny_imagenet(tmp_path, "train")
    assert names == ["n01", "n02"] and labels == [0, 0, 1, 1]
    files, labels, names = tiny_imagenet(tmp_path, "val")
    assert names == ["n01", "n02"] and labels == [1, 0, 1] and files[0].name == "000.JPEG"
    assert labelled_images(tmp_path)[1] == [0, 0, 1, 1]
    assert labelled_images(tmp_path, split="val")[1] == [1, 0, 1]
    assert labelled_images(tmp_path / "val")[1:] == ([1, 0, 1], ["n01", "n02"])


# --- the fine-tuned model ---------------------------------------------------------------------------------------


def test_conditional_net_copies_every_weight_but_the_new_class_embedding():
    base = build_tiny()
    net = conditional_net(base, 5, torch.Generator().manual_seed(0))
    assert net.label_emb.weight.shape == (6, 4 * base.net.cfg.model_channels)
    ours, theirs = net.state_dict(), base.net.state_dict()
    assert set(ours) - set(theirs) == {"label_emb.weight"}
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_finetune_writes_a_class_conditional_model(cond_path, tiny_model_path):
    model = load_model(cond_path)
    base = load_model(tiny_model_path)
    assert model.net.cfg.num_classes == 3 and model.net.label_emb.weight.shape[0] == 3
    assert model.classes == ["blue", "red"]
    assert model.info["finetuned_from"] == base.fingerprint
    assert model.info["trained_steps"] == 4 and model.diffusion == base.diffusion


def test_label_dropout_returns_a_new_tensor():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0] * 8)
    before = labels.clone()
    dropped = drop_labels(labels, 0.5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(labels, before)
    assert (dropped == 3).any() and (dropped != 3).any()
    kept = dropped != 3
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(drop_labels(labels, 0.0, 3, torch.Generator()), labels)


def test_resume_after_a_kill_ends_with_the_same_weights(two_classes, tiny_model_path, tmp_path):
    finetune(config(two_classes, tiny_model_path, tmp_path / "a.safetensors", steps=5))

    def kill_at_step_3(done, total, info):
        if done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        finetune(config(two_classes, tiny_model_path, out, steps=5), progress=kill_at_step_3)
    assert not out.exists()
    ckpt = artifacts.load(tmp_path / "b.ckpt.safetensors", "checkpoint")
    assert ckpt.config["step"] == 2
    steps = []
    finetune(config(two_classes, tiny_model_path, out, steps=5), progress=lambda d, t, i: steps.append(d))
    assert [s for s in steps if s <= 5] == [3, 4, 5]  # continued from the checkpoint at step 2
    a, b = artifacts.load(tmp_path / "a.safetensors"), artifacts.load(out)
    assert a.fingerprint == b.fingerprint


def test_a_changed_run_does_not_resume_an_old_checkpoint(cond_path, two_classes, tiny_model_path):
    assert cond_path.with_name("cond.ckpt.safetensors").is_file()
    r = run("finetune", two_classes, "--model", tiny_model_path, "--out", cond_path, "--steps", 5, "--batch", 4,
            "--lr", 1e-3, "--device", "cpu")
    assert_user_error(r, "different training run")


def test_compile_reaches_the_optimisation_loop(two_classes, tiny_model_path, tmp_path, monkeypatch):
    # the compiled path itself is exercised in test_train.py; here only that --compile gets there
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    out = tmp_path / "c.safetensors"
    r = run("finetune", two_classes, "--model", tiny_model_path, "--out", out, "--steps", 2, "--batch", 4,
            "--precision", "fp32", "--device", "cpu", "--compile")
    assert r.exit_code == 0, r.output
    assert len(compiled) == 1 and artifacts.load(out, "model").config["finetune"]["compile"] is True


# --- sampling the fine-tuned model ------------------------------------------------------------------------------


def test_sample_a_class_with_cfg_from_the_cli(cond_path, tmp_path):
    out = tmp_path / "s"
    r = run("sample", "--model", cond_path, "--class", "red", "--cfg", 0.01, "-n", 2, "--steps", 2,
            "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = (out / "index.csv").read_text().splitlines()
    assert "class" in rows[0].split(",") and all(",red," in f",{row}," for row in rows[1:])


def test_cfg_with_w_0_is_the_conditional_model_and_leaves_labels_alone(cond_path):
    model = load_model(cond_path)
    labels = torch.tensor([0, 1])
    before = labels.clone()
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    base, null = denoiser(model), model.net.cfg.num_classes - 1
    guided = classifier_free(base, labels, null, 0.0)(x, t).eps
    assert torch.allclose(guided, conditional(base, labels)(x, t).eps, atol=1e-6)
    assert torch.equal(labels, before)
    classifier_free(base, labels, null, 0.5)(x, t)
    assert torch.equal(labels, before)


def test_cfg_under_guidance_with_lambda_0_is_cfg(cond_path, tmp_path):
    """Guidance wraps any denoiser: around CFG with lambda 0 it is CFG itself, and with lambda > 0 it moves eps."""
    from ddguide.method.heads import Head, HeadConfig

    model = load_model(cond_path).requires_grad_(False)
    labels, x = torch.tensor([0, 1]), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    pixel = Head(HeadConfig("pixel", ["0", "1"], None, 3, 16), fingerprint="")  # reads x0_hat's pixels
    with torch.no_grad():
        for p in pixel.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    guides = [Guide(pixel.requires_grad_(False), 1.0, 1)]
    cfg = classifier_free(denoiser(model), labels, model.net.cfg.num_classes - 1, 2.0)
    assert torch.equal(head_guidance(cfg, model, guides, 0.0, [0, 1])(x, t).eps, cfg(x, t).eps)
    assert not torch.allclose(head_guidance(cfg, model, guides, 1.0, [0, 1])(x, t).eps, cfg(x, t).eps)


# --- bad input: one line, exit 2 -------------------------------------------------------------------------------


def test_class_not_in_the_model(cond_path, tmp_path):
    assert_user_error(run("sample", "--model", cond_path, "--class", "green", "--cfg", 0.01, "-n", 1,
                          "--steps", 2, "--out", tmp_path / "s", "--device", "cpu"), "'green'", "blue, red")


def test_a_single_class_or_no_class_is_refused(tiny_model_path, tmp_path):
    write_images(tmp_path / "one" / "red", COLOURS["red"], 2)
    assert_user_error(run("finetune", tmp_path / "one", "--model", tiny_model_path, "--out", tmp_path / "m",
                          "--device", "cpu"), "only one class")
    write_images(tmp_path / "flat", COLOURS["red"], 2)
    assert_user_error(run("finetune", tmp_path / "flat", "--model", tiny_model_path, "--out", tmp_path / "m",
                          "--device", "cpu"), "no class sub-folders")


def test_images_of_another_size_suggest_resize(tiny_model_path, tmp_path):
    for name, colour in COLOURS.items():
        write_images(tmp_path / "big" / name, colour, 1, size=20)
    out = tmp_path / "m.safetensors"
    assert_user_error(run("finetune", tmp_path / "big", "--model", tiny_model_path, "--out", out,
                          "--device", "cpu"), "20x20", "--resize")
    r = run("finetune", tmp_path / "big", "--model", tiny_model_path, "--out", out, "--resize", "resize",
            "--steps", 1, "--batch", 2, "--precision", "fp32", "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_a_conditional_model_is_not_fine_tuned_again(cond_path, two_classes, tmp_path):
    assert_user_error(run("finetune", two_classes, "--model", cond_path, "--out", tmp_path / "m",
                          "--device", "cpu"), "already class-conditional")


def test_an_unreadable_image(tiny_model_path, tmp_path):
    for name, colour in COLOURS.items():
        write_images(tmp_path / "d" / name, colour, 1)
    (tmp_path / "d" / "red" / "broken.png").write_bytes(b"not a png")
    assert_user_error(run("finetune", tmp_path / "d", "--model", tiny_model_path, "--out", tmp_path / "m",
                          "--device", "cpu"), "broken.png", "not a readable image")
