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
from rich.table import Table

from ddguide.cli_options import (BatchOpt, CasSeedOpt, CheckpointEveryOpt, CompileOpt, DeviceOpt, EmaOpt,
                                 FinetuneSeedOpt, GradClipOpt, LrOpt, PrecisionOpt, StepsOpt, ThreadsOpt,
                                 TrainSeedOpt)
from ddguide.cliargs import ListCommand
from ddguide.defaults import DEFAULT_BLOCKS_RULE, DEFAULT_TIMESTEPS, DEMO_GRAD, DEMO_LAMBDA
from ddguide.errors import UserError

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
    from ddguide.models import describe_precision, resolve_device, resolve_precision

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        return precision  # the command's own check names the valid values
    dev = resolve_device(device)
    _run.precision_note = describe_precision(precision, dev, compile=compile)
    return resolve_precision(precision, dev, compile=compile)
ModelOpt = Annotated[Optional[Path], typer.Option(help="Model artifact (default: the model shipped with ddguide).")]


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
_OUTPUTS = {"convert": ("out", False), "sample": ("out", True), "train": ("out", False), "data shapes": ("out", True),
            "extract": ("out", False), "train-head": ("out", False), "demo": ("out", True), "filter": ("out", True),
            "fid": ("save_stats", False), "finetune": ("out", False), "cas": ("out", False)}


def _check_options(ctx: Any, values: dict[str, Any]) -> None:
    """Numeric options: finite and in range (ddguide.options), named as the user spelt them."""
    from ddguide.options import check_options

    params = getattr(getattr(ctx, "command", None), "params", [])
    check_options(values, {p.name: max(p.opts, key=len) for p in params if getattr(p, "opts", None)})


def _output_guards(command: str, values: dict[str, Any]) -> Any:
    """The command's output path checked before it runs; in a single process also locked against a second
    writer, with the temporaries of killed runs removed (ddguide.outputs.guard)."""
    import contextlib

    from ddguide import outputs

    stack = contextlib.ExitStack()
    name, folder = _OUTPUTS.get(command, (None, False))
    path = values.get(name) if name else None
    if path is not None:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun ranks share the output: each only checks it
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


