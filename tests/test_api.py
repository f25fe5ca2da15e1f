"""The Python API (`import ddguide`) and plug-in guides: in-memory sampling equals `ddguide sample`, callables and
`--guide module:function` guide through Eq. 13, and bad plug-ins stop with one line (exit 2, nothing written)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny, cli, expect_ok, expect_user_error, shapes_data
from PIL import Image

import ddguide

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 3, "device": "cpu", "precision": "fp32"}

PLUGIN = '''
import torch

def redness(x0):
    return torch.nn.functional.logsigmoid(8 * (x0[:, 0] - (x0[:, 1] + x0[:, 2]) / 2).mean(dim=(1, 2)))

def wrong_shape(x0):
    return x0.mean(dim=(2, 3))

def nan(x0):
    return x0.sum(dim=(1, 2, 3)) * float("nan")

def detached(x0):
    return x0.detach().mean(dim=(1, 2, 3))

not_callable = 3
'''


def redness(x0: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(8 * (x0[:, 0] - (x0[:, 1] + x0[:, 2]) / 2).mean(dim=(1, 2)))


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("[0-9]*.png"))])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """The tiny model, a 3-class conditional tiny model, a classifier head and a plug-in file."""
    from ddguide.core.model import save_model

    root = tmp_path_factory.mktemp("api")
    data = shapes_data(root, n=12)
    cond = build_tiny(seed=1, num_classes=4)
    cond.classes = ["a", "b", "c"]
    save_model(root / "cond.safetensors", cond)
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--timesteps", 300, "--blocks", "mid",
                  "--labels", data / "attributes.csv", "--label", "has_circle", "--device", "cpu",
                  "--out", root / "f.safetensors"))
    expect_ok(cli("train-head", root / "f.safetensors", "--steps", 10, "--out", root / "cls.safetensors"))
    (root / "plug.py").write_text(PLUGIN)
    return {"tiny": tiny_model_path, "cond": root / "cond.safetensors", "cls": root / "cls.safetensors",
            "plug": root / "plug.py"}


# ------------------------------------------------------------------------------------------- the package


def test_import_is_lazy_and_version_unchanged():
    code = "import sys, ddguide; print('torch' in sys.modules, ddguide.__version__); ddguide.sample; " \
           "print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", ddguide.__version__, "True"], r.stderr
    r = subprocess.run([sys.executable, "-m", "ddguide", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"ddguide {ddguide.__version__}\n"
    assert {"load_model", "extract", "train_head", "sample", "fid", "SampleConfig"} <= set(dir(ddguide))
    with pytest.raises(AttributeError):
        ddguide.no_such_thing  # noqa: B018


def test_sample_returns_tensors_pil_and_numpy_and_writes_nothing(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = ddguide.sample(3, model=files["tiny"], batch=2, **FAST)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    images = ddguide.sample(3, model=files["tiny"], output="pil", **FAST)
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    u8 = ddguide.sample(3, model=files["tiny"], output="numpy", **FAST)
    assert u8.shape == (3, 16, 16, 3) and u8.dtype == np.uint8
    assert np.array_equal(u8, np.stack([np.asarray(im) for im in images]))
    result = ddguide.sample(2, model=files["tiny"], guides=[redness], output="result", **FAST)
    assert [r["index"] for r in result.rows] == [0, 1] and "guide_logp" in result.rows[0]
    assert not any(tmp_path.iterdir()), "in-memory sampling wrote files"
    with pytest.raises(TypeError, match="no_such_option"):
        ddguide.sample(1, model=files["tiny"], no_such_option=1)
    with pytest.raises(ddguide.UserError, match="unknown output"):
        ddguide.sample(1, model=files["tiny"], output="jpeg")


def test_a_loaded_model_samples_as_its_path(files):
    model = ddguide.load_model(files["tiny"], device="cpu")
    a = ddguide.sample(2, model=model, guides=[redness], **FAST)
    assert torch.equal(a, ddguide.sample(2, model=files["tiny"], guides=[redness], **FAST))
    assert all(p.requires_grad for p in model.parameters()), "the user's model keeps its requires_grad flags"


CASES = {  # name -> (API keywords, CLI options); {key} is a path from the files fixture
    "plain": ({"batch": 2}, ["--batch", 2]),
    "auto-precision": ({"precision": "auto"}, []),
    "head": ({"guides": ["{cls}"], "lam": 2.0}, ["--guide", "{cls}", "--lambda", 2.0]),
    "plugin-x0-unit": ({"guides": ["{plug}:redness"], "lam": 1.0, "guide_grad": "x0", "normalize_grad": True},
                       ["--guide", "{plug}:redness", "--lambda", 1.0, "--guide-grad", "x0", "--normalize-grad"]),
    "cfg": ({"model": "{cond}", "classes": ["b"], "cfg_scale": 1.5}, ["--model", "{cond}", "--class", "b",
                                                                       "--cfg", 1.5]),
    "particles": ({"particles": 2, "resample_every": 1, "verifier": ["{plug}:redness"]},
                  ["--particles", 2, "--resample-every", 1, "--verifier", "{plug}:redness"]),
    "search": ({"search": "best-of-n", "candidates": 2, "guides": ["{cls}", "{plug}:redness:0.5"], "lam": 0.5},
               ["--search", "best-of-n", "--candidates", 2, "--guide", "{cls}", "--guide", "{plug}:redness:0.5",
                "--lambda", 0.5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_api_images_equal_the_cli_ones(case, files, tmp_path):
    keywords, options = CASES[case]
    paths = {k: str(v) for k, v in files.items()}
    fill = lambda v: v.format(**paths) if isinstance(v, str) else [fill(e) for e in v] if isinstance(v, list) else v  # noqa: E731
    keywords = {"model": str(files["tiny"]), "device": "cpu", "precision": "fp32", **{k: fill(v) for k, v in
                                                                                         keywords.items()}}
    options = [fill(str(o)) for o in options]
    if "--model" not in options:
        options = ["--model", files["tiny"], *options]
    if keywords["precision"] == "fp32":
        options += ["--precision", "fp32"]
    expect_ok(cli("sample", *options, "-n", 3, "--steps", 3, "--device", "cpu", "--out", tmp_path / "s"))
    got = ddguide.sample(3, steps=3, output="numpy", **keywords)
    assert np.array_equal(got, pngs(tmp_path / "s")), case
    # with out=, the API writes the folder the command writes (index.csv included)
    folder = ddguide.sample(3, steps=3, out=tmp_path / "api", output="folder", **keywords)
    assert (folder / "index.csv").read_text() == (tmp_path / "s" / "index.csv").read_text()
    assert np.array_equal(pngs(folder), got)


# ------------------------------------------------------------------------------------------- plug-in guides


@pytest.mark.parametrize("grad", ["full", "x0"])
def test_a_plugin_guide_changes_images_and_lambda_0_is_unguided(grad, files):
    plain = ddguide.sample(2, model=files["tiny"], **FAST)
    zero = ddguide.sample(2, model=files["tiny"], guides=[redness], lam=0.0, guide_grad=grad, **FAST)
    guided = ddguide.sample(2, model=files["tiny"], guides=[redness], lam=3.0, guide_grad=grad, **FAST)
    assert torch.equal(zero, plain)
    assert (guided - plain).abs().max() > 1e-3
    assert float(redness(guided).mean()) > float(redness(plain).mean())  # it guides towards red
    weighted = ddguide.sample(2, model=files["tiny"], guides=[(redness, 3.0)], lam=1.0, guide_grad=grad, **FAST)
    assert torch.allclose(weighted, guided, atol=1e-5)  # weight 3 at lambda 1 is lambda 3


def test_normalize_grad_rescales_per_image(files):
    class Scaled:  # a Guide-like object: callable, with its own weight
        weight = 1.0

        def __init__(self, scale: float):
            self.scale = scale

        def __call__(self, x0: torch.Tensor) -> torch.Tensor:
            return self.scale * redness(x0)

    one = ddguide.sample(2, model=files["tiny"], guides=[Scaled(1.0)], lam=0.5, normalize_grad=True, **FAST)
    big = ddguide.sample(2, model=files["tiny"], guides=[Scaled(1e4)], lam=0.5, normalize_grad=True, **FAST)
    raw = ddguide.sample(2, model=files["tiny"], guides=[Scaled(1e4)], lam=0.5, **FAST)
    assert torch.allclose(one, big, atol=1e-4)  # the function's scale no longer matters
    assert (raw - big).abs().max() > 1e-2


def test_guide_module_function_from_the_cli(files, tmp_path, monkeypatch):
    """`--guide module:function` imports a module from the current folder; `file.py:function` equals it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ddg_cli_plugin.py").write_text(PLUGIN)
    base = ("sample", "--model", files["tiny"], "-n", 2, "--steps", 3, "--device", "cpu", "--precision", "fp32")
    expect_ok(cli(*base, "--guide", "ddg_cli_plugin:redness", "--lambda", 2, "--out", tmp_path / "m"))
    expect_ok(cli(*base, "--guide", f"{files['plug']}:redness:2", "--out", tmp_path / "f"))
    expect_ok(cli(*base, "--out", tmp_path / "u"))
    assert np.array_equal(pngs(tmp_path / "m"), pngs(tmp_path / "f"))
    assert not np.array_equal(pngs(tmp_path / "m"), pngs(tmp_path / "u"))
    index = (tmp_path / "m" / "index.csv").read_text().splitlines()
    assert "guide_logp" in index[0] and "heads:lambda=2.0:full" in index[1]


