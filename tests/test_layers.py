"""The package's layers, checked by parsing imports: cli -> shapes -> stages -> method -> core, and
stages -> metrics -> core. A module may import its own layer and the layers below it, never one above.

- ``core``: what every part stands on (artifacts, the samples folder, the U-Net, diffusion, samplers, data);
- ``method``: the paper (features, heads, guidance, rejection), and nothing that writes an output;
- ``metrics``: FID, Inception, the CAS classifier's network, mIoU;
- ``stages``: one function per command, config in, artifact and result out;
- ``shapes``: the built-in domain (its dataset, oracles and the demo, which runs stages);
- ``cli``: typer and rich, nothing else knows about them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddguide"
BELOW = {  # layer -> the layers it may import besides itself
    "core": set(),
    "method": {"core"},
    "metrics": {"core"},
    "stages": {"core", "method", "metrics"},
    "shapes": {"core", "method", "metrics", "stages"},
    "cli": {"core", "method", "metrics", "stages", "shapes"},
}
TOP = {"__init__", "__main__"}  # the package's own entry points may import anything


def layer_of(module: str) -> str | None:
    """``ddguide.core.unet`` -> ``core``; None for the package root's own modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in BELOW else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ddguide import in a file, including the ones inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddguide"):
            if node.module == "ddguide":
                found += [(node.lineno, f"ddguide.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ddguide")]
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP | {"_version"}]
    assert not loose, f"modules outside the layers: {loose}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    module = ".".join(("ddguide", *path.relative_to(PACKAGE).with_suffix("").parts))
    own = layer_of(module)
    if own is None:
        return
    allowed = BELOW[own] | {own}
    wrong = [f"line {line}: {target}" for line, target in imports(path)
             if layer_of(target) is not None and layer_of(target) not in allowed]
    assert not wrong, f"{module} ({own}) imports a higher layer: {wrong}"


def test_the_rule_catches_an_upward_import(tmp_path):
    """The check itself can fail: a core module importing a stage is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ddguide.stages.sample import sample\n")
    assert [layer_of(m) for _, m in imports(bad)] == ["stages"] and "stages" not in BELOW["core"]
