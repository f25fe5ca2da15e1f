"""Real SIGKILLs of the writers that tests/test_hardening.py does not kill (issue 20: "kill tests for every writer").

Each test starts ``ddguide`` in a subprocess and kills it with SIGKILL, either

- at a moment its progress lines say it is mid-work (``DDGUIDE_PROGRESS_SECONDS=0``: one line per update), or
- at a staged moment: a hook in the child (:data:`HOOK`, which then runs ``python -m ddguide`` unchanged) holds
  the process at the rename that would publish its output, or its n-th checkpoint, with the temporary already
  written; the test kills it there.

Then the output path holds nothing or the previous complete file, the rerun succeeds and leaves no temporaries,
and a resumed ``finetune`` or ``cas`` ends with the same tensors as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, cli, expect_ok, shapes_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DDGUIDE_PROGRESS_SECONDS": "0"}

# Run `python -m ddguide ARGS`, but hold the process (forever) at the DDGUIDE_KILL_AT_NTH-th os.replace/os.rename
# onto DDGUIDE_KILL_AT, after creating DDGUIDE_KILL_MARKER: the moment between "temporary written" and "published".
HOOK = r"""
import os, runpy, sys, time
target, nth = os.environ["DDGUIDE_KILL_AT"], int(os.environ["DDGUIDE_KILL_AT_NTH"])
marker = os.environ["DDGUIDE_KILL_MARKER"]
seen = [0]
def holding(real):
    def rename(src, dst, *args, **kwargs):
        if os.path.abspath(os.fspath(dst)) == target:
            seen[0] += 1
            if seen[0] == nth:
                open(marker, "w").close()
                time.sleep(3600)
        return real(src, dst, *args, **kwargs)
    return rename
os.replace, os.rename = holding(os.replace), holding(os.rename)
sys.argv = ["ddguide", *sys.argv[1:]]
runpy.run_module("ddguide", run_name="__main__", alter_sys=True)
"""


class Child:
    """``ddguide ARGS`` in a subprocess, its stderr (the progress lines) in ``logs``; with ``hold_at``, held at
    the ``nth`` rename onto that path."""

    def __init__(self, logs: Path, *args, hold_at: Path | None = None, nth: int = 1):
        logs.mkdir(exist_ok=True)
        self.stderr, self.marker = logs / "stderr.txt", logs / "held"
        env = dict(ENV)
        command = [sys.executable, "-m", "ddguide"]
        if hold_at is not None:
            env.update(DDGUIDE_KILL_AT=os.path.abspath(hold_at), DDGUIDE_KILL_AT_NTH=str(nth),
                       DDGUIDE_KILL_MARKER=str(self.marker))
            command = [sys.executable, "-c", HOOK]
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(command + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=err,
                                         env=env)

    def lines(self) -> list[str]:
        return self.stderr.read_text(errors="replace").splitlines()

    def kill_when(self, ready, timeout: float = 120.0) -> None:
        """SIGKILL the child as soon as ``ready()`` is true, or fail if it ends first."""
        t0 = time.monotonic()
        while not ready():
            assert self.proc.poll() is None, f"ended (exit {self.proc.returncode}) before the kill: {self.lines()}"
            assert time.monotonic() - t0 < timeout, f"never got to the kill: {self.lines()}"
            time.sleep(0.01)
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL

    def kill_when_held(self) -> None:
        self.kill_when(self.marker.exists)

    def kill_in_background(self, ready) -> "Child":
        """:meth:`kill_when` in a thread, so the test can run the uninterrupted run meanwhile; :meth:`join`."""
        def watch():
            try:
                self.kill_when(ready)
            except BaseException as e:  # noqa: BLE001 - re-raised by join
                self.error = e
        self.error: BaseException | None = None
        self.watcher = threading.Thread(target=watch, daemon=True)
        self.watcher.start()
        return self

    def join(self) -> None:
        self.watcher.join()
        if self.error is not None:
            raise self.error


def progressed(child: Child, prefix: str, at_least: int = 1):
    """A kill trigger: a progress line ``PREFIX done/total`` with ``done >= at_least``."""
    def ready() -> bool:
        for line in child.lines():
            if line.startswith(prefix):
                done = line[len(prefix):].split("/")[0].split()[-1]
                if done.isdigit() and int(done) >= at_least:
                    return True
        return False
    return ready


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def hidden(folder: Path) -> list[str]:
    """Temporaries, staging folders and locks anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def same_tensors(a: Path, b: Path) -> None:
    from ddguide.core import artifacts

    ta, tb = artifacts.load(a).tensors, artifacts.load(b).tensors
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_data(tmp_path_factory)


