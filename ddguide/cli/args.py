"""Command-line argument conventions shared by every command (no tensor maths, no rich).

List options take several values after one flag, ``--timesteps 300 800``, as well as the repeated form
``--timesteps 300 --timesteps 800``. Click gives ``multiple=True`` options one value per flag, so
:class:`ListCommand` rewrites the first form into the second before click parses it. A value that starts with
``-`` ends the list; right after the flag it is refused, so ``--timesteps -5`` is one readable error instead of a
negative timestep or a value that was meant as an option.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


class ListCommand(TyperCommand):
    """A typer command whose list options accept ``--opt A B C``, and whose range-checked numeric options say
    their range in ``--help`` (from :data:`ddguide.cli.ranges.RANGES`, the table the checks use)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        document_ranges(self.params)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_lists(args, self.list_options(), ctx))

    def list_options(self) -> set[str]:
        names: set[str] = set()
        for p in self.params:
            if getattr(p, "multiple", False) and getattr(p, "nargs", 1) == 1 and not getattr(p, "is_flag", False) \
                    and p.param_type_name == "option":
                names.update(p.opts)
        return names


def range_text(name: str) -> str:
    """What ``--help`` appends to option ``name``'s help: ``[range: >= 1]``."""
    from ddguide.cli.ranges import RANGES

    return f"[range: {RANGES[name][0]}]"


def document_ranges(params: list[Any]) -> None:
    """Append its range to the help of every numeric option that :data:`ddguide.cli.ranges.RANGES` checks (a
    ``--labels`` that names a file has no range)."""
    from ddguide.cli.ranges import RANGES

    for p in params:
        descriptor = getattr(p, "type_descriptor", None)
        if p.name not in RANGES or descriptor is None or not _numeric(descriptor.annotation):
            continue
        text = range_text(p.name)
        if text not in (p.help or ""):
            # rich markup mode would read "[range: ...]" as a style tag: "\[" keeps the bracket literal
            p.help = f"{p.help} \\{text}" if p.help else f"\\{text}"


def _numeric(annotation: Any) -> bool:
    """int, float, or a tuple, list or Optional of them (not bool)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(annotation) is None:
        return annotation in (int, float)
    return bool(args) and all(_numeric(a) for a in args)


def expand_lists(args: list[str], list_options: set[str], ctx: Any = None) -> list[str]:
    """``[--t, 300, 800, --x, 1]`` -> ``[--t, 300, --t, 800, --x, 1]`` for every ``--t`` in ``list_options``.

    Raises a click usage error (exit 2, one line) for a list value that looks like an option or a negative
    number directly after its flag."""
    from typer._click.exceptions import UsageError

    out: list[str] = []
    current: str | None = None  # the list option whose values are being read
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":  # everything after it is positional
            out += args[i - 1:]
            break
        name, eq, value = a.partition("=")
        if a.startswith("-") and name in list_options:
            current = name
            if eq:
                out += [name, _value(name, value, UsageError, ctx)]
            elif i < len(args) and not (args[i].startswith("-") and args[i] != "-"):
                out += [name, args[i]]
                i += 1
            elif i < len(args) and (args[i].lstrip("-")[:1].isdigit() or args[i].lstrip("-")[:1] == "."):
                raise UsageError(f"{name}: values must not be negative (got {args[i]})", ctx)
            else:
                raise UsageError(f"{name} needs at least one value", ctx)
            continue
        if current is not None and not a.startswith("-"):
            out += [current, a]
            continue
        current = None
        out.append(a)
    return out


def _value(name: str, value: str, error: type, ctx: Any) -> str:
    if value.startswith("-"):
        raise error(f"{name}: a value must not start with '-' (got {value})", ctx)
    return value