def _artifact_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config an artifact was written with (its metadata only), for the figures of --json."""
    from ddguide import artifacts

    return artifacts.describe(path).config


def refuse_existing(path: Path, what: str = "output") -> None:
    if path.exists() and path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path}: {what} folder exists and is not empty")


# ----------------------------------------------------------------------------------------------- convert


@app.command(cls=ListCommand)
@handle_errors
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="openai improved-/guided-diffusion .pt, or .safetensors.")],
    out: Annotated[Path, typer.Option(help="Model artifact to write (.safetensors).")],
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (default: from the file name).")] = None,
    arch: Annotated[Optional[str], typer.Option(
        help='Architecture options as JSON for checkpoints matching no preset, e.g. '
             '\'{"image_size": 64, "model_channels": 128, "num_res_blocks": 3}\'.')] = None,
    diffusion: Annotated[Optional[str], typer.Option(
        help='Diffusion settings as JSON, e.g. \'{"steps": 4000, "schedule": "cosine", '
             '"rescale_timesteps": true}\'.')] = None,
) -> None:
    """Convert a published checkpoint into a ddguide model artifact."""
    from ddguide.convert import ConvertConfig, convert as run

    model = run(ConvertConfig(str(checkpoint), str(out), preset, _json_opt(arch, "--arch"),
                              _json_opt(diffusion, "--diffusion")))
    n = sum(p.numel() for p in model.net.parameters())
    out_console.print(f"wrote {out} ({n / 1e6:.1f}M parameters, fingerprint {model.fingerprint})")
    report(out=out, fingerprint=model.fingerprint, parameters=n)


def _json_opt(text: str | None, name: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"{name}: expected a JSON object")
    return value


# ----------------------------------------------------------------------------------------------- sample


@app.command(cls=ListCommand)
@handle_errors
def sample(
    out: Annotated[Path, typer.Option(help="Folder for the PNGs, index.csv and grid.png.")] = Path("samples"),
    model: ModelOpt = None,
    n: Annotated[int, typer.Option("-n", "--num-images", help="Number of images.")] = 16,
    steps: Annotated[int, typer.Option(help="Sampling steps (respaced from the model's schedule).")] = 50,
    sampler: Annotated[str, typer.Option(
        help="ddim, or ddpm (ancestral: cleaner samples from the shipped model, see the model card).")] = "ddim",
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 deterministic, 1 DDPM-like noise.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Image k uses seed + k.")] = 0,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    class_: Annotated[Optional[list[str]], typer.Option(
        "--class", metavar="C ...", help="Class names or ids of a class-conditional model ('all' cycles evenly).")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(
        "--cfg", help="Classifier-free guidance weight w: eps = (1+w) eps(x,c) - w eps(x,null).")] = None,
    guide: Annotated[Optional[list[str]], typer.Option(
        metavar="HEAD[:w[:target]] ...", help="Heads to guide with; several multiply as a product of experts.")] = None,
    target: Annotated[Optional[str], typer.Option(help=(
        "Class the classifier heads should see. Default for a two-class head: its positive class 1 (also "
        "spelt by the head's label, e.g. has_circle); 0 selects the other. HEAD:w:target sets it per head."))]
        = None,
    mask: Annotated[Optional[Path], typer.Option(
        help="Mask (PNG or .npy of class ids) for segmentation heads.")] = None,
    lam: Annotated[float, typer.Option("--lambda", help=(
        "Guidance scale lambda of Eq. 13, the paper's: the gradient is that of the heads' raw log-softmax "
        "(temperature 1, whatever temperature train-head calibrated), so lambda means the same for every head. "
        "x0_hat is clamped to [-1, 1] before the heads read it and the gradient passes the clamp unchanged, in "
        "both --guide-grad modes."))] = 1.0,
    guide_grad: Annotated[str, typer.Option(
        help="full: differentiate through the denoiser (paper); x0: hold eps constant (cheaper).")] = "full",
    guide_window: Annotated[Optional[tuple[int, int]], typer.Option(
        help="Guide only while LO <= t <= HI (schedule indices), given as HI LO.")] = None,
    guide_model: Annotated[Optional[Path], typer.Option(
        help="The model whose features the heads read, when it is not --model (e.g. the unconditional model a "
             "class-conditional --model was fine-tuned from).")] = None,
    reject: Annotated[Optional[Path], typer.Option(
        help="Rejection head (on the unconditional model's features): keep drawing until -n images of each "
             "class are accepted.")] = None,
    threshold: Annotated[float, typer.Option(help="Accept a sample when the rejection head's p(class) >= this.")] = 0.2,
    reject_model: Annotated[Optional[Path], typer.Option(
        help="The unconditional model the rejection head reads (default: the shipped model).")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Sample images: unconditional, guided by heads (--guide), class-conditional (--class, --cfg), with a
    rejection head (--reject), or any combination of them."""
    from ddguide.generate import RejectSpec, SampleConfig, sample as run_sample

    precision = _precision(precision, device)
    cfg = SampleConfig(
        out=str(out), model=str(model) if model else None, n=n, steps=steps, sampler=sampler, eta=eta, seed=seed,
        batch=batch, device=device, precision=precision, guides=list(guide or []), target=target,
        mask=str(mask) if mask else None, lam=lam, guide_grad=guide_grad, guide_window=guide_window,
        guide_model=str(guide_model) if guide_model else None,
        classes=list(class_ or []), cfg_scale=cfg_scale,
        reject=RejectSpec(str(reject), threshold, str(reject_model) if reject_model else None) if reject else None)
    cfg.validate()
    with progress_bar("accepted" if reject else "sampling") as bar:
        result = run_sample(cfg, progress=bar.update)
    if result.per_class is not None:
        _acceptance_table(result)
        out_console.print(f"wrote {result.kept} accepted images, index.csv and grid.png to {out}")
        report(out=out, images=result.kept, kept=result.kept, per_class=result.per_class)
        return
    out_console.print(f"wrote {n} images, index.csv and grid.png to {result.out}")
    report(out=result.out, images=n)


