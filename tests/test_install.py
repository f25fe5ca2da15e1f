"""README.md's first screen: its two commands set ddguide up from a fresh clone, and .ci/run runs the same ones.

The slow test clones the repository (its last commit), runs README's install command (`./install.sh`, which makes
.venv and installs torch and ddguide) with no virtual environment active, and then, to stay fast, `ddguide --help`
in place of README's `ddguide demo`, and collects the test suite (`pytest --collect-only`) in place of running it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "./install.sh && .venv/bin/ddguide demo"
TEST = ".venv/bin/python -m pytest -q -n 2"


def readme_first_commands(readme: Path) -> list[str]:
    """The commands of README's first fenced code block, comments removed."""
    block = re.search(r"^```(?:bash|sh)?\n(.*?)^```", readme.read_text(), re.S | re.M)
    assert block, "README.md has no fenced code block"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_first_screen_is_the_two_commands_tested_here():
    assert readme_first_commands(ROOT / "README.md") == [INSTALL, TEST]


def test_ci_runs_readme_install_and_test_commands():
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert INSTALL.split(" && ")[0] in ci and TEST in ci
    assert ci.index(TEST) > ci.index(INSTALL.split(" && ")[0])
    assert os.access(ROOT / "install.sh", os.X_OK) and os.access(ROOT / ".ci" / "run", os.X_OK)


def test_install_refuses_an_unknown_variant():
    r = subprocess.run([str(ROOT / "install.sh")], env={**os.environ, "TORCH_VARIANT": "rocm"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "TORCH_VARIANT" in r.stderr, r.stderr


def _fresh_shell_env() -> dict[str, str]:
    """The environment of a new shell: no virtual environment active, none of its bin folders on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bins = {str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in venv_bins)
    return env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_commands_work_in_a_fresh_clone(tmp_path: Path):
    clone = tmp_path / "ddguide"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    assert readme_first_commands(clone / "README.md") == [INSTALL, TEST]
    env = _fresh_shell_env()

    def sh(command: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=timeout)

    install, _demo = INSTALL.split(" && ")
    r = sh(install, 1800)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (clone / ".venv" / "bin" / "python").exists()
    r = sh(".venv/bin/ddguide --help", 120)  # README runs `ddguide demo` here (81 s): --help proves the install
    assert r.returncode == 0 and "demo" in r.stdout, r.stderr[-2000:]
    r = sh(".venv/bin/python -c 'import ddguide, torch; print(ddguide.__file__, torch.__version__)'", 120)
    assert r.returncode == 0 and str(clone) in r.stdout, r.stdout + r.stderr  # the clone's ddguide, not ours
    if not shutil.which("nvidia-smi"):
        assert "+cpu" in r.stdout, r.stdout  # no GPU: not PyPI's CUDA build
    r = sh(TEST.replace("-q", "-q --collect-only"), 300)  # README runs the suite here (minutes): collect it
    assert r.returncode == 0 and "tests collected" in r.stdout, (r.stdout + r.stderr)[-2000:]
