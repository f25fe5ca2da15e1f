"""examples/*.sh: each runs end to end in its quick mode (QUICK=1) from another folder, and refuses cleanly (one
line, exit 2, nothing written) when a tool is missing or its work folder is taken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.sh") if not p.name.startswith("_"))
VENV_BIN = str(Path(sys.executable).parent)  # `ddguide` and `python3` of the environment running the tests
BASH = shutil.which("bash") or "/bin/bash"

# what each example must leave in $WORK
OUTPUTS = {
    "attributes.sh": ["feats.safetensors", "heads/has_circle.safetensors", "guided/index.csv", "guided/grid.png",
                       "pruned/index.csv"],
    "masks.sh": ["seg.safetensors", "seg-head.safetensors", "masked/index.csv", "masked/grid.png"],
    "synthetic-data.sh": ["cond.safetensors", "heads/rejection.safetensors", "synth/index.csv", "cas.safetensors"],
    "published-checkpoint.sh": ["checkpoint.pt", "converted.safetensors", "heads/has_circle.safetensors",
                                "guided/index.csv"],
    "ci-pipeline.sh": ["json/data.json", "json/extract.json", "json/head.json", "json/sample.json",
                       "guided/index.csv"],
    "plugin-guide.sh": ["plugin_guide.py", "plain/index.csv", "red/index.csv", "red/grid.png"],
}


def run(script: Path, cwd: Path, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("QUICK", "WORK", "MIN_ACC", "MIN_GUIDED", "DEMO")}
    full["PATH"] = path if path is not None else VENV_BIN + os.pathsep + os.environ.get("PATH", "")
    # quick runs are start-up and tiny tensors: with other jobs on a 2-core machine one thread each ran attributes.sh
    # in 6.1 s against 12.5 s with torch's default of two
    full.setdefault("OMP_NUM_THREADS", "1")
    full.update(env)
    return subprocess.run([BASH, str(script)], cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def test_every_example_is_listed_and_has_its_header():
    assert SCRIPTS, "no examples found"
    assert sorted(OUTPUTS) == sorted(p.name for p in SCRIPTS), "add the new example's outputs to OUTPUTS"
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n# "), script.name
        assert "set -euo pipefail" in text, script.name
        assert "Time on a laptop CPU" in text and "QUICK=1" in text and "TIME_" not in text, script.name
        assert "Writes into $WORK" in text, script.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_runs_in_quick_mode(script: Path, tmp_path: Path):
    elsewhere = tmp_path / "cwd"  # not the repository: the scripts must not depend on the current folder
    elsewhere.mkdir()
    work = tmp_path / "work"
    r = run(script, elsewhere, QUICK="1", WORK=str(work))
    assert r.returncode == 0, f"{script.name} exited {r.returncode}:\n{r.stderr[-4000:]}"
    missing = [rel for rel in OUTPUTS[script.name] if not (work / rel).exists()]
    assert not missing, f"{script.name} did not write {missing}"
    assert not any(elsewhere.iterdir()), "wrote outside $WORK"


def _path_without_ddguide(tmp_path: Path, *, python: bool) -> str:
    """A PATH holding the shell tools the scripts use, and python3 only when asked: never ddguide."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "basename", "ls", "mkdir", "cat") + (("python3",) if python else ()):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return str(bin_dir)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_missing_ddguide_gives_one_line_and_exit_2(script: Path, tmp_path: Path):
    path = _path_without_ddguide(tmp_path, python=True)
    r = run(script, tmp_path, path=path, QUICK="1", WORK=str(tmp_path / "work"))
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "'ddguide' not found" in r.stderr
    assert not (tmp_path / "work").exists()


def test_missing_python_gives_one_line_and_exit_2(tmp_path: Path):
    path = _path_without_ddguide(tmp_path, python=False)
    os.symlink(Path(VENV_BIN) / "ddguide", Path(path) / "ddguide")
    r = run(EXAMPLES / "published-checkpoint.sh", tmp_path, path=path, WORK=str(tmp_path / "work"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "'python3' not found" in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()


def test_python_without_ddguide_gives_one_line_and_exit_2(tmp_path: Path):
    path = _path_without_ddguide(tmp_path, python=False)
    os.symlink(Path(VENV_BIN) / "ddguide", Path(path) / "ddguide")
    shim = Path(path) / "python3"  # the same interpreter without site-packages: it cannot import ddguide
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    shim.chmod(0o755)
    r = run(EXAMPLES / "published-checkpoint.sh", tmp_path, path=path, WORK=str(tmp_path / "work"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "cannot import" in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()


def test_default_work_folder_is_refused_when_not_empty(tmp_path: Path):
    taken = tmp_path / "runs" / "example-masks"
    taken.mkdir(parents=True)
    (taken / "mine.txt").write_text("keep")
    r = run(EXAMPLES / "masks.sh", tmp_path, QUICK="1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not an empty folder" in r.stderr, r.stderr
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]


def test_ci_pipeline_fails_with_one_line_when_a_figure_is_below_its_threshold(tmp_path: Path):
    work = tmp_path / "work"
    r = run(EXAMPLES / "ci-pipeline.sh", tmp_path, QUICK="1", WORK=str(work), MIN_ACC="2")
    assert r.returncode == 1, r.stderr[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "val_accuracy" in last and "MIN_ACC" in last and "threshold 2" in last, last
    assert (work / "json" / "head.json").exists() and not (work / "guided").exists()  # stopped at the failed gate