# ----------------------------------------------------------------------------------------------- train


@app.command(cls=ListCommand)
@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="Image folder (flat or class sub-folders).")],
    out: Annotated[Path, typer.Option(help="Model artifact to write; a checkpoint is kept beside it.")],
    preset: Annotated[str, typer.Option(help="Architecture preset.")] = "shapes32",
    steps: StepsOpt = 20000,
    batch: BatchOpt = 64,
    lr: LrOpt = 2e-4,
    lr_final: Annotated[Optional[float], typer.Option(
        help="Decay the learning rate along a half cosine to this by the last step (default: constant). "
             "The run is then tied to --steps.")] = None,
    ema: EmaOpt = 0.999,
    grad_clip: GradClipOpt = 1.0,
    schedule: Annotated[Optional[str], typer.Option(help="linear or cosine (default: the preset's).")] = None,
    precision: PrecisionOpt = "auto",
    seed: TrainSeedOpt = 0,
    checkpoint_every: CheckpointEveryOpt = 250,
    resize: Annotated[str, typer.Option(help="Images of another size: refuse, resize or center-crop.")] = "refuse",
    threads: ThreadsOpt = None,
    init: Annotated[Optional[Path], typer.Option(
        help="Start from this model artifact's weights (same preset), e.g. to train the shipped model "
             "further.")] = None,
    p2_gamma: Annotated[float, typer.Option(
        help="Perception-prioritised weighting (Choi et al. 2022): weight each image's loss by "
             "1 / (k + SNR(t))^gamma, favouring the noisier steps that lay out content; 0 is plain L_simple, "
             "the P2 paper uses 1 (or 0.5).")] = 0.0,
    p2_k: Annotated[float, typer.Option(help="The k of --p2-gamma's weight.")] = 1.0,
    compile_: CompileOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train an unconditional diffusion model; rerun the same command to resume after a stop.

    Rerunning with a smaller --steps than the checkpoint has reached writes the model from that checkpoint."""
    from ddguide.models import is_main_process
    from ddguide.train import TrainConfig, train as run, train_recipe

    recipe = train_recipe(steps=steps, batch=batch, lr=lr, lr_final=lr_final, ema_decay=ema, grad_clip=grad_clip,
                          precision=_precision(precision, device, compile_), seed=seed,
                          checkpoint_every=checkpoint_every, compile=compile_, p2_gamma=p2_gamma, p2_k=p2_k)
    cfg = TrainConfig(data=str(data), out=str(out), preset=preset, recipe=recipe, schedule=schedule,
                      init=str(init) if init else None, resize=resize, threads=threads, device=device)
    with progress_bar("training") as bar:
        path = run(cfg, progress=bar.update)
    if is_main_process():  # under torchrun, rank 0 wrote the model
        out_console.print(f"wrote {path}")
        report(out=path, steps=_artifact_config(path).get("trained_steps"))


# ----------------------------------------------------------------------------------------------- data


@data_app.command("shapes", cls=ListCommand)
@handle_errors
def data_shapes(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    n: Annotated[int, typer.Option("-n", "--num-images", help="Number of images.")] = 1000,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed; the same arguments give byte-identical files.")] = 0,
    split: Annotated[str, typer.Option(help="train, val or test (each split draws different images).")] = "train",
) -> None:
    """Write the built-in procedural shapes dataset (images, classes, attributes, masks)."""
    from ddguide.shapes import ShapesConfig, generate

    refuse_existing(out)
    with progress_bar("generating") as bar:
        generate(out, ShapesConfig(n=n, size=size, seed=seed, split=split), progress=bar.update)
    out_console.print(f"wrote {n} images to {out}")
    report(out=out, images=n)


# ----------------------------------------------------------------------------------------------- method


@app.command(cls=ListCommand)
@handle_errors
def extract(
    data: Annotated[Path, typer.Argument(help="Image folder (flat, or class sub-folders whose names are labels).")],
    out: Annotated[Path, typer.Option(help="Features artifact to write (.safetensors).")],
    model: ModelOpt = None,
    timesteps: Annotated[list[str], typer.Option(metavar="T ...", help=(
        "Feature timesteps T_f, or auto (with --blocks auto: sweep 10, 30, 50 and 80 % of the model's steps)."))]
        = list(map(str, DEFAULT_TIMESTEPS)),
    blocks: Annotated[list[str], typer.Option(metavar="BLOCK ...", help=(
        "Blocks to tap: in.<i>, mid, out.<i>; or auto: a held-out sweep over mid and the decoder's upsampling "
        "blocks (alone and with a neighbour) x the timesteps, on the labelled images; it prints the table and "
        "keeps the best. Default: " + DEFAULT_BLOCKS_RULE + ", chosen by measurement (README, "
        "benchmarks/taps.py)."), show_default=False)] = [],
    noise: Annotated[str, typer.Option(help="none: clean image (official code); fixed: q(x_T|x0) with a fixed "
                                            "seed per image (Baranchuk et al.).")] = "none",
    seed: Annotated[int, typer.Option(help="Seed of the fixed noise.")] = 0,
    labels: Annotated[Optional[Path], typer.Option(help="Attribute table: CSV file,attr,... or "
                                                        "list_attr_celeba.txt.")] = None,
    label: Annotated[Optional[str], typer.Option(help="The attribute column to use.")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="Folder of masks (PNG or .npy) paired by file stem.")] = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    storage: Annotated[str, typer.Option(help="fp32 or fp16 on disk.")] = "fp32",
    resize: Annotated[str, typer.Option(help="Images of another size: refuse, resize or center-crop.")] = "refuse",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Extract denoiser features (native resolution, streamed to disk) with labels or masks."""
    from ddguide.features import ExtractConfig, extract as run
    from ddguide.models import is_main_process
    from ddguide.tapsweep import AUTO, extract_auto

    precision = _precision(precision, device)

    auto_blocks, auto_times = blocks == [AUTO], timesteps == [AUTO]
    if (AUTO in blocks and not auto_blocks) or (AUTO in timesteps and not auto_times):
        raise UserError("auto stands alone: --blocks auto, --timesteps auto")
    if auto_times and not auto_blocks:
        raise UserError("--timesteps auto goes with --blocks auto")
    cfg = ExtractConfig(data=str(data), out=str(out), model=str(model) if model else None,
                        blocks=tuple(blocks) if not auto_blocks else (), noise=noise, seed=seed,
                        timesteps=() if auto_times else _int_list(timesteps, "--timesteps"),
                        labels=str(labels) if labels else None, label=label, masks=str(masks) if masks else None,
                        batch=batch, storage=storage, device=device, precision=precision, resize=resize)
    if auto_blocks:
        with progress_bar("choosing taps") as bar:
            path, rows = extract_auto(cfg, auto_blocks=True, auto_times=auto_times, progress=bar.update)
        table = Table(title="held-out accuracy of a linear probe per tap set (k-fold on the labelled images)")
        for column in ("blocks", "timesteps", "accuracy", "spread", "channels"):
            table.add_column(column, justify="left" if column in ("blocks", "timesteps") else "right")
        for row in rows:
            table.add_row(" ".join(row.blocks), " ".join(map(str, row.timesteps)), f"{row.accuracy:.3f}",
                          f"{row.spread:.3f}", str(row.channels))
        console.print(table)
        best = rows[0]
        console.print(f"chose --blocks {' '.join(best.blocks)} --timesteps {' '.join(map(str, best.timesteps))}",
                      highlight=False)
        report(sweep=[row.to_dict() for row in rows])
    else:
        with progress_bar("extracting") as bar:
            path = run(cfg, progress=bar.update)
    if is_main_process():  # under torchrun, rank 0 joined the parts
        out_console.print(f"wrote {path}")
        written = _artifact_config(path)
        spec = written.get("spec", {})
        report(out=path, images=written.get("count"), blocks=spec.get("blocks"), timesteps=spec.get("timesteps"))


