"""Shared fixtures: tiny models built and saved by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddguide.core.model import Model, save_model
from ddguide.core.presets import PRESETS
from ddguide.core.unet import UNetModel


def build_tiny(seed: int = 0, **overrides) -> Model:
    """The `tiny` preset (16 px) with random, non-zero weights."""
    import dataclasses

    preset = PRESETS["tiny"]
    cfg = dataclasses.replace(preset.unet, **overrides)
    gen = torch.Generator().manual_seed(seed)
    net = UNetModel(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return Model(net, preset.diffusion, info={"preset": "tiny"}).eval()


def shapes_data(where, n: int = 12, size: int = 16, seed: int = 0, split: str = "train") -> Path:
    """A shapes dataset (images/, attributes.csv, masks/) of ``n`` images of ``size`` px, written to
    ``where / "data"``; ``where`` is a folder or pytest's ``tmp_path_factory`` (then a fresh folder)."""
    from ddguide.shapes.dataset import ShapesConfig, generate

    folder = where.mktemp("shapes") if hasattr(where, "mktemp") else Path(where)
    return generate(folder / "data", ShapesConfig(n=n, size=size, seed=seed, split=split))


def noise_images(root: Path, n: int) -> Path:
    """``n`` random 16 px RGB images in two class folders (``a`` holds the odd ones), written under ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(path, build_tiny())
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and OpenMP spin-waits badly when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nchw_layout():
    """Models load in the NCHW layout for the module's tests (``pytestmark = pytest.mark.usefixtures("nchw_layout")``),
    as they did when its pinned digests were recorded:
    `load_model` keeps the CPU's faster channels_last layout (core.runtime.fast_layout) off, which changes values
    at float rounding only (tests/test_sample_reference.py compares the two layouts)."""
    import ddguide.core.model as model_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "fast_layout", lambda module, device: module)
        yield


# ---------------------------------------------------------------------------------- driving the CLI in-process


def cli(*args):
    """Run `ddguide ARGS` in this process (typer's CliRunner); arguments may be paths or numbers."""
    from typer.testing import CliRunner

    from ddguide.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def expect_ok(result):
    assert result.exit_code == 0, result.output
    return result


def expect_user_error(result, *fragments):
    """Exit code 2, one line, no traceback, and each fragment in the message."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text


def torchrun(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` on this host."""
    # one host: gloo on the loopback interface (the default interface may not accept local connections)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
