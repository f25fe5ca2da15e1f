"""Every range-checked numeric option says its range in its command's ``--help`` (issue 20: numeric options are
"finite, in range, documented"); the words come from ``ddguide.cli.ranges.RANGES``, the table the checks use."""

from __future__ import annotations

from typer.main import get_command
from typer.testing import CliRunner

from ddguide.cli import app
from ddguide.cli.ranges import RANGES

NOT_NUMERIC = {("extract", "labels")}  # --labels FILE: a path, not the count `demo --labels` checks


def commands(command=None, path=()):
    command = command or get_command(app)
    for name, sub in getattr(command, "commands", {}).items():
        if getattr(sub, "commands", None):
            yield from commands(sub, (*path, name))
        else:
            yield (*path, name), sub


def help_rows(path) -> list[str]:
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "2000"})  # one line per option
    assert r.exit_code == 0, r.output
    return [line for line in r.output.splitlines() if line.startswith("│")]  # the panels, not the docstring


def test_every_range_checked_option_shows_its_range_in_help():
    documented = set()
    for path, command in commands():
        options = [p for p in command.params if p.name in RANGES]
        if not options:
            continue
        rows = help_rows(path)
        for p in options:
            row = next(line for line in rows if set(p.opts) & set(line.split()))
            shown = f"[range: {RANGES[p.name][0]}]" in row
            if (path[-1], p.name) in NOT_NUMERIC:
                assert "[range:" not in row, row
                continue
            assert shown, f"{' '.join(path)} {max(p.opts, key=len)}: {row.strip()}"
            documented.add(p.name)
    assert documented == set(RANGES)  # every range in the table is some option's, and shown


def test_the_range_shown_is_the_one_enforced():
    from conftest import cli, expect_user_error

    row = next(line for line in help_rows(("sample",)) if "--eta" in line.split())
    assert "[range: in [0, 1]]" in row  # markup brackets shown literally, not taken for a rich style
    expect_user_error(cli("sample", "--eta", "1.5"), "--eta must be in [0, 1], got 1.5")