def _int_list(values: list[str], name: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        raise UserError(f"{name}: expected whole numbers, got {' '.join(values)}") from None
    if any(v < 0 for v in numbers):
        raise UserError(f"{name}: values must not be negative")
    return numbers


@app.command("train-head", cls=ListCommand)
@handle_errors
def train_head(
    features: Annotated[Path, typer.Argument(help="Features artifact from `ddguide extract`.")],
    out: Annotated[Path, typer.Option(help="Head artifact to write.")],
    kind: Annotated[str, typer.Option(help="classifier, segmentation, rejection or pixel (DDIM-I).")] = "classifier",
    steps: Annotated[Optional[int], typer.Option(help="Optimisation steps (default depends on --kind).")] = None,
    batch: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(help="Held-out share for the metric and calibration.")] = 0.2,
    blocks: Annotated[Optional[list[str]], typer.Option(metavar="BLOCK ...", help="Use only these of the extracted blocks.")] = None,
    timesteps: Annotated[Optional[list[int]], typer.Option(metavar="T ...", help="Use only these extracted timesteps.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, initialisation and batches.")] = 0,
) -> None:
    """Train a head on denoiser features (or on pixels, --kind pixel)."""
    from ddguide.heads import TrainHeadConfig, chance_warning, load_head, train_head as run

    cfg = TrainHeadConfig(features=str(features), out=str(out), kind=kind, steps=steps, batch=batch, lr=lr,
                          val_fraction=val_fraction, seed=seed, blocks=tuple(blocks) if blocks else None,
                          timesteps=tuple(timesteps) if timesteps else None)
    with progress_bar("training head") as bar:
        path = run(cfg, progress=bar.update)
    head = load_head(path)
    warning = chance_warning(head.cfg.metrics)
    if warning:
        from rich.markup import escape

        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True, markup=True)
    metrics = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in head.cfg.metrics.items())
    out_console.print(f"wrote {path} ({metrics}; temperature {head.cfg.temperature:.2f})")
    report(out=path, kind=head.cfg.kind, metrics=head.cfg.metrics, temperature=head.cfg.temperature)