@pytest.mark.parametrize("spec, fragment", [
    ("ddg_missing_module_xyz:fn", "no module named 'ddg_missing_module_xyz'"),
    ("{plug}:no_such", "has no attribute 'no_such'"),
    ("{plug}:not_callable", "is a int, not a callable"),
    ("{plug}:wrong_shape", "shape (2, 3) for 2 images, expected (2,)"),
    ("{plug}:nan", "returned NaN or infinite values"),
    ("{plug}:detached", "do not depend on x0_hat"),
    ("missing_file.py:fn", "missing_file.py not found"),
    ("{plug}:redness:heavy", "the weight after the function must be a number"),
])
def test_bad_plugin_guides_are_one_line_exit_2_and_write_nothing(spec, fragment, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    spec = spec.format(plug=files["plug"])
    expect_user_error(cli("sample", "--model", files["tiny"], "-n", 2, "--steps", 3, "--device", "cpu",
                          "--guide", spec, "--out", out), fragment)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_bad_plugins_from_python_raise_user_errors(files):
    with pytest.raises(ddguide.UserError, match="not a number|must be a head file"):
        ddguide.sample(1, model=files["tiny"], guides=[3.0], **FAST)
    with pytest.raises(ddguide.UserError, match="returned NaN"):
        ddguide.sample(1, model=files["tiny"], guides=[lambda x0: x0.sum(dim=(1, 2, 3)) / 0 * 0], **FAST)
    with pytest.raises(ddguide.UserError, match="failed: ZeroDivisionError"):
        ddguide.sample(1, model=files["tiny"], guides=[lambda x0: 1 / 0], **FAST)


def test_a_head_spec_is_still_a_head(files, tmp_path):
    """A head path with a weight and a target is never read as module:function."""
    from ddguide.method.plugins import is_plugin_spec

    assert not is_plugin_spec(f"{files['cls']}:0.5:1") and not is_plugin_spec("heads/x.safetensors:redness")
    assert not is_plugin_spec("x.safetensors") and is_plugin_spec("pkg.mod:fn") and is_plugin_spec("a/b.py:fn")
    expect_user_error(cli("sample", "--model", files["tiny"], "--guide", "gone.safetensors:2", "--device", "cpu",
                          "--out", tmp_path / "s"), "gone.safetensors")


# ------------------------------------------------------------------------------------------- README


README_SHRINK = [(r"\bsteps=50\b", "steps=2"), (r"\bn=400\b", "n=12"), (r"\bn=16\b", "n=3"), (r"\bn=4\b", "n=2"),
                 (r"\bsteps=500\b", "steps=3")]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section has one python block"
    return blocks[0]


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    """README's snippet as written, on the shipped model, with its counts shrunk (each substitution must apply)."""
    code = readme_snippet()
    for pattern, small in README_SHRINK:
        code, count = re.subn(pattern, small, code)
        assert count, f"README's snippet no longer has {pattern}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "OMP_NUM_THREADS", "1")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "red.png").is_file() and (tmp_path / "guided" / "index.csv").is_file()
    assert (tmp_path / "heads" / "has_circle.safetensors").is_file()
