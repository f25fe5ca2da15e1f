"""The `ddguide` command line: parse options, call a stage, render progress. No tensor maths here.

Library code raises :class:`UserError` for anything the user can fix; :func:`handle_errors` turns it into one
red line on stderr and exit code 2. Other failures exit with code 1 (and a traceback only with DDGUIDE_DEBUG=1).

:func:`handle_errors` also gives every command ``--json`` and ``--quiet``. A command states its figures once with
:func:`report`; with ``--json`` they become the one line on stdout (``{"ok": true, "command": ..., ...}``) and the
human output moves to stderr.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ddguide.core.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Conditional generation from unconditional diffusion models using denoiser representations.",
                  epilog="Exit codes: 0 ok, 1 failure, 2 bad input (a user error or a bad option), 130 interrupted. "
                         "Every command takes --json (one JSON object on stdout, everything else on stderr) and "
                         "--quiet (no progress or summary); progress is printed as plain lines every "
                         "$DDGUIDE_PROGRESS_SECONDS (default 5) when stderr is not a terminal.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from ddguide import __version__

        out_console.print(f"ddguide {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print `ddguide <version>` and exit.")] = False,
) -> None:
    pass  # no docstring: the app's help is the Typer's

_UNSAFE = None


def safe_text(text: str, *, newlines: bool = True) -> str:
    """``text`` with control characters (terminal escapes included), undecodable bytes of file names and bidi
    overrides written as visible escapes (``\\x1b``), so a name read from a file cannot drive the terminal."""
    global _UNSAFE
    if _UNSAFE is None:
        import re

        _UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

    def escape(m: Any) -> str:
        o = ord(m.group())
        return f"\\x{o - 0xdc00:02x}" if 0xdc80 <= o <= 0xdcff else (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")

    text = _UNSAFE.sub(escape, text)
    return text if newlines else text.replace("\n", "\\n").replace("\t", " ")


class _SafeConsole(Console):
    """Markup is off unless a call asks for it, and every string is shown through :func:`safe_text`: paths and
    names from files are printed as they are, never interpreted."""

    def render_str(self, text: str, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().render_str(safe_text(text), **kwargs)


console = _SafeConsole(stderr=True, markup=False)
out_console = _SafeConsole(markup=False)


def _precision(precision: str, device: str, compile: bool = False) -> str:
    """--precision with auto resolved for the device the command runs on; which one ran is said on stderr
    once the command has succeeded (a refused run keeps its one error line)."""
    from ddguide.core.runtime import describe_precision, resolve_device, resolve_precision

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        return precision  # the command's own check names the valid values
    dev = resolve_device(device)
    _run.precision_note = describe_precision(precision, dev, compile=compile)
    return resolve_precision(precision, dev, compile=compile)
ModelOpt = Annotated[Optional[Path], typer.Option(
    help="Model artifact, or a diffusers UNet2DModel folder (default: the model shipped with ddguide).")]


class _Run:
    """The command being run: its name, its output modes and the figures it reports (see :func:`report`)."""

    def __init__(self, command: str = "", as_json: bool = False, quiet: bool = False):
        self.command, self.json, self.quiet = command, as_json, quiet
        self.figures: dict[str, Any] = {}
        self.precision_note = ""  # set by _precision, printed after a successful run


_run = _Run()


def report(**figures: Any) -> None:
    """State the current command's figures once; with ``--json`` they make its stdout line, after ``"ok"`` and
    ``"command"``. Paths become strings, tuples lists and non-finite floats null."""
    _run.figures.update(figures)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _emit_json(command: str, ok: bool, **fields: Any) -> None:
    """The one stdout line of a ``--json`` run (written directly: rich would wrap or colour it)."""
    line = json.dumps(_jsonable({"ok": ok, "command": command, **fields}), ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8: escaped, still valid JSON
        line = json.dumps(_jsonable({"ok": ok, "command": command, **fields}))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fail(message: str, markup: str, code: int, *, command: str, as_json: bool) -> typer.Exit:
    """Print the one error line (``markup`` colours its first word) and, with --json, its JSON twin on stdout."""
    from rich.markup import escape

    message = safe_text(message, newlines=False)  # one line, whatever a file name holds
    word, _, rest = message.partition(" ")
    console.quiet = False  # --quiet keeps errors
    console.print(f"[{markup}]{escape(word)}[/{markup}] {escape(rest)}".rstrip(), highlight=False, soft_wrap=True,
                  markup=True)
    if as_json:
        _emit_json(command, False, error=message)
    return typer.Exit(code)


_JSON_HELP = ("Print one JSON object on stdout (ok, command, out and the figures; on failure ok false and error); "
              "everything else goes to stderr.")
_QUIET_HELP = "No progress and no summary; errors still print their one line."


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors -> one line + exit 2; interrupted -> exit 130; unexpected -> one line + exit 1.

    Also adds ``--json`` and ``--quiet`` to the command (see :func:`report`)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, ddguide_ctx: Any = None, ddguide_json: bool = False, ddguide_quiet: bool = False,
                **kwargs: Any) -> Any:
        global _run
        path = ddguide_ctx.command_path.split()[1:] if ddguide_ctx is not None else [fn.__name__]
        run = _run = _Run(" ".join(path), ddguide_json, ddguide_quiet)
        out_console.stderr, out_console.quiet, console.quiet = run.json, run.quiet, run.quiet
        try:
            _check_options(ddguide_ctx, kwargs)
            with _output_guards(run.command, kwargs):
                fn(*args, **kwargs)
            if run.precision_note:
                console.print(run.precision_note, highlight=False)
            if run.json and int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 reports
                _emit_json(run.command, True, **run.figures)
        except UserError as e:
            raise _fail(f"error: {e}", "red", 2, command=run.command, as_json=run.json) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", "yellow", 130, command=run.command, as_json=run.json) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the one place that turns crashes into a line
            if os.environ.get("DDGUIDE_DEBUG"):
                raise
            raise _fail(f"failed: {e.__class__.__name__}: {e} (set DDGUIDE_DEBUG=1 for a traceback)", "red", 1,
                        command=run.command, as_json=run.json) from None
        finally:
            out_console.stderr, out_console.quiet, console.quiet = False, False, False

    params = list(inspect.signature(fn, eval_str=True).parameters.values())
    extra = {
        "ddguide_ctx": typer.Context,
        "ddguide_json": Annotated[bool, typer.Option("--json", help=_JSON_HELP)],
        "ddguide_quiet": Annotated[bool, typer.Option("--quiet", "-q", help=_QUIET_HELP)],
    }
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=None if name == "ddguide_ctx" else False)
               for name, annotation in extra.items()]
    wrapper.__signature__ = inspect.signature(fn).replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**fn.__annotations__, **extra}
    return wrapper


# the output of each command: (parameter, is a folder); checked, locked and cleaned before the command runs
# (data shapes takes its folder as --out or as the argument OUT)
_OUTPUTS = {"convert": ("out", False), "sample": ("out", True), "train": ("out", False),
            "data shapes": (("out", "folder"), True), "extract": ("out", False), "train-head": ("out", False),
            "demo": ("out", True), "filter": ("out", True), "fid": ("save_stats", False), "finetune": ("out", False),
            "cas": ("out", False)}


def _check_options(ctx: Any, values: dict[str, Any]) -> None:
    """Numeric options: finite and in range (ddguide.cli.ranges), named as the user spelt them."""
    from ddguide.cli.ranges import check_options

    params = getattr(getattr(ctx, "command", None), "params", [])
    check_options(values, {p.name: max(p.opts, key=len) for p in params if getattr(p, "opts", None)})


def _output_guards(command: str, values: dict[str, Any]) -> Any:
    """The command's output path checked before it runs; in a single process also locked against a second
    writer, with the temporaries of killed runs removed (ddguide.core.outputs.guard)."""
    import contextlib

    from ddguide.core import outputs

    stack = contextlib.ExitStack()
    name, folder = _OUTPUTS.get(command, (None, False))
    names = name if isinstance(name, tuple) else (name,) if name else ()  # an output given one of several ways
    path = next((values[n] for n in names if values.get(n) is not None), None)
    if values.get("shard") is not None:
        from ddguide.core.runtime import resolve_shard

        resolve_shard(values["shard"])  # a malformed --shard is refused before any work
    if path is not None:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 or values.get("shard") is not None:  # shards share the
            # output (torchrun ranks, or --shard jobs): each only checks it
            outputs.check_output(path, folder=folder)
        else:
            stack.enter_context(outputs.guard(path, folder=folder))
    return stack


def _progress_seconds() -> float:
    text = os.environ.get("DDGUIDE_PROGRESS_SECONDS", "5")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"DDGUIDE_PROGRESS_SECONDS: expected a number of seconds >= 0 (got {text!r})")
    return seconds


def _duration(seconds: float) -> str:
    """35 s, 4 min 05 s, 1h 10 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600}h {s % 3600 // 60:02d} min"


class progress_bar:
    """A rich progress bar that appears on the first update, so errors raised while a stage is still
    checking its inputs are not preceded by an empty bar. Use as a context manager; call ``update``.

    When stderr is not a terminal (nohup, pipes, CI) it prints plain lines instead, at most one every
    $DDGUIDE_PROGRESS_SECONDS (default 5) plus the last update; with --quiet, nothing."""

    def __init__(self, description: str):
        self.description = description
        self.bar: Progress | None = None
        self.task = None
        self.quiet = _run.quiet
        self.plain = not console.is_terminal
        self.every = _progress_seconds() if self.plain and not self.quiet else 0.0
        self.start: tuple[float, int, int] | None = None  # (time, done, total) the estimate counts from
        self.printed = 0.0  # when the last plain line was printed
        self.pending: tuple[int, int, str, float] | None = None  # the last update (and when), unless printed

    def update(self, done: int, total: int, info: str = "") -> None:
        if self.quiet:
            return
        if self.plain:
            self._plain(done, total, info)
            return
        if self.bar is None:
            self.bar = Progress(TextColumn(f"[bold]{self.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console)
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=total, info="")
        self.bar.update(self.task, completed=done, total=total, info=info)

    def _plain(self, done: int, total: int, info: str) -> None:
        now = time.monotonic()
        if self.start is None or total != self.start[2] or done < self.start[1]:  # a new stage (demo) or restart
            if self.pending is not None:  # the last update of the stage that ended
                self._print_plain()
            self.start = (now, done, total)
            self.printed = now
        self.pending = (done, total, info, now)
        if now - self.printed >= self.every:
            self._print_plain()

    def _print_plain(self) -> None:
        assert self.pending is not None and self.start is not None
        done, total, info, now = self.pending
        t0, done0, _ = self.start
        elapsed = now - t0
        timing = _duration(elapsed)
        if done < total and done > done0 and elapsed > 0:
            timing += f", ~{_duration((total - done) * elapsed / (done - done0))} left"
        text = " ".join(f"{self.description} {done}/{total} {info}".split())
        console.print(f"{text} ({timing})", markup=False, highlight=False, soft_wrap=True)
        self.printed, self.pending = now, None

    def __enter__(self) -> "progress_bar":
        return self

    def __exit__(self, exc_type: Any = None, *_: Any) -> None:
        if self.pending is not None and exc_type is None:  # the last update shows once the stage is done; after
            # a failure the error stays the one line a quick stage prints (as the rich bar is transient then)
            self._print_plain()
        if self.bar is not None:
            if exc_type is not None:  # an error leaves its one line, not a half-filled bar
                self.bar.live.transient = True
            self.bar.stop()
            self.bar = None


def artifact_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config an artifact was written with (its metadata only), for the figures of --json."""
    from ddguide.core import artifacts

    return artifacts.describe(path).config


def refuse_existing(path: Path, what: str = "output") -> None:
    if path.exists() and path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path}: {what} folder exists and is not empty")


# --- end cas ---


def main() -> None:
    """Entry point. Usage errors (unknown option, bad value, missing argument) become one line and exit 2."""
    as_json = "--json" in sys.argv[1:]  # usage errors happen before the command's own --json is parsed
    try:
        code = app(prog_name="ddguide", standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - the parser's usage errors carry format_message and exit code 2
        ctx = getattr(e, "ctx", None)
        command = " ".join(ctx.command_path.split()[1:]) if ctx is not None else ""
        if getattr(e, "exit_code", None) == 2 and hasattr(e, "format_message"):
            where = f"{ctx.command_path} --help" if ctx is not None else "ddguide --help"
            message = e.format_message()
            if getattr(e, "option_name", None) == "--n":  # the old spelling, which torchrun took for its own
                message = "No such option: --n (it is -n or --num-images now: under torchrun --n is ambiguous)"
            raise SystemExit(_fail(f"error: {message} (see `{where}`)", "red", 2, command=command,
                                   as_json=as_json).exit_code) from None
        if e.__class__.__name__ == "Abort":
            raise SystemExit(_fail("interrupted", "yellow", 130, command=command, as_json=as_json).exit_code) \
                from None
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()


# the commands, one module per group: importing them registers them on ``app``
from ddguide.cli import method, metrics, models, shapes  # noqa: E402,F401
