"""Output for pipelines: `--json` (one object on stdout), plain progress lines off a terminal, `--quiet`,
`--version`, exit codes, and README's torchrun lines."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli, torchrun

README = Path(__file__).resolve().parents[1] / "README.md"


def parsed(result, code: int = 0) -> dict:
    """The one stdout line of a --json run, parsed; checks the exit code and that stdout holds nothing else."""
    assert result.exit_code == code, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def subprocess_ddguide(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ddguide ARGS` with stdout and stderr to pipes (neither is a terminal)."""
    return subprocess.run([sys.executable, "-m", "ddguide", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """12 shapes images of 16 px from `ddguide data shapes --json`."""
    root = tmp_path_factory.mktemp("pipeline") / "data"
    figures = parsed(cli("data", "shapes", root, "-n", 12, "--size", 16, "--json"))
    assert figures == {"ok": True, "command": "data shapes", "out": str(root), "images": 12}
    return root


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """Two class folders of flat noisy colours (16 px)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 40, 40)), ("blue", (40, 90, 230))):
        for split, count in (("train", 8), ("test", 4)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{name}{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ --json


def test_json_through_the_attribute_pipeline(shapes, tiny_model_path, tmp_path):
    feats, head = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    r = cli("extract", shapes / "images", "--labels", shapes / "attributes.csv", "--label", "has_circle",
            "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10, 20, "--out", feats, "--device", "cpu",
            "--json")
    assert parsed(r) == {"ok": True, "command": "extract", "out": str(feats), "images": 12, "blocks": ["mid"],
                         "timesteps": [10, 20]}
    assert "wrote" in r.stderr  # the human summary moved to stderr

    figures = parsed(cli("train-head", feats, "--out", head, "--steps", 3, "--json"))
    assert figures["command"] == "train-head" and figures["out"] == str(head) and figures["kind"] == "classifier"
    assert 0 <= figures["metrics"]["val_accuracy"] <= 1 and figures["temperature"] > 0

    figures = parsed(cli("sample", "--model", tiny_model_path, "--guide", head, "--target", 1, "-n", 2,
                         "--steps", 2, "--out", tmp_path / "s", "--device", "cpu", "--json"))
    assert figures == {"ok": True, "command": "sample", "out": str(tmp_path / "s"), "images": 2}

    figures = parsed(cli("info", head, "--json"))
    assert figures["kind"] == "head" and figures["schema"] == "1" and figures["config"]["label"] == "has_circle"
    assert {"ok", "command", "version", "fingerprint"} <= set(figures)

    figures = parsed(cli("fid", tmp_path / "s", shapes / "images", "--features", "denoiser", "--model",
                         tiny_model_path, "--device", "cpu", "--json"))
    assert figures["command"] == "fid" and figures["distance"] >= 0 and figures["fid"] is None and (figures["n_a"], figures["n_b"]) == (2, 12)
    assert figures["feature_space"].startswith("denoiser")


def test_json_of_convert_train_and_finetune(shapes, classes, tiny_model_path, tmp_path):
    from ddguide.core.model import load_model

    figures = parsed(cli("convert", tiny_model_path, "--preset", "tiny", "--out", tmp_path / "c.safetensors",
                         "--json"))
    model = load_model(str(tmp_path / "c.safetensors"), "cpu")
    assert figures == {"ok": True, "command": "convert", "out": str(tmp_path / "c.safetensors"),
                       "fingerprint": model.fingerprint,
                       "parameters": sum(p.numel() for p in model.net.parameters())}
    common = ("--steps", 2, "--batch", 4, "--device", "cpu", "--precision", "fp32", "--json")
    figures = parsed(cli("train", shapes / "images", "--preset", "tiny", "--out", tmp_path / "m.safetensors", *common))
    assert figures == {"ok": True, "command": "train", "out": str(tmp_path / "m.safetensors"), "steps": 2,
                       "channels": 3}
    figures = parsed(cli("finetune", classes / "train", "--model", tiny_model_path, "--out",
                         tmp_path / "cond.safetensors", *common))
    assert figures == {"ok": True, "command": "finetune", "out": str(tmp_path / "cond.safetensors"), "steps": 2}


def test_json_of_rejection_filter_and_cas(classes, tiny_model_path, tmp_path):
    feats, rej, cond = tmp_path / "f.safetensors", tmp_path / "rej.safetensors", tmp_path / "cond.safetensors"
    assert cli("extract", classes / "train", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 300, 800,
               "--out", feats, "--device", "cpu", "-q").exit_code == 0
    assert cli("train-head", feats, "--kind", "rejection", "--out", rej, "--steps", 3, "-q").exit_code == 0
    assert cli("finetune", classes / "train", "--model", tiny_model_path, "--out", cond, "--steps", 2, "--batch", 4,
               "--device", "cpu", "-q").exit_code == 0

    figures = parsed(cli("sample", "--model", cond, "--reject", rej, "--threshold", 0.0, "--reject-model",
                         tiny_model_path, "-n", 1, "--steps", 2, "--out", tmp_path / "r", "--device", "cpu", "--json"))
    per_class = figures.pop("per_class")
    assert figures == {"ok": True, "command": "sample", "out": str(tmp_path / "r"), "images": 2, "kept": 2}
    assert set(per_class) == {"blue", "red"} and all(kept == 1 <= drawn for kept, drawn in per_class.values())

    figures = parsed(cli("filter", tmp_path / "r", "--head", rej, "--threshold", 0.0, "--model", tiny_model_path,
                         "--out", tmp_path / "kept", "--device", "cpu", "--json"))
    assert figures == {"ok": True, "command": "filter", "out": str(tmp_path / "kept"), "kept": 2, "total": 2,
                       "per_class": {"blue": [1, 1], "red": [1, 1]}}

    figures = parsed(cli("cas", "--train", classes / "train", "--test", classes / "test", "--epochs", 1,
                         "--batch", 8, "--milestones", 1, 1, "--out", tmp_path / "cas.safetensors", "--device", "cpu",
                         "--json"))
    assert figures["command"] == "cas" and figures["out"] == str(tmp_path / "cas.safetensors")
    assert 0 <= figures["top1"] <= figures["topk"] <= 1 and figures["k"] == 2
    assert (figures["n_train"], figures["n_test"]) == (16, 8)


def test_json_of_demo(monkeypatch, tmp_path):
    """The demo's figures (its run is tested in test_demo.py; here only what --json makes of its result)."""
    from ddguide.shapes import demo

    result = demo.DemoResult("has_circle", 0.25, 0.3, 0.9, 0.95, tmp_path / "demo.png")
    monkeypatch.setattr(demo, "run_demo", lambda cfg, progress=None: result)
    assert parsed(cli("demo", "--out", tmp_path, "--json")) == {
        "ok": True, "command": "demo", "out": str(tmp_path), "unguided": 0.3, "guided": 0.9, "head_accuracy": 0.95,
        "grid": str(tmp_path / "demo.png"), "base_rate": 0.25}


def test_json_failure_is_one_object_and_the_one_error_line(shapes, tiny_model_path, tmp_path):
    before = sorted(p.name for p in shapes.iterdir())
    r = cli("data", "shapes", shapes, "-n", 3, "--json")  # the folder is not empty
    figures = parsed(r, code=2)
    assert figures == {"ok": False, "command": "data shapes", "error": r.stderr.strip()}
    assert figures["error"].startswith("error: ") and "not empty" in figures["error"]
    assert len(r.stderr.splitlines()) == 1 and sorted(p.name for p in shapes.iterdir()) == before

    out = tmp_path / "f.safetensors"
    r = cli("extract", shapes / "images", "--model", tiny_model_path, "--blocks", "nosuchblock", "--out", out,
            "--device", "cpu", "--json")
    figures = parsed(r, code=2)
    assert figures["ok"] is False and figures["command"] == "extract" and figures["error"] == r.stderr.strip()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_error_line_keeps_square_brackets(tmp_path):
    missing = tmp_path / "runs [bold]" / "[mid] model.safetensors"
    r = cli("info", missing, "--json")
    assert r.stderr.strip() == f"error: {missing}: no such file" == parsed(r, code=2)["error"]


def test_json_unexpected_failure_exits_1(monkeypatch, tmp_path):
    import ddguide.shapes.dataset

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.delenv("DDGUIDE_DEBUG", raising=False)
    monkeypatch.setattr(ddguide.shapes.dataset, "generate", broken)
    r = cli("data", "shapes", tmp_path / "d", "--json")
    assert parsed(r, code=1) == {"ok": False, "command": "data shapes", "error": r.stderr.strip()}
    assert r.stderr.startswith("failed: RuntimeError: disk on fire")


@pytest.mark.parametrize("argv, command, fragment", [
    (["sample", "-n", "many", "--out", "x", "--json"], "sample", "Invalid value for '-n' / '--num-images'"),
    (["data", "shapes", "a", "b", "--json"], "data shapes", "unexpected extra argument"),
    (["sample", "--n", "4", "--json"], "sample", "it is -n or --num-images now"),
    (["nosuchcmd", "--json"], "", "No such command"),
])
def test_json_usage_errors(argv, command, fragment, monkeypatch, capsys):
    from ddguide.cli import main

    monkeypatch.setattr("sys.argv", ["ddguide", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert json.loads(out) == {"ok": False, "command": command, "error": err.strip()}


# ------------------------------------------------------------------------------------ progress and --quiet


def test_plain_progress_lines_when_stderr_is_a_pipe(tmp_path):
    r = subprocess_ddguide("data", "shapes", tmp_path / "a", "-n", 5, "--size", 16,
                           env={"DDGUIDE_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    progress = [line for line in lines if line.startswith("generating ")]
    assert len(progress) == 5 and progress[-1].startswith("generating 5/5 (") and progress[-1].endswith(" s)")
    assert all(re.fullmatch(r"generating \d/5 \(\d+ s(, ~\d+ s left)?\)", line) for line in progress), progress
    assert "\x1b" not in r.stderr and "━" not in r.stderr  # no rich bar or escape codes in a log
    assert " ".join(r.stdout.split()) == f"wrote 5 images to {tmp_path / 'a'}"  # rich wraps at 80 columns

    # --quiet: no progress, no summary; --json still prints its line
    r = subprocess_ddguide("data", "shapes", tmp_path / "b", "-n", 3, "--size", 16, "--quiet", "--json",
                           env={"DDGUIDE_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["images"] == 3


def test_progress_interval_and_final_update(monkeypatch, capsys):
    from ddguide import cli as cli_module

    clock = [100.0]
    monkeypatch.setattr(cli_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("DDGUIDE_PROGRESS_SECONDS", "5")
    with cli_module.progress_bar("training") as bar:
        for step in range(1, 11):  # one step every 2 s: lines at steps 4 and 7 (6 s apart), then the last
            bar.update(step, 20, "loss 0.004  100 img/s")
            clock[0] += 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["training 4/20 loss 0.004 100 img/s (6 s, ~32 s left)",
                     "training 7/20 loss 0.004 100 img/s (12 s, ~26 s left)",
                     "training 10/20 loss 0.004 100 img/s (18 s, ~20 s left)"]  # the last update, at its time
    assert cli_module._duration(4260) == "1h 11 min" and cli_module._duration(245) == "4 min 05 s"

    # one bar over several stages (demo): each stage's last update shows when the next begins; none after an error
    with pytest.raises(RuntimeError):
        with cli_module.progress_bar("demo") as bar:
            for stage, total in (("data", 3), ("features", 2)):
                for done in range(1, total + 1):
                    bar.update(done, total, stage)
                    clock[0] += 1
            raise RuntimeError
    assert capsys.readouterr().err.splitlines() == ["demo 3/3 data (2 s)"]


def test_bad_progress_interval_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DDGUIDE_PROGRESS_SECONDS", "soon")
    r = cli("data", "shapes", tmp_path / "d", "-n", 2, "--json")
    assert parsed(r, code=2)["error"] == "error: DDGUIDE_PROGRESS_SECONDS: expected a number of seconds >= 0 (got 'soon')"


def test_quiet_prints_nothing_but_errors(tmp_path):
    r = cli("data", "shapes", tmp_path / "d", "-n", 2, "--quiet")
    assert r.exit_code == 0 and r.output == ""
    r = cli("data", "shapes", tmp_path / "d", "-n", 2, "-q")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------ version, help


def test_version_agrees_with_the_package_metadata():
    from importlib.metadata import version

    import ddguide

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout == f"ddguide {ddguide.__version__}\n"
    assert version("ddguide") == ddguide.__version__


def test_help_documents_exit_codes_and_every_command_takes_json_and_quiet():
    r = cli("--help")
    text = " ".join(r.stdout.split())
    assert "0 ok, 1 failure, 2 bad input" in text and "130 interrupted" in text
    for command in (["convert"], ["sample"], ["train"], ["data", "shapes"], ["extract"], ["train-head"], ["demo"],
                    ["filter"], ["info"], ["fid"], ["finetune"], ["cas"]):
        text = cli(*command, "--help").stdout
        assert "--json" in text and "--quiet" in text, command


# ------------------------------------------------------------------------------------ torchrun


def readme_torchrun_lines() -> list[list[str]]:
    return [shlex.split(line) for line in README.read_text().splitlines() if line.startswith("torchrun ")]


def test_readme_torchrun_lines_reach_ddguide_whole():
    """torchrun's own parser takes any unambiguous prefix of its options and stops at an ambiguous one (--n)."""
    from torch.distributed.run import get_args_parser

    lines = readme_torchrun_lines()
    assert len(lines) >= 2 and any("sample" in line for line in lines)
    for argv in lines:
        args = get_args_parser().parse_args(argv[1:])
        assert args.module and args.training_script == "ddguide"
        assert args.training_script_args == argv[argv.index("ddguide") + 1:], argv


def test_readme_torchrun_sample_line_runs(tiny_model_path, tmp_path):
    """README's line as written (2 processes here), on the tiny model, fewer images, and --json."""
    [argv] = [line for line in readme_torchrun_lines() if "sample" in line]
    argv = argv[argv.index("--nproc-per-node") + 2:]  # -m ddguide sample ... (the helper sets 2 processes)
    argv[argv.index("samples/")] = str(tmp_path / "samples")
    option = next(a for a in argv if a in ("-n", "--num-images"))
    argv[argv.index(option) + 1] = "6"
    r = torchrun(*argv, "--model", tiny_model_path, "--steps", 2, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [f"{k:06d}.png" for k in range(6)] + [
        "grid.png"]
    # rank 0 reports; the other rank's human output stays on stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [
        {"ok": True, "command": "sample", "out": str(tmp_path / "samples"), "images": 6}]
