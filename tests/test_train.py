"""`ddguide train` on a tiny model: artifact contents, resume after a kill, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ddguide import artifacts
from ddguide.cli import app
from ddguide.train import TrainConfig, checkpoint_path, train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def cfg(images, out, **kw):
    return TrainConfig(data=str(images), out=str(out), preset="tiny", steps=6, batch=4, checkpoint_every=2,
                       precision="fp32", device="cpu", **kw)


def test_training_writes_ema_weights_config_and_loss_curve(images, tmp_path):
    out = tmp_path / "m.safetensors"
    train(cfg(images, out))
    art = artifacts.load(out, "model")
    assert art.config["preset"] == "tiny" and art.config["trained_steps"] == 6
    assert art.config["train"]["batch"] == 4 and art.fingerprint == artifacts.fingerprint(art.tensors)
    assert (tmp_path / "m.loss.png").is_file() and checkpoint_path(out).is_file()


def test_a_killed_run_resumes_to_the_same_weights(images, tmp_path):
    whole, killed = tmp_path / "whole.safetensors", tmp_path / "killed.safetensors"
    train(cfg(images, whole))

    def kill_at_5(done, total, info):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(images, killed), progress=kill_at_5)
    assert not killed.exists()
    assert artifacts.load(checkpoint_path(killed), "checkpoint").config["step"] == 4
    steps = []
    train(cfg(images, killed), progress=lambda done, total, info: steps.append(done))
    assert steps == [5, 6]  # continued from the checkpoint at step 4
    a, b = artifacts.load(whole, "model").tensors, artifacts.load(killed, "model").tensors
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_checkpoint_of_another_run_is_refused(images, tmp_path):
    out = tmp_path / "m.safetensors"
    train(cfg(images, out))
    r = CliRunner().invoke(app, ["train", str(images), "--out", str(out), "--preset", "tiny", "--steps", "8",
                                 "--batch", "4", "--lr", "1e-3", "--device", "cpu"])
    assert r.exit_code == 2 and "different training run" in r.output


def test_init_starts_from_a_model(images, tmp_path):
    first = tmp_path / "first.safetensors"
    train(cfg(images, first))
    train(cfg(images, tmp_path / "second.safetensors", init=str(first)))
    assert artifacts.load(tmp_path / "second.safetensors", "model").config["train"]["init"] == str(first)


def _train_cli(folder, tmp_path, *extra):
    return CliRunner().invoke(app, ["train", str(folder), "--out", str(tmp_path / "m.safetensors"), "--preset",
                                    "tiny", "--steps", "1", "--batch", "2", "--device", "cpu", *extra])


def one_line_error(r, fragment):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert fragment in r.output


def test_bad_training_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(_train_cli(empty, tmp_path), "holds no images")
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(broken / "a.png")
    (broken / "b.png").write_bytes((broken / "a.png").read_bytes()[:40])  # truncated
    one_line_error(_train_cli(broken, tmp_path), "not a readable image")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(mixed / "b.png")
    one_line_error(_train_cli(mixed, tmp_path), "--resize")
    assert not (tmp_path / "m.safetensors").exists()  # nothing written by the refused runs
    assert _train_cli(mixed, tmp_path, "--resize", "center-crop").exit_code == 0
    assert (tmp_path / "m.safetensors").is_file()


# --- torchrun: DDP over two CPU processes (gloo) ------------------------------------------------------------

RANK_SCRIPT = """
import sys
import torch
from ddguide import artifacts
from ddguide.diffusion import DiffusionConfig
from ddguide.models import process_shard
from ddguide.train import Recipe, TrainConfig, fit, train
from ddguide.unet import PRESETS, UNetModel

images, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
train(TrainConfig(data=images, out=out, preset="tiny", steps=steps, batch=4, checkpoint_every=2,
                  precision="fp32", device="cpu"))

class Key:
    def identity(self):
        return {"probe": 1}

torch.manual_seed(0)
net = UNetModel(PRESETS["tiny"].unet)
pixels = torch.randint(0, 255, (6, 16, 16, 3), dtype=torch.uint8)
recipe = Recipe(steps=3, batch=4, lr=1e-3, warmup=0, ema_decay=0.9, grad_clip=1.0, precision="fp32",
                checkpoint_every=3)
ema, _ = fit(net, DiffusionConfig(1000, "linear"), recipe, __import__("pathlib").Path(out + ".probe.ckpt"), Key(),
             torch.Generator().manual_seed(0), lambda: (pixels, None), torch.device("cpu"))
artifacts.save(f"{out}.rank{process_shard()[0]}", dict(net.state_dict()), kind="checkpoint", config={},
               fingerprint="")
"""


def _torchrun(tmp_path, images, out, steps):
    import os
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    # one host: gloo on the loopback interface (the default interface may not accept local connections)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(images), str(out), str(steps)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_torchrun_trains_one_model_with_synchronised_ranks(images, tmp_path):
    out = tmp_path / "ddp.safetensors"
    r = _torchrun(tmp_path, images, out, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    # the gradients are averaged over the ranks, so both hold the same weights after every step
    a = artifacts.load(f"{out}.rank0", "checkpoint").tensors
    b = artifacts.load(f"{out}.rank1", "checkpoint").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one artifact, written by rank 0; the checkpoint holds both ranks' generator states
    art = artifacts.load(out, "model")
    assert art.config["trained_steps"] == 4
    ckpt = artifacts.load(checkpoint_path(out), "checkpoint")
    assert {"rng", "rng.1"} <= set(ckpt.tensors) and not torch.equal(ckpt.tensors["rng"], ckpt.tensors["rng.1"])
    # rerunning with more steps continues from that checkpoint
    r = _torchrun(tmp_path, images, out, 6)
    assert r.returncode == 0, r.stderr[-3000:]
    assert artifacts.load(out, "model").config["trained_steps"] == 6
    assert len(artifacts.load(checkpoint_path(out), "checkpoint").tensors["losses"]) == 6
