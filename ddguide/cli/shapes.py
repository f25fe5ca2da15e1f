"""The built-in domain's commands: `data shapes` and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ddguide.cli import (
    ModelOpt,
    _precision,
    app,
    data_app,
    handle_errors,
    out_console,
    progress_bar,
    refuse_existing,
    report,
)
from ddguide.cli.args import ListCommand
from ddguide.cli.options import DeviceOpt, PrecisionOpt, ThreadsOpt
from ddguide.core.defaults import DEMO_GRAD, DEMO_LAMBDA
from ddguide.core.errors import UserError

# ----------------------------------------------------------------------------------------------- data


@data_app.command("shapes", cls=ListCommand)
@handle_errors
def data_shapes(
    folder: Annotated[Optional[Path], typer.Argument(
        metavar="OUT", help="Folder to write the dataset into (or --out, as the other commands spell it).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder to write the dataset into (or the argument OUT).")]
        = None,
    n: Annotated[int, typer.Option("-n", "--num-images", help="Number of images.")] = 1000,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed; the same arguments give byte-identical files.")] = 0,
    split: Annotated[str, typer.Option(help="train, val or test (each split draws different images).")] = "train",
) -> None:
    """Write the built-in procedural shapes dataset (images, classes, attributes, masks)."""
    from ddguide.shapes.dataset import ShapesConfig, generate

    if folder is not None and out is not None and folder != out:
        raise UserError(f"give the output folder once: OUT {folder} and --out {out} differ")
    out = out or folder
    if out is None:
        raise UserError("give the folder to write the dataset into: `ddguide data shapes OUT` or --out OUT")
    refuse_existing(out)
    with progress_bar("generating") as bar:
        generate(out, ShapesConfig(n=n, size=size, seed=seed, split=split), progress=bar.update)
    out_console.print(f"wrote {n} images to {out}")
    report(out=out, images=n)


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
    threads: ThreadsOpt = None,
) -> None:
    """The few-shot pipeline on the shipped model: 50+50 labels -> head -> guided vs unguided samples."""
    from ddguide.core.runtime import set_threads
    from ddguide.shapes.demo import DemoConfig, run_demo

    precision = _precision(precision, device)
    set_threads(threads)

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
