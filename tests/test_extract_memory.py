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


def test_fast_layout_reorders_each_weight_in_its_own_memory():
    """channels_last on the CPU without a second copy of the weights: every 4-d weight is rewritten in place
    (same values, channels_last strides, same memory); a weight two layers share is reordered once."""
    from ddguide.core.runtime import fast_layout

    model = build_tiny(seed=2)
    shared = torch.nn.Conv2d(3, 3, 3)
    net = torch.nn.Sequential(shared, torch.nn.Conv2d(3, 3, 3))
    net[1].weight = shared.weight  # tied
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    fast_layout(model, "cpu")
    fast_layout(net, "cpu")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.data_ptr() == pointers[n], n  # no new allocation
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), n
    assert net[0].weight is net[1].weight and net[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(net(x), torch.nn.functional.conv2d(torch.nn.functional.conv2d(
        x, shared.weight.contiguous(), shared.bias), shared.weight.contiguous(), net[1].bias), atol=1e-6)

    # two parameters that view the same bytes (as two names of one file tensor would): both end up on the
    # reordered bytes with the original values
    base = torch.randn(4, 3, 3, 3)
    twins = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3))
    twins[0].weight.data, twins[1].weight.data = base.view(4, 3, 3, 3), base.view(4, 3, 3, 3)
    expected = base.clone()
    fast_layout(twins, "cpu")
    for conv in twins:
        assert torch.equal(conv.weight, expected) and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_loading_a_model_leaves_its_file_unchanged(tmp_path):
    """The in-place reordering writes to the file's private mapping, never to the file."""
    import hashlib

    from ddguide.core.model import load_model

    path = tmp_path / "m.safetensors"
    save_model(path, build_tiny(seed=4))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_model(path)
    conv = model.net.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    again = load_model(path)  # and reads back the same values
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
