"""Multi-process runs under `torchrun` on one CPU host (gloo): DDP training and sharded feature extraction."""

from __future__ import annotations

import pytest
import torch

from conftest import noise_images, torchrun
from ddguide.core import artifacts
from ddguide.core.checkpoint import checkpoint_path
from ddguide.stages.extract import ExtractConfig, extract


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Ten 16 px images in two class folders."""
    return noise_images(tmp_path_factory.mktemp("ranks") / "images", 10)


RANK_SCRIPT = """
import sys
import torch
from pathlib import Path
from ddguide.core import artifacts
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.runtime import process_shard
from ddguide.stages.train import TrainConfig, train, train_recipe
from ddguide.stages.training import Recipe, fit
from ddguide.core.presets import PRESETS
from ddguide.core.unet import UNetModel

images, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
train(TrainConfig(data=images, out=out, preset="tiny", device="cpu",
                  recipe=train_recipe(steps=steps, batch=4, checkpoint_every=2, precision="fp32")))

torch.manual_seed(0)
net = UNetModel(PRESETS["tiny"].unet)
pixels = torch.randint(0, 255, (6, 16, 16, 3), dtype=torch.uint8)
recipe = Recipe(steps=3, batch=4, lr=1e-3, warmup=0, ema_decay=0.9, grad_clip=1.0, precision="fp32",
                checkpoint_every=3)
fit(net, DiffusionConfig(1000, "linear"), recipe, Path(out + ".probe.ckpt"), {"probe": 1},
    torch.Generator().manual_seed(0), lambda: (pixels, None), torch.device("cpu"))
artifacts.save(f"{out}.rank{process_shard()[0]}", dict(net.state_dict()), kind="checkpoint", config={},
               fingerprint="")
"""


def test_ddp_training_keeps_ranks_in_step_and_writes_one_model(images, tmp_path):
    script, out = tmp_path / "ranks.py", tmp_path / "ddp.safetensors"
    script.write_text(RANK_SCRIPT)
    r = torchrun(script, images, out, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    # the gradients are averaged over the ranks, so both hold the same weights after every step
    a = artifacts.load(f"{out}.rank0", "checkpoint").tensors
    b = artifacts.load(f"{out}.rank1", "checkpoint").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one artifact, written by rank 0; the checkpoint holds both ranks' generator states
    assert artifacts.load(out, "model").config["trained_steps"] == 4
    ckpt = artifacts.load(checkpoint_path(out), "checkpoint")
    assert {"rng", "rng.1"} <= set(ckpt.tensors) and not torch.equal(ckpt.tensors["rng"], ckpt.tensors["rng.1"])
    # rerunning with more steps continues from that checkpoint
    r = torchrun(script, images, out, 6)
    assert r.returncode == 0, r.stderr[-3000:]
    assert artifacts.load(out, "model").config["trained_steps"] == 6
    assert len(artifacts.load(checkpoint_path(out), "checkpoint").tensors["losses"]) == 6


def test_sharded_extract_equals_one_process(images, tiny_model_path, tmp_path):
    whole = extract(ExtractConfig(data=str(images), out=str(tmp_path / "whole.safetensors"), model=str(tiny_model_path),
                                  blocks=("mid", "out.2"), timesteps=(10, 500), noise="fixed", batch=3, device="cpu"))
    out = tmp_path / "sharded.safetensors"
    r = torchrun("-m", "ddguide", "extract", images, "--out", out, "--model", tiny_model_path, "--blocks", "mid",
                 "--blocks", "out.2", "--timesteps", 10, "--timesteps", 500, "--noise", "fixed", "--batch", 3,
                 "--device", "cpu", "--precision", "fp32")  # the API's default, as `whole` above
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = artifacts.load(whole, "features"), artifacts.load(out, "features")
    assert a.config == b.config and a.fingerprint == b.fingerprint and set(a.tensors) == set(b.tensors)
    for k in a.tensors:  # image k gets the same noise whichever rank computes it
        assert torch.allclose(a.tensors[k].float(), b.tensors[k].float(), atol=1e-5), k
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == []  # the parts are gone


STREAM_SCRIPT = """
import sys
import torch
from pathlib import Path
from ddguide.core import artifacts
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.presets import PRESETS
from ddguide.core.runtime import process_shard
from ddguide.core.unet import UNetModel
from ddguide.stages.training import Recipe, fit

out, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
net = UNetModel(PRESETS["tiny"].unet)
pixels = torch.randint(0, 255, (6, 16, 16, 3), dtype=torch.uint8)
recipe = Recipe(steps=steps, batch=4, lr=1e-3, warmup=0, precision="fp32", checkpoint_every=2, report_every=50,
                device_stream=True)
fit(net, DiffusionConfig(1000, "linear"), recipe, Path(out), {"stream": 1}, torch.Generator().manual_seed(0),
    lambda: (pixels, None), torch.device("cpu"))
artifacts.save(f"{out}.rank{process_shard()[0]}", dict(net.state_dict()), kind="checkpoint", config={},
               fingerprint="")
"""


def test_ddp_with_the_device_stream_keeps_each_ranks_stream(tmp_path):
    script, ckpt = tmp_path / "stream.py", tmp_path / "s.ckpt.safetensors"
    script.write_text(STREAM_SCRIPT)
    for steps in (3, 5):  # the second run resumes from the checkpoint at step 3
        r = torchrun(script, ckpt, steps)
        assert r.returncode == 0, r.stderr[-3000:]
        a = artifacts.load(f"{ckpt}.rank0", "checkpoint").tensors
        b = artifacts.load(f"{ckpt}.rank1", "checkpoint").tensors
        assert all(torch.equal(a[k], b[k]) for k in a)  # the losses are read together, the ranks stay in step
        t = artifacts.load(ckpt, "checkpoint").tensors
        assert not torch.equal(t["rng.device"], t["rng.device.1"])  # each rank its own device stream
        assert len(t["losses"]) == steps and bool(torch.isfinite(t["losses"]).all())