@app.command(cls=ListCommand)
@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, features, head, samples and demo.png.")] = Path(
        "ddguide-demo"),
    attribute: Annotated[str, typer.Option(help="Attribute of the shapes domain to guide towards.")] = "has_circle",
    lam: Annotated[float, typer.Option("--lambda", help=(
        "Guidance scale lambda of Eq. 13 (the default is where README's lambda curve for the demo's head levels "
        "off; benchmarks/lambda_curve.py)."))] = DEMO_LAMBDA,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    n: Annotated[int, typer.Option("-n", "--num-images", help="Samples of each kind (guided and unguided).")] = 16,
    labels: Annotated[int, typer.Option(help="Labelled images per side (with / without the attribute).")] = 50,
    guide_grad: Annotated[str, typer.Option(help="full or x0 (see `sample --help`).")] = DEMO_GRAD,
    seed: Annotated[int, typer.Option(help="Seed of the data, head and samples.")] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """The few-shot pipeline on the shipped model: 50+50 labels -> head -> guided vs unguided samples."""
    from ddguide.demo import DemoConfig, run_demo

    precision = _precision(precision, device)

    cfg = DemoConfig(out=str(out), attribute=attribute, lam=lam, steps=steps, n=n, labels=labels, grad=guide_grad,
                     seed=seed, model=str(model) if model else None, device=device, precision=precision)
    with progress_bar("demo") as bar:  # one bar; its text names the stage (data, features, head, sampling)
        result = run_demo(cfg, progress=lambda stage, done, total: bar.update(done, total, stage))
    table = Table(title=f"attribute {result.attribute!r} (base rate {result.base_rate:.2f} in the data)")
    table.add_column("samples")
    table.add_column("oracle: share with the attribute", justify="right")
    table.add_row("unguided", f"{result.unguided:.2f}")
    table.add_row(f"guided (lambda {lam}, {guide_grad})", f"{result.guided:.2f}")
    out_console.print(table)
    out_console.print(f"head accuracy on held-out labels {result.head_accuracy:.2f}; grid (top: unguided, bottom: "
                      f"guided, same seeds): {result.grid}")
    report(out=out, unguided=result.unguided, guided=result.guided, head_accuracy=result.head_accuracy,
           grid=result.grid, base_rate=result.base_rate)


