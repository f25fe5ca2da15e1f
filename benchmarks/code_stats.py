"""Function-length statistics of the package: how long its functions are, and which are the longest.

    python benchmarks/code_stats.py [--ref GIT_REF] [--top 10]

Lengths are source lines from ``def`` to the last line of the body (docstrings included), for every function and
method under ``ddguide/``. With ``--ref`` the same is computed for a git revision (read with ``git show``), so a
refactoring can be compared with the code before it.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources(ref: str | None) -> dict[str, str]:
    """Module path -> source text of every ``ddguide/**.py``, in the working tree or at a git revision."""
    if ref is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "ddguide").rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, "ddguide"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{ref}:{n}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout for n in names if n.endswith(".py")}


def functions(files: dict[str, str]) -> list[tuple[int, str]]:
    """(length in lines, 'module:name') of every function and method."""
    found = []
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="a git revision to measure instead of the working tree")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    files = sources(args.ref)
    found = functions(files)
    lengths = sorted(n for n, _ in found)
    p90 = lengths[int(0.9 * (len(lengths) - 1))]
    lines = sum(len(t.splitlines()) for t in files.values())
    print(f"{args.ref or 'working tree'}: {len(files)} modules, {lines} lines, {len(found)} functions; "
          f"length median {statistics.median(lengths):g}, p90 {p90}, longest {lengths[-1]}")
    for n, where in found[:args.top]:
        print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()
