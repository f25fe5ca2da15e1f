"""`ddguide demo` end to end on the tiny model (the real run uses the shipped model)."""

from typer.testing import CliRunner

from ddguide.cli import app


def test_demo_runs_the_whole_pipeline(tiny_model_path, tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--model", str(tiny_model_path), "--out", str(out), "-n", "3",
                                 "--labels", "6", "--steps", "3", "--device", "cpu", "--attribute", "has_red"])
    assert r.exit_code == 0, r.output
    assert "unguided" in r.output and "guided (lambda" in r.output  # the guided row, not "unguided" again
    assert (out / "demo.png").is_file() and (out / "head.safetensors").is_file()
    assert len((out / "guided" / "index.csv").read_text().splitlines()) == 4


def test_demo_refuses_an_unknown_attribute(tiny_model_path, tmp_path):
    r = CliRunner().invoke(app, ["demo", "--model", str(tiny_model_path), "--out", str(tmp_path / "d"),
                                 "--attribute", "blond"])
    assert r.exit_code == 2 and "unknown attribute" in r.output and "Traceback" not in r.output