@pytest.fixture(scope="module")
def features(tiny_model_path, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kills") / "f.safetensors"
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10,
                  "--device", "cpu", "--out", out))
    return out


@pytest.fixture(scope="module")
def head(features, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kills") / "h.safetensors"
    expect_ok(cli("train-head", features, "--kind", "rejection", "--steps", 2, "--out", out))
    return out


# ----------------------------------------------------------------------------------------------- killed mid-work


def test_killed_extract_mid_stream_keeps_the_earlier_file(tiny_model_path, data, tmp_path):
    many = shapes_data(tmp_path / "many", n=150, seed=1)
    w = tmp_path / "w"
    w.mkdir()
    out = w / "f.safetensors"
    base = ["extract", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10, "--device", "cpu",
            "--precision", "fp32", "--out", out]
    expect_ok(cli(*base[:1], data / "images", *base[1:]))
    before = out.read_bytes()
    child = Child(tmp_path / "logs", *base[:1], many / "images", *base[1:], "--batch", 1)
    # features stream into the temporary: kill once a few batches are in it
    child.kill_when(lambda: progressed(child, "extracting", 3)() and any(w.glob(".tmp-f.safetensors.*")))
    assert out.read_bytes() == before  # the earlier, complete file
    assert any(n.startswith(".tmp-f.safetensors.") for n in names(w))  # the half-written stream, beside it
    expect_ok(cli(*base[:1], many / "images", *base[1:], "--batch", 8))
    assert names(w) == ["f.safetensors"]
    from ddguide.core import artifacts

    assert artifacts.load(out).config["count"] == 150


def test_killed_cas_mid_epoch_resumes_to_the_same_report(data, tmp_path):
    images = data / "images"
    args = ["cas", "--train", images, "--test", images, "--epochs", 2, "--batch", 2, "--milestones", 1, 2,
            "--device", "cpu", "--seed", 3]
    w = tmp_path / "w"
    out, ckpt = w / "r.safetensors", w / "r.ckpt.safetensors"
    child = Child(tmp_path / "logs", *args, "--out", out)
    # past the checkpoint of epoch 1, inside epoch 2
    child.kill_in_background(lambda: ckpt.exists() and any("epoch 2/2" in line for line in child.lines()))
    whole = tmp_path / "whole" / "r.safetensors"
    expect_ok(cli(*args, "--out", whole))  # the uninterrupted run, meanwhile
    child.join()
    assert not out.exists()
    from ddguide.core import artifacts

    assert artifacts.load(ckpt, "checkpoint").config["step"] in (1, 2)  # 2 only on a machine slow to kill
    r = expect_ok(cli(*args, "--out", out))
    same_tensors(out, whole)  # per-class accuracy and the loss of every epoch
    assert artifacts.load(out).config["metrics"] == artifacts.load(whole).config["metrics"], r.output
    assert names(w) == ["r.safetensors"]  # the checkpoint is removed once the report is written


# ----------------------------------------------------------------------------------------- killed at a staged moment


def test_killed_finetune_while_writing_a_checkpoint_resumes_to_the_same_model(tiny_model_path, data, tmp_path):
    args = ["finetune", data / "images", "--model", tiny_model_path, "--steps", 6, "--batch", 2,
            "--checkpoint-every", 2, "--precision", "fp32", "--device", "cpu"]
    w = tmp_path / "w"
    out, ckpt = w / "c.safetensors", w / "c.ckpt.safetensors"
    child = Child(tmp_path / "logs", *args, "--out", out, hold_at=ckpt, nth=2)  # held at step 4's checkpoint
    whole = tmp_path / "whole" / "c.safetensors"
    expect_ok(cli(*args, "--out", whole))  # the uninterrupted run, meanwhile
    child.kill_when_held()
    assert not out.exists()
    from ddguide.core import artifacts

    assert artifacts.load(ckpt, "checkpoint").config["step"] == 2  # the one before, intact
    assert [n for n in names(w) if n.startswith(".tmp-c.ckpt.safetensors.")]  # the new one, never renamed
    expect_ok(cli(*args, "--out", out))
    same_tensors(out, whole)
    assert artifacts.load(out).config["trained_steps"] == 6
    assert names(w) == ["c.ckpt.safetensors", "c.loss.png", "c.safetensors"]


def test_killed_train_head_before_its_rename_keeps_the_earlier_head(features, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    out = w / "h.safetensors"
    base = ["train-head", features, "--kind", "rejection", "--steps", 3, "--out", out]
    expect_ok(cli(*base, "--seed", 0))
    before = out.read_bytes()
    child = Child(tmp_path / "logs", *base, "--seed", 1, hold_at=out)
    child.kill_when_held()
    assert out.read_bytes() == before
    assert [n for n in names(w) if n.startswith(".tmp-h.safetensors.")]
    expect_ok(cli(*base, "--seed", 1))
    assert names(w) == ["h.safetensors"] and out.read_bytes() != before


def test_killed_filter_before_its_rename_leaves_no_folder(tiny_model_path, data, head, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    out = w / "kept"
    args = ["filter", data, "--head", head, "--model", tiny_model_path, "--threshold", 0, "--device", "cpu",
            "--out", out]
    child = Child(tmp_path / "logs", *args, hold_at=out)  # the staging folder, complete, renamed onto `kept`
    child.kill_when_held()
    assert not out.exists()
    assert [n for n in names(w) if n.startswith(".kept.ddguide-staging-")]
    expect_ok(cli(*args))
    assert names(w) == ["kept"] and not hidden(out)
    assert (out / "index.csv").is_file() and len(list((out / "images").rglob("*.png"))) == 12


def test_killed_convert_before_its_rename_keeps_the_earlier_model(tiny_model_path, tmp_path):
    from ddguide.core.model import save_model

    other = tmp_path / "other.safetensors"
    save_model(other, build_tiny(seed=1))
    w = tmp_path / "w"
    w.mkdir()
    out = w / "m.safetensors"
    expect_ok(cli("convert", other, "--preset", "tiny", "--out", out))
    before = out.read_bytes()
    child = Child(tmp_path / "logs", "convert", tiny_model_path, "--preset", "tiny", "--out", out, hold_at=out)
    child.kill_when_held()
    assert out.read_bytes() == before
    expect_ok(cli("convert", tiny_model_path, "--preset", "tiny", "--out", out))
    assert names(w) == ["m.safetensors"]
    same_tensors(out, tiny_model_path)


def test_killed_fid_save_stats_before_its_rename_keeps_the_earlier_stats(tiny_model_path, data, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    out = w / "s.safetensors"
    few = tmp_path / "few"  # another image set, flat
    few.mkdir()
    for f in sorted((data / "images").rglob("*.png"))[:4]:
        (few / f.name).write_bytes(f.read_bytes())
    base = ["fid", "--features", "denoiser", "--model", tiny_model_path, "--device", "cpu", "--save-stats", out]
    expect_ok(cli(base[0], data / "images", *base[1:]))
    before = out.read_bytes()
    child = Child(tmp_path / "logs", base[0], few, *base[1:], hold_at=out)
    child.kill_when_held()
    assert out.read_bytes() == before
    expect_ok(cli(base[0], few, *base[1:]))
    assert names(w) == ["s.safetensors"] and out.read_bytes() != before
