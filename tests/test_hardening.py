"""Writers under kills, a full disk and a second writer; awkward but legitimate inputs (issue 20, "Hardening").

A killed, failed or full-disk run leaves either the previous content or a state the next run resumes; reruns
remove the temporaries a killed run left; a second writer on the same output is refused with one line.
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, expect_ok, expect_user_error, shapes_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DDGUIDE_PROGRESS_SECONDS": "1000"}


def start(*args, limit_file_bytes: int | None = None) -> subprocess.Popen:
    def limits():
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.Popen([sys.executable, "-m", "ddguide", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=limits)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (the run is writing), or fail if it ends first."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "never got to the point of the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith((".tmp-", ".")) and "ddguide" in p.name
                  or p.name.startswith(".tmp-"))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def consistent_samples(folder: Path) -> list[str]:
    """The index lists exactly the PNGs of the folder (besides grid.png)."""
    import csv

    with open(folder / "index.csv") as f:
        listed = [row["file"] for row in csv.DictReader(f)]
    pngs = sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
    assert sorted(listed) == pngs, (listed, pngs)
    return listed


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_data(tmp_path_factory)


# ----------------------------------------------------------------------------------------------- kills


def test_killed_sample_over_an_earlier_run_leaves_it_intact(tiny_model_path, tmp_path):
    out = tmp_path / "s"
    base = ["sample", "--model", tiny_model_path, "--steps", 40, "--batch", 1, "--device", "cpu", "--out", out]
    expect_ok(cli(*base, "-n", 3, "--seed", 0))
    before = files_of(out)
    proc = start(*base, "-n", 200, "--seed", 5)
    kill_when(proc, lambda: any(len(list(d.glob("*.png"))) >= 2 for d in tmp_path.glob(".s.ddguide-staging-*")))
    assert files_of(out) == before  # the earlier run, untouched
    expect_ok(cli(*base, "-n", 2, "--seed", 5))  # the rerun replaces it whole and removes the dead run's staging
    assert consistent_samples(out) == ["000000.png", "000001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_killed_data_shapes_resumes_to_the_same_bytes(tmp_path):
    out = tmp_path / "d"
    proc = start("data", "shapes", out, "-n", 600, "--size", 16)
    partial = tmp_path / ".d.ddguide-partial"
    kill_when(proc, lambda: len(list(partial.rglob("*.png"))) >= 20)
    assert not out.exists()  # a folder under its name is complete
    expect_ok(cli("data", "shapes", out, "-n", 600, "--size", 16))
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and not temporaries(out)
    from ddguide.shapes.dataset import ShapesConfig, generate

    fresh = generate(tmp_path / "fresh", ShapesConfig(n=600, size=16))
    assert files_of(out) == files_of(fresh)


def test_reruns_remove_what_killed_runs_left(tiny_model_path, data, tmp_path):
    """A kill mid-write leaves hidden temporaries (atomic writes, streamed features, checkpoints, staging folders
    of dead processes); the next run on the same output removes them."""
    out = tmp_path / "f.safetensors"
    left = [tmp_path / ".tmp-f.safetensors.abc123", tmp_path / ".tmp-f.part0of2.safetensors.x"]
    for p in left:
        p.write_bytes(b"half a file")
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10,
                  "--device", "cpu", "--out", out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]
    other = tmp_path / ".tmp-other.safetensors.abc"  # another output's temporary stays
    other.write_bytes(b"x")
    dead = tmp_path / ".s.ddguide-staging-999999999"
    dead.mkdir()
    (dead / "000000.png").write_bytes(b"x")
    expect_ok(cli("sample", "--model", tiny_model_path, "-n", 1, "--steps", 2, "--device", "cpu",
                  "--out", tmp_path / "s"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other.safetensors.abc", "f.safetensors", "s"]


def test_a_kill_between_the_two_renames_restores_the_earlier_folder(tiny_model_path, tmp_path):
    out = tmp_path / "s"
    base = ["sample", "--model", tiny_model_path, "-n", 2, "--steps", 2, "--device", "cpu", "--out", out]
    expect_ok(cli(*base))
    before = files_of(out)
    out.rename(tmp_path / ".s.ddguide-old")  # as left by a kill after the first rename of the swap
    expect_user_error(cli(*base, "--steps", 5000))  # even a run refused later puts the earlier folder back
    assert files_of(out) == before


def test_killed_train_resumes_and_leaves_no_temporaries(data, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["train", data / "images", "--preset", "tiny", "--batch", 2, "--checkpoint-every", 2, "--device", "cpu",
            "--precision", "fp32", "--out", out]
    proc = start(*args, "--steps", 5000)
    ckpt = tmp_path / "m.ckpt.safetensors"
    kill_when(proc, lambda: ckpt.exists())
    assert not out.exists()
    from ddguide.core import artifacts

    reached = artifacts.load(ckpt).config["step"]
    expect_ok(cli(*args, "--steps", reached + 2))
    assert artifacts.load(out).config["trained_steps"] == reached + 2
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".*lock"))


# ----------------------------------------------------------------------------------------------- disk full


class file_size_limit:
    """RLIMIT_FSIZE for this process (Python ignores SIGXFSZ, so a write past it fails with EFBIG, as on a
    full disk)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *_):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)


