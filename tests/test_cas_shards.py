"""CAS over many processes: `--shard 0/2` + `--shard 1/2` (joined by the last shard or by `ddguide merge`) test with
the classifier trained before and write the report one process writes; two torchrun processes train one classifier
with DDP (each batch is the one-process batch cut in two), resume exactly, and gather their test predictions."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from test_cas import COLOURS, write_images

from conftest import cli, expect_ok, expect_user_error, torchrun
from ddguide.core import artifacts
from ddguide.core.checkpoint import RunState
from ddguide.stages.cas import CasConfig, LabelledSet, train_epochs

BASE = ("--batch", 8, "--milestones", 1, 5, "--mixup-cutmix", 0.5, "--device", "cpu")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    """Two noisy colours, 16 px: 12 training images each; 5 + 4 test images (9 split 4 + 5 over two shards)."""
    root = tmp_path_factory.mktemp("cas_shards")
    for k, (name, colour) in enumerate(COLOURS.items()):
        write_images(root / "train" / name, colour, 12, seed=k)
        write_images(root / "test" / name, colour, 5 - k, seed=10 + k)
    return root / "train", root / "test"


def cas_args(sets, out, *more):
    return ("cas", "--train", sets[0], "--test", sets[1], *BASE, "--out", out, *more)


def ckpt(out: Path) -> Path:
    return out.with_name(out.stem + ".ckpt.safetensors")


def same_report(a: Path, b: Path) -> None:
    """Two reports agree on every score and tensor (per-class accuracy, losses, each image's predictions) and on
    the options, but for where they were written and whether the checkpoint was kept."""
    x, y = artifacts.load(a, "report"), artifacts.load(b, "report")
    assert set(x.tensors) == {"per_class_accuracy", "epoch_loss", "predictions", "labels"} == set(y.tensors)
    for k in x.tensors:
        assert torch.equal(x.tensors[k], y.tensors[k]), k
    for key in ("metrics", "classes", "train_classes"):
        assert x.config[key] == y.config[key], key
    mine = ("out", "keep_checkpoint")
    assert {k: v for k, v in x.config["cas"].items() if k not in mine} == \
        {k: v for k, v in y.config["cas"].items() if k not in mine}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or "lock" in p.name)


# ------------------------------------------------------------------------------------------------ --shard I/N


def test_shards_test_the_trained_classifier_and_join_into_the_one_process_report(sets, tmp_path):
    one = tmp_path / "one.safetensors"
    expect_ok(cli(*cas_args(sets, one, "--epochs", 2, "--keep-checkpoint")))

    # training is one job: a shard without the finished checkpoint writes nothing
    two = tmp_path / "two.safetensors"
    expect_user_error(cli(*cas_args(sets, two, "--epochs", 2, "--shard", "0/2")), "--shard 0/2", "is not there",
                      "train first: rerun without --shard, or under torchrun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.ckpt.safetensors", "one.safetensors"]
    expect_user_error(cli(*cas_args(sets, two, "--epochs", 2, "--shard", "2/2")), "--shard 2/2", "0 <= i < n")

    shutil.copy(ckpt(one), ckpt(two))
    expect_user_error(cli(*cas_args(sets, two, "--epochs", 3, "--shard", "0/2")), "reached epoch 2 of 3",
                      "train first")
    first = expect_ok(cli(*cas_args(sets, two, "--epochs", 2, "--shard", "0/2")))
    assert "wrote shard 0/2" in " ".join(first.output.split()) and ckpt(two).exists() and not two.exists()
    last = expect_ok(cli(*cas_args(sets, two, "--epochs", 2, "--shard", "1/2")))
    assert "top-1" in last.output and "class red" in last.output
    same_report(one, two)
    assert artifacts.load(two, "report").tensors["predictions"].shape == (9, 2)
    assert not ckpt(two).exists() and leftovers(tmp_path) == []  # joined: the parts and the checkpoint are gone


def test_merge_joins_report_parts_written_apart(sets, tmp_path):
    one = tmp_path / "one.safetensors"
    expect_ok(cli(*cas_args(sets, one, "--epochs", 1, "--keep-checkpoint")))
    here, elsewhere = tmp_path / "here.safetensors", tmp_path / "elsewhere" / "here.safetensors"
    elsewhere.parent.mkdir()
    for out in (here, elsewhere):
        shutil.copy(ckpt(one), ckpt(out))
    expect_ok(cli(*cas_args(sets, here, "--epochs", 1, "--shard", "1/2", "--keep-checkpoint")))
    expect_ok(cli(*cas_args(sets, elsewhere, "--epochs", 1, "--shard", "0/2", "--keep-checkpoint")))
    expect_user_error(cli("merge", here), "1 of 2 parts missing", "--shard 0/2")
    shutil.move(elsewhere.with_name("here.part0of2.safetensors"), tmp_path)
    r = expect_ok(cli("merge", here))
    assert "joined 2 parts" in r.output and "report, 9 images" in r.output
    same_report(one, here)
    assert ckpt(here).exists()  # --keep-checkpoint: kept after the join
    assert not [name for name in leftovers(tmp_path) if ".part" in name]


def test_parts_of_another_classifier_are_refused(sets, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out, seed in ((a, 0), (b, 1)):
        expect_ok(cli(*cas_args(sets, out, "--epochs", 1, "--seed", seed, "--keep-checkpoint")))
    expect_ok(cli(*cas_args(sets, a, "--epochs", 1, "--shard", "0/2")))
    expect_ok(cli(*cas_args(sets, b, "--epochs", 1, "--seed", 1, "--shard", "1/2")))
    shutil.move(tmp_path / "b.part1of2.safetensors", tmp_path / "a.part1of2.safetensors")
    expect_user_error(cli("merge", a), "a.part1of2.safetensors", "different cas runs")


def test_a_batch_too_small_for_the_processes(sets, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expect_user_error(cli("cas", "--train", sets[0], "--test", sets[1], "--batch", 3, "--device", "cpu", "--out",
                          tmp_path / "r.safetensors"), "--batch 3", "2 processes", "--batch 4")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ torchrun

RANK_SCRIPT = """
import sys
import torch
from typer.testing import CliRunner
from ddguide.cli import app
from ddguide.core import artifacts
from ddguide.core.checkpoint import RunState
from ddguide.core.runtime import process_shard, resolve_shard
from ddguide.stages.cas import CasConfig, LabelledSet, train_epochs

train, test, tmp = sys.argv[1:4]
rank = process_shard()[0]
torch.set_num_threads(1)
base = ["cas", "--train", train, "--test", test, "--batch", "8", "--milestones", "1", "5", "--mixup-cutmix", "0.5",
        "--device", "cpu", "--keep-checkpoint"]
for epochs, out in ((2, "straight"), (1, "resumed"), (2, "resumed")):
    r = CliRunner().invoke(app, base + ["--epochs", str(epochs), "--out", f"{tmp}/{out}.safetensors"])
    print(f"[rank {rank} exit {r.exit_code}] {' '.join(r.output.split())}", flush=True)

# a network without BatchNorm: the ranks' slices of each batch give the one-process gradient
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
images, labels = torch.randint(0, 256, (22, 16, 16, 3), dtype=torch.uint8), torch.arange(22) % 2
cfg = CasConfig(train=["-"], test="-", epochs=2, batch=7, milestones=[1, 5], mixup_cutmix=0.5, device="cpu")
train_epochs(cfg, net, torch.optim.Adam(net.parameters(), lr=1e-3), torch.Generator().manual_seed(0), RunState(),
             LabelledSet(images, labels), torch.device("cpu"), shard=resolve_shard())
artifacts.save(f"{tmp}/linear.rank{rank}", dict(net.state_dict()), kind="checkpoint", config={}, fingerprint="")
"""


def test_torchrun_trains_with_ddp_resumes_and_gathers_the_test(sets, tmp_path):
    script, runs = tmp_path / "ranks.py", tmp_path / "runs"
    script.write_text(RANK_SCRIPT)
    runs.mkdir()
    r = torchrun(script, *sets, runs)
    assert r.returncode == 0, r.stderr[-3000:]
    # the two ranks share stdout: a record ends at a newline or where the other rank's record begins
    lines = [(rank, code, text.strip()) for rank, code, text in
             re.findall(r"\[rank (\d) exit (\d+)\]([^\n]*?)(?=\[rank \d exit|\n|$)", r.stdout)]
    assert sorted((rank, code) for rank, code, _ in lines) == [("0", "0")] * 3 + [("1", "0")] * 3, r.stdout
    assert all("top-1" in text for rank, _, text in lines if rank == "0")
    assert all(text == "" for rank, _, text in lines if rank == "1")  # rank 0 alone reports

    # rank 0 wrote one report and one checkpoint per run, nothing else; every rank draws one random stream
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["linear.rank0", "linear.rank1", "resumed.ckpt.safetensors", "resumed.safetensors",
         "straight.ckpt.safetensors", "straight.safetensors"])
    straight = artifacts.load(runs / "straight.ckpt.safetensors", "checkpoint")
    resumed = artifacts.load(runs / "resumed.ckpt.safetensors", "checkpoint")
    assert straight.config["step"] == 2 and "rng.1" not in straight.tensors
    assert set(straight.tensors) == set(resumed.tensors)
    for k in straight.tensors:  # 1 epoch, then resumed to 2: the run of 2 epochs
        assert torch.equal(straight.tensors[k], resumed.tensors[k]), k
    same_report(runs / "straight.safetensors", runs / "resumed.safetensors")

    # the gathered test is one process's test of the same classifier
    one = tmp_path / "one.safetensors"
    shutil.copy(runs / "straight.ckpt.safetensors", ckpt(one))
    expect_ok(cli(*cas_args(sets, one, "--epochs", 2, "--keep-checkpoint")))
    same_report(runs / "straight.safetensors", one)

    # without BatchNorm the two ranks' training is one process's, to float rounding
    a, b = (artifacts.load(runs / f"linear.rank{k}", "checkpoint").tensors for k in (0, 1))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    images, labels = torch.randint(0, 256, (22, 16, 16, 3), dtype=torch.uint8), torch.arange(22) % 2
    cfg = CasConfig(train=["-"], test="-", epochs=2, batch=7, milestones=[1, 5], mixup_cutmix=0.5, device="cpu")
    train_epochs(cfg, net, torch.optim.Adam(net.parameters(), lr=1e-3), torch.Generator().manual_seed(0),
                 RunState(), LabelledSet(images, labels), torch.device("cpu"))
    for k, v in net.state_dict().items():
        assert torch.equal(a[k], b[k]), k
        assert torch.allclose(a[k], v, rtol=1e-4, atol=1e-6), (k, (a[k] - v).abs().max())
