"""`ddguide demo` end to end on the tiny model (the real run uses the shipped model)."""

import re

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import expect_user_error
from ddguide.cli import app


def test_demo_runs_the_whole_pipeline(tiny_model_path, tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--model", str(tiny_model_path), "--out", str(out), "-n", "3",
                                 "--labels", "6", "--steps", "3", "--device", "cpu", "--attribute", "has_red"])
    assert r.exit_code == 0, r.output
    rows = [m.group(1) for m in re.finditer(r"^\W*(\w.*?)\s*│\s*[\d.]+\s*│$", r.output, re.M)]
    assert len(rows) == 2 and rows[0] == "unguided" and re.fullmatch(r"guided \(lambda [\d.]+, \w+\)", rows[1]), rows
    assert (out / "demo.png").is_file() and (out / "head.safetensors").is_file()
    assert len((out / "guided" / "index.csv").read_text().splitlines()) == 4
    guided, unguided = (np.stack([np.asarray(Image.open(out / kind / f"{k:06d}.png")) for k in range(3)])
                        for kind in ("guided", "unguided"))
    assert not np.array_equal(guided, unguided)  # same seeds: only the guidance tells the rows apart


def test_demo_refuses_an_unknown_attribute(tiny_model_path, tmp_path):
    r = CliRunner().invoke(app, ["demo", "--model", str(tiny_model_path), "--out", str(tmp_path / "d"),
                                 "--attribute", "blond"])
    expect_user_error(r, "unknown attribute")
