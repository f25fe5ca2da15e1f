"""extract keeps the weights autocast would cast in its dtype: the same features, half the weights' memory."""

from __future__ import annotations

import torch

from conftest import build_tiny, cli, expect_ok, shapes_data
from ddguide.core import artifacts
from ddguide.core.model import save_model
from ddguide.core.runtime import autocast, store_for_autocast


def test_stored_bf16_weights_give_the_features_autocast_gives():
    model = build_tiny(seed=3).requires_grad_(False)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 300, 999])
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(cpu, "bf16"):
        before = model.net.features(x, t, ["mid", "out.1"])
        eps_before = model(x, t)
    store_for_autocast(model, "bf16", cpu)
    assert model.net.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.net.named_parameters() if "norm" in n)
    with torch.no_grad(), autocast(cpu, "bf16"):
        after = model.net.features(x, t, ["mid", "out.1"])
        eps_after = model(x, t)
    assert all(torch.equal(before[k], after[k]) for k in before) and torch.equal(eps_before, eps_after)


def test_fp32_leaves_the_weights_alone():
    model = build_tiny(seed=3)
    store_for_autocast(model, "fp32", torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_extract_bf16_features_are_unchanged_by_the_stored_weights(tmp_path, monkeypatch):
    data = shapes_data(tmp_path, n=4)
    path = tmp_path / "m.safetensors"
    save_model(path, build_tiny(seed=1))
    args = ("extract", data / "images", "--model", path, "--blocks", "mid", "--device", "cpu", "--precision",
            "bf16")
    expect_ok(cli(*args, "--out", tmp_path / "a.safetensors"))
    monkeypatch.setattr("ddguide.stages.extract.store_for_autocast", lambda *a: None)  # autocast alone
    expect_ok(cli(*args, "--out", tmp_path / "b.safetensors"))
    a, b = (artifacts.load(tmp_path / f"{x}.safetensors", "features").tensors for x in "ab")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
