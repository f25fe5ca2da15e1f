"""`sample` outputs pinned: every mode (unguided, guided, CFG, reject) gives the images and index recorded with
the code before the sampling core was rewritten (the digests below were computed by that code path).

The digest covers each PNG's pixels and the index.csv text, so a change in any image, seed, class, head
probability or column order shows. Everything runs on the CPU in fp32 or bf16 with one thread, with models in
the NCHW layout they loaded in when the digests were recorded (the `nchw_layout` fixture);
`test_channels_last_changes_values_at_rounding_only` compares the channels_last layout models load in now.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddguide.core.model as model_module
from conftest import build_tiny, cli, expect_ok
from ddguide.core.runtime import fast_layout

pytestmark = pytest.mark.usefixtures("nchw_layout")  # every test here loads models as the digests were recorded

# mode -> sample options (beyond --model, -n, --steps, --device cpu, --out); the guided modes were recorded
# guiding at every step, before sample's default window (t >= 0.2 T), so they name --guide-window 999 0
MODES = {
    "ddim": ("--batch", 3),
    "ddpm": ("--sampler", "ddpm", "--batch", 2),
    "ddim-eta": ("--eta", 0.5, "--seed", 7),
    "guided-full": ("--guide", "{cls}", "--lambda", 1.0, "--batch", 3, "--guide-window", 999, 0),
    "guided-x0-window": ("--guide", "{cls}", "--lambda", 3.0, "--guide-grad", "x0", "--guide-window", 900, 200),
    "guided-product": ("--guide", "{cls}:0.5:0", "--guide", "{cls}:1.5", "--lambda", 2.0, "--guide-window", 999, 0),
    "guided-mask": ("--guide", "{seg}", "--mask", "{mask}", "--lambda", 0.01, "--guide-grad", "x0",
                    "--guide-window", 999, 0),
    "guided-bf16": ("--guide", "{cls}", "--lambda", 1.0, "--precision", "bf16", "--guide-window", 999, 0),
    "class": ("--model", "{cond}", "--class", "all", "--batch", 3),
    "cfg": ("--model", "{cond}", "--class", "blue_diamond", "--cfg", 2.0),
    "reject": ("--model", "{cond}", "--reject", "{rej}", "--reject-model", "{tiny}", "--threshold", 0.0795,
               "--class", "blue_diamond", "blue_square", "--batch", 3),  # about half the diamonds are rejected
}

DIGESTS = {
    "ddim": "caa05250fe85d425",
    "ddpm": "5231a660ab395f0e",
    "ddim-eta": "7a483f9693c17d01",
    "guided-full": "5e13e059c5e23d13",
    "guided-x0-window": "2b0bef2df13647d9",
    "guided-product": "969f473774bbbe8f",
    "guided-mask": "63989db0b3be5ab1",
    "guided-bf16": "606dee25fbd36ceb",
    "class": "0a63c187d69dd312",
    "cfg": "00f916380f78af39",
    "reject": "1b1657b5d02135b8",
}


def digest(folder: Path) -> str:
    h = hashlib.sha256((folder / "index.csv").read_bytes())
    for png in sorted(folder.glob("[0-9]*.png")):
        h.update(png.name.encode())
        h.update(np.asarray(Image.open(png).convert("RGB")).tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_path, nchw_layout) -> dict[str, Path]:
    """The tiny model, a 3-class conditional tiny model, a classifier, a segmentation and a rejection head."""
    from ddguide.core.model import save_model
    from ddguide.shapes.dataset import ShapesConfig, generate

    root = tmp_path_factory.mktemp("reference")
    data = generate(root / "data", ShapesConfig(n=12, size=16, seed=0))
    cond = build_tiny(seed=1, num_classes=4)  # three classes and the null label
    cond.classes = ["blue_circle", "blue_diamond", "blue_square"]  # among the rejection head's classes
    save_model(root / "cond.safetensors", cond)
    base = ("--model", tiny_model_path, "--timesteps", 300, "--device", "cpu", "--precision", "fp32")
    expect_ok(cli("extract", data / "images", *base, "--blocks", "mid", "--blocks", "out.1",
                  "--labels", data / "attributes.csv", "--label", "has_circle", "--out", root / "f.safetensors"))
    expect_ok(cli("extract", data / "images", *base, "--blocks", "mid", "--blocks", "out.1", "--masks",
                  data / "masks", "--out", root / "fm.safetensors"))
    expect_ok(cli("extract", data / "images", *base, "--blocks", "mid", "--timesteps", 800,
                  "--out", root / "fr.safetensors"))
    expect_ok(cli("train-head", root / "f.safetensors", "--steps", 30,
                  "--out", root / "cls.safetensors"))
    expect_ok(cli("train-head", root / "fm.safetensors", "--kind", "segmentation", "--steps", 10,
                  "--out", root / "seg.safetensors"))
    expect_ok(cli("train-head", root / "fr.safetensors", "--kind", "rejection", "--steps", 20,
                  "--out", root / "rej.safetensors"))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1
    Image.fromarray(mask).save(root / "mask.png")
    return {"tiny": tiny_model_path, "cond": root / "cond.safetensors", "cls": root / "cls.safetensors",
            "seg": root / "seg.safetensors", "rej": root / "rej.safetensors", "mask": root / "mask.png"}


def sample_options(mode: str, files: dict[str, Path]) -> list[str]:
    """`sample`'s options for ``mode``: its MODES entry, the tiny model unless it names one, fp32 and DDIM (the
    default sampler before DDPM measured better) unless it names others, 4 images of 4 steps on the CPU."""
    options = [str(o).format(**{k: str(v) for k, v in files.items()}) for o in MODES[mode]]
    if "--model" not in options:
        options = ["--model", str(files["tiny"]), *options]
    if "--precision" not in options:
        options += ["--precision", "fp32"]
    if "--sampler" not in options:
        options += ["--sampler", "ddim"]
    return [*options, "-n", "4", "--steps", "4", "--device", "cpu"]


@pytest.mark.parametrize("mode", list(MODES))
def test_sample_outputs_are_the_recorded_ones(mode, files, tmp_path):
    expect_ok(cli("sample", *sample_options(mode, files), "--out", tmp_path / "s"))
    assert digest(tmp_path / "s") == DIGESTS[mode], mode


def test_guidance_defaults_to_the_measured_window(files, tmp_path):
    """Without --guide-window, `sample` guides while t >= 0.2 T (core.defaults.GUIDE_FLOOR): the same images as
    --guide-window 999 200, and not those of guiding at every step (DDIM 8 has steps below t = 200)."""
    common = ["--model", str(files["tiny"]), "--guide", str(files["cls"]), "--lambda", 3.0, "--sampler", "ddim",
              "-n", 2, "--steps", 8, "--device", "cpu", "--precision", "fp32"]
    windows = {"default": [], "window": ["--guide-window", 999, 200], "every": ["--guide-window", 999, 0]}
    for name, extra in windows.items():
        expect_ok(cli("sample", *common, *extra, "--out", tmp_path / name))
    assert digest(tmp_path / "default") == digest(tmp_path / "window") != digest(tmp_path / "every")


def _images(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
                     for p in sorted(folder.glob("[0-9]*.png"))])


@pytest.mark.parametrize("mode", ["ddim", "ddpm", "guided-full", "guided-x0-window", "guided-mask", "guided-bf16"])
def test_channels_last_changes_values_at_rounding_only(mode, files, tmp_path, monkeypatch):
    """The CPU's channels_last layout (what `load_model` gives) against NCHW: the convolutions accumulate in
    another order, so values agree to float rounding. Unguided images come out the same; guided ones differ in
    a few pixels by a few grey levels, and the head probabilities in index.csv by < 1e-3."""
    out = {"nchw": tmp_path / "nchw", "channels_last": tmp_path / "channels_last"}
    expect_ok(cli("sample", *sample_options(mode, files), "--out", out["nchw"]))  # the module's NCHW layout
    monkeypatch.setattr(model_module, "fast_layout", fast_layout)  # what load_model does outside these tests
    expect_ok(cli("sample", *sample_options(mode, files), "--out", out["channels_last"]))
    diff = np.abs(_images(out["nchw"]) - _images(out["channels_last"]))
    if not mode.startswith("guided"):
        assert diff.max() == 0, mode
    assert diff.max() <= 4 and (diff > 0).mean() < 0.05, (mode, diff.max(), (diff > 0).mean())
    rows = {layout: list(csv.DictReader((out[layout] / "index.csv").open())) for layout in out}
    for ra, rb in zip(rows["nchw"], rows["channels_last"], strict=True):
        assert ra.keys() == rb.keys(), mode
        for key in ra:  # probabilities to rounding, every other column the same
            if key.endswith("prob"):
                assert abs(float(ra[key]) - float(rb[key])) < 1e-3, (mode, key, ra[key], rb[key])
            else:
                assert ra[key] == rb[key], (mode, key)