@app.command("filter", cls=ListCommand)
@handle_errors
def filter_command(
    folder: Annotated[Path, typer.Argument(help="Samples folder with an index.csv holding a class column.")],
    head: Annotated[Path, typer.Option(help="Rejection head (train-head --kind rejection).")],
    out: Annotated[Path, typer.Option(help="Folder for the accepted samples.")],
    threshold: Annotated[float, typer.Option(help="Keep a sample when p(its class) >= this (paper: 0.2).")] = 0.2,
    model: Annotated[Optional[Path], typer.Option(
        help="The unconditional model the head reads (default: the shipped model).")] = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Keep the samples that a rejection head on the unconditional model's features accepts."""
    from ddguide.filter import FilterConfig, filter_folder
    from ddguide.models import is_main_process

    refuse_existing(out)
    with progress_bar("filtering") as bar:
        result = filter_folder(FilterConfig(str(folder), str(head), str(out), threshold,
                                            str(model) if model else None, batch, device), progress=bar.update)
    if is_main_process():  # under torchrun every rank knows the result; one prints it
        _acceptance_table(result)
        out_console.print(f"kept {result.kept} of {result.total} samples in {out}")
        report(out=out, kept=result.kept, total=result.total, per_class=result.per_class)


def _acceptance_table(result: Any) -> None:
    table = Table(title="acceptance per class")
    for column in ("class", "accepted", "drawn", "rate"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, (kept, seen) in result.per_class.items():
        table.add_row(str(name), str(kept), str(seen), f"{kept / max(seen, 1):.2f}")
    out_console.print(table)


# ----------------------------------------------------------------------------------------------- info


@app.command(cls=ListCommand)
@handle_errors
def info(file: Annotated[Path, typer.Argument(help="Any ddguide artifact.")]) -> None:
    """Say what an artifact is and where it came from."""
    from ddguide import artifacts

    about = artifacts.describe(file)
    about.typed()  # a config its kind's loader would refuse is refused here too
    table = Table(show_header=False, box=None)
    table.add_row("file", str(file))
    for key, value in {**about.envelope(), **dict(sorted(about.extra.items()))}.items():
        table.add_row(key, value)
    out_console.print(table)
    out_console.print_json(json.dumps(about.config))  # json.dumps escapes control characters
    report(file=file, **about.envelope(), config=about.config)


# --- fid ---


@app.command("fid", cls=ListCommand)
@handle_errors
def fid_command(
    a: Annotated[Path, typer.Argument(help="Image folder, samples folder (with index.csv), index.csv, "
                                           "fid-stats .safetensors or pytorch-fid .npz.")],
    b: Annotated[Optional[Path], typer.Argument(help="The set to compare A with (same kinds as A); "
                                                     "may be left out with --save-stats.")] = None,
    features: Annotated[str, typer.Option(
        help="inception (the standard FID; needs pytorch-fid's Inception weights), denoiser (mid-block features "
             "of --model at --timestep; offline, comparable only with itself) or auto (inception when its "
             "weights are found).")] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option(
        help="pt_inception-2015-12-05-6726825d.pth or .safetensors (default: $DDGUIDE_INCEPTION_WEIGHTS, then "
             "$TORCH_HOME/hub/checkpoints/ where pytorch-fid keeps it).")] = None,
    model: ModelOpt = None,
    timestep: Annotated[int, typer.Option(help="Feature timestep T_f of denoiser features.")] = 100,
    save_stats: Annotated[Optional[Path], typer.Option(
        help="Write A's statistics to this fid-stats .safetensors, to pass later instead of A.")] = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 50,
    resize: Annotated[str, typer.Option(
        help="Denoiser features need the model's image size: refuse, resize or center-crop other sizes.")] = "refuse",
    device: DeviceOpt = "auto",
) -> None:
    """Fréchet distance between two image sets (pytorch-fid compatible with inception features)."""
    from ddguide.fid import FidConfig, run_fid

    cfg = FidConfig(a=str(a), b=str(b) if b is not None else None, features=features,
                    inception_weights=str(inception_weights) if inception_weights else None,
                    model=str(model) if model else None, timestep=timestep, batch=batch, device=device,
                    save_stats=str(save_stats) if save_stats else None, resize=resize)
    with progress_bar("features") as bar:  # appears at the first image batch: stats-only runs show none
        result = run_fid(cfg, progress=lambda label, done, total: bar.update(done, total, label))
    console.print(f"using {result.note}", highlight=False)
    if result.saved is not None:
        console.print(f"wrote statistics of {a} ({result.a.n} images) to {result.saved}", highlight=False)
    if result.fid is not None:
        sizes = " vs ".join(str(s.n) if s.n else "?" for s in (result.a, result.b))
        console.print(f"{result.feature_space}, {sizes} images", highlight=False)
        out_console.print(f"FID {result.fid:.4f}", highlight=False)
    report(**({"out": result.saved} if result.saved is not None else {}), fid=result.fid,
           feature_space=result.feature_space, n_a=result.a.n, n_b=result.b.n if result.b is not None else None)


# --- end fid ---


# --- finetune ---


@app.command(cls=ListCommand)
@handle_errors
def finetune(
    data: Annotated[Path, typer.Argument(
        help="Labelled images: DATA/<class>/*.png, DATA/images/<class>/ (ddguide data shapes), Tiny ImageNet's "
             "root or a samples folder whose index.csv has a class column.")],
    out: Annotated[Path, typer.Option(help="Class-conditional model to write; a checkpoint is kept beside it.")],
    model: ModelOpt = None,
    steps: StepsOpt = 10000,
    batch: BatchOpt = 64,
    lr: LrOpt = 1e-4,
    label_dropout: Annotated[float, typer.Option(
        help="Probability that a label is replaced by the null class (keeps the model unconditional too, "
             "for classifier-free guidance).")] = 0.1,
    ema: EmaOpt = 0.999,
    grad_clip: GradClipOpt = 1.0,
    precision: PrecisionOpt = "auto",
    seed: FinetuneSeedOpt = 0,
    checkpoint_every: CheckpointEveryOpt = 250,
    resize: Annotated[str, typer.Option(
        help="Images of another size than the model's: refuse, resize or center-crop.")] = "refuse",
    threads: ThreadsOpt = None,
    compile_: CompileOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Fine-tune an unconditional model into a class-conditional one (label dropout, for --cfg sampling);
    rerun the same command to resume after a stop."""
    from ddguide.finetune import FinetuneConfig, finetune as run, finetune_recipe
    from ddguide.models import is_main_process

    recipe = finetune_recipe(steps=steps, batch=batch, lr=lr, ema_decay=ema, grad_clip=grad_clip,
                             precision=_precision(precision, device, compile_), seed=seed,
                             checkpoint_every=checkpoint_every, compile=compile_)
    cfg = FinetuneConfig(data=str(data), out=str(out), model=str(model) if model else None, recipe=recipe,
                         label_dropout=label_dropout, resize=resize, threads=threads, device=device)
    with progress_bar("fine-tuning") as bar:
        path = run(cfg, progress=bar.update)
    if is_main_process():
        out_console.print(f"wrote {path}")
        report(out=path, steps=_artifact_config(path).get("trained_steps"))


# --- end finetune ---


# --- cas ---


@app.command("cas", cls=ListCommand)
@handle_errors
def cas_command(
    train: Annotated[list[Path], typer.Option(
        metavar="DIR ...", help="Training images (several combine): labelled folders or samples folders with a class column.")],
    test: Annotated[Path, typer.Option(
        help="REAL labelled test images (class folders, Tiny ImageNet's root or val/ folder).")],
    arch: Annotated[str, typer.Option(
        help="resnet18, resnet34, resnet50, wide_resnet50_2 or resnext50_32x4d.")] = "resnet18",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    batch: BatchOpt = 256,
    lr: LrOpt = 1e-3,
    milestones: Annotated[tuple[int, int], typer.Option(
        help="The two epochs at which the learning rate is multiplied by 0.1, e.g. --milestones 20 30.")] = (20, 30),
    mixup_cutmix: Annotated[float, typer.Option(
        help="Probability that a batch is mixed by mixup or cutmix (evenly; Beta(1,1) weights).")] = 0.0,
    out: Annotated[Path, typer.Option(
        help="Report artifact to write; a checkpoint is kept beside it (rerun the same command to resume).")]
        = Path("cas_report.safetensors"),
    stem: Annotated[str, typer.Option(
        help="auto (3x3 stride-1 stem without max-pool for images of 64 px or less), small or imagenet.")] = "auto",
    image_size: Annotated[Optional[int], typer.Option(
        help="Classifier input side (default: the test images' side).")] = None,
    resize: Annotated[str, typer.Option(
        help="Images of another size: refuse, resize or center-crop.")] = "refuse",
    seed: CasSeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
) -> None:
    """Classification Accuracy Score: train a classifier on (synthetic) data, test it on real data."""
    from ddguide.cas import CasConfig, cas as run

    cfg = CasConfig(train=[str(t) for t in train], test=str(test), out=str(out), arch=arch, epochs=epochs,
                    batch=batch, lr=lr, milestones=list(milestones), mixup_cutmix=mixup_cutmix, stem=stem,
                    image_size=image_size, resize=resize, seed=seed, precision=precision, device=device,
                    threads=threads)
    with progress_bar("CAS") as bar:
        result = run(cfg, progress=bar.update)
    table = Table(title="Classification Accuracy Score (real test set)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1", f"{100 * result.top1:.2f}%")
    table.add_row(f"top-{result.k}", f"{100 * result.top5:.2f}%")
    table.add_row("train / test images", f"{result.n_train} / {result.n_test}")
    worst = sorted(result.per_class.items(), key=lambda kv: kv[1])
    shown = worst if len(worst) <= 12 else worst[:5] + worst[-5:]
    for name, acc in shown:
        table.add_row(f"class {name}", f"{100 * acc:.1f}%")
    out_console.print(table)
    if len(worst) > len(shown):
        out_console.print(f"(the 5 worst and 5 best of {len(worst)} classes; all are in {result.report})")
    out_console.print(f"wrote {result.report}")
    report(out=result.report, top1=result.top1, topk=result.top5, k=result.k, n_train=result.n_train,
           n_test=result.n_test, per_class=result.per_class)


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