def test_full_disk_during_sample_keeps_the_earlier_run(tiny_model_path, tmp_path):
    out = tmp_path / "s"
    base = ["sample", "--model", tiny_model_path, "--steps", 2, "--device", "cpu", "--out", out]
    expect_ok(cli(*base, "-n", 2, "--seed", 0))
    before = files_of(out)
    with file_size_limit(600):  # a PNG fits, the grid does not
        r = cli(*base, "-n", 16, "--seed", 3)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "File too large" in r.output, r.output
    assert files_of(out) == before and [p.name for p in tmp_path.iterdir()] == ["s"]


@pytest.mark.parametrize("limit", [100, 4096])  # the header fails, or the first slice
def test_full_disk_during_extract_writes_nothing(tiny_model_path, data, tmp_path, limit):
    with file_size_limit(limit):
        r = cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10,
                "--device", "cpu", "--out", tmp_path / "f.safetensors")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- one writer


def test_a_second_writer_on_the_same_output_is_refused(tiny_model_path, tmp_path):
    out = tmp_path / "s"
    lock = tmp_path / ".s.ddguide-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running `ddguide sample --out s` holds
    try:
        expect_user_error(cli("sample", "--model", tiny_model_path, "-n", 1, "--steps", 2, "--device", "cpu",
                              "--out", out), "another ddguide run is writing")
        assert not out.exists()
    finally:
        os.close(fd)
    lock.unlink()
    expect_ok(cli("sample", "--model", tiny_model_path, "-n", 1, "--steps", 2, "--device", "cpu", "--out", out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the lock goes with the run


def test_sample_replaces_its_own_earlier_run_whole(tiny_model_path, tmp_path):
    out = tmp_path / "s"
    base = ["sample", "--model", tiny_model_path, "--steps", 2, "--device", "cpu", "--out", out]
    expect_ok(cli(*base, "-n", 3, "--seed", 0))
    first = files_of(out)
    expect_ok(cli(*base, "-n", 2, "--seed", 1))
    assert consistent_samples(out) == ["000000.png", "000001.png"]
    expect_ok(cli(*base, "-n", 3, "--seed", 0))
    assert files_of(out) == first  # the same seeds give the same bytes


# ----------------------------------------------------------------------------------------------- legitimate oddities


def test_non_utf8_image_names_are_read(tiny_model_path, data, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(sorted((data / "images").rglob("*.png"))[:3]):
        name = os.fsdecode(b"caf\xe9-%d.png" % i)  # Latin-1 bytes: not UTF-8
        (folder / name).write_bytes(f.read_bytes())
    out = tmp_path / "f.safetensors"
    r = expect_ok(cli("extract", folder, "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10,
                      "--device", "cpu", "--out", out, "--json"))
    assert out.is_file() and '"ok": true' in r.stdout


def test_markup_and_escapes_from_files_are_shown_literally(tiny_model_path, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from ddguide.core import artifacts

    meta = artifacts.read_metadata(tiny_model_path)
    path = tmp_path / "m.safetensors"
    save_file(load_file(str(tiny_model_path)), str(path),
              metadata={**meta, "ddguide.note": "[bold]loud[/bold] \x1b[31mred\x1b[0m"})
    r = expect_ok(cli("info", path))
    assert "[bold]loud[/bold]" in r.output and "\x1b" not in r.output and "\\x1b[31mred" in r.output
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a[bold]x\x1b[2J.png").write_bytes(b"junk")  # markup and a clear-screen escape in a file name
    r = cli("extract", folder, "--model", tiny_model_path, "--out", tmp_path / "f.safetensors", "--json")
    assert r.exit_code == 2 and "a[bold]x\\x1b[2J.png" in r.stderr and "\x1b" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["ok"] is False and "\x1b" not in r.stdout


def test_a_plain_pickle_is_refused_in_one_line(tmp_path):
    import pickle

    ckpt = tmp_path / "plain.pt"
    ckpt.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    proc = start("convert", ckpt, "--preset", "tiny", "--out", tmp_path / "m.safetensors")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt"]


def test_filter_reads_a_shapes_dataset(tiny_model_path, data, tmp_path):
    feats, head = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10, 20,
                  "--device", "cpu", "--out", feats))
    expect_ok(cli("train-head", feats, "--kind", "rejection", "--steps", 2, "--out", head))
    out = tmp_path / "kept"
    expect_ok(cli("filter", data, "--head", head, "--model", tiny_model_path, "--threshold", 0, "--device", "cpu",
                  "--out", out))
    assert (out / "index.csv").is_file() and list((out / "images").rglob("*.png"))
