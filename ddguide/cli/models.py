"""Commands that make or describe models: `convert`, `train`, `finetune` and `info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ddguide.cli import ModelOpt, _precision, app, artifact_config, handle_errors, out_console, progress_bar, report
from ddguide.cli.args import ListCommand
from ddguide.cli.options import (
    BatchOpt,
    CheckpointEveryOpt,
    CompileOpt,
    DeviceOpt,
    EmaOpt,
    FinetuneSeedOpt,
    GradClipOpt,
    LrOpt,
    PrecisionOpt,
    StepsOpt,
    ThreadsOpt,
    TrainSeedOpt,
)
from ddguide.core.errors import UserError

# ----------------------------------------------------------------------------------------------- convert


@app.command(cls=ListCommand)
@handle_errors
def convert(
    checkpoint: Annotated[Path, typer.Argument(help=(
        "openai improved-/guided-diffusion .pt, or .safetensors; or a diffusers UNet2DModel folder (config.json, "
        "diffusion_pytorch_model.safetensors, and scheduler_config.json beside it or in ../scheduler/; needs "
        "diffusers)."))],
    out: Annotated[Path, typer.Option(help="Model artifact to write (.safetensors).")],
    preset: Annotated[Optional[str], typer.Option(help="Architecture preset (default: from the file name).")] = None,
    arch: Annotated[Optional[str], typer.Option(
        help='Architecture options as JSON for checkpoints matching no preset, e.g. '
             '\'{"image_size": 64, "model_channels": 128, "num_res_blocks": 3}\'.')] = None,
    diffusion: Annotated[Optional[str], typer.Option(
        help='Diffusion settings as JSON, e.g. \'{"steps": 4000, "schedule": "cosine", '
             '"rescale_timesteps": true}\'.')] = None,
) -> None:
    """Convert a published checkpoint or a diffusers UNet2DModel folder into a ddguide model artifact."""
    from ddguide.stages.convert import ConvertConfig
    from ddguide.stages.convert import convert as run

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


# ----------------------------------------------------------------------------------------------- train


@app.command(cls=ListCommand)
@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="Image folder (flat or class sub-folders).")],
    out: Annotated[Path, typer.Option(help="Model artifact to write; a checkpoint is kept beside it.")],
    preset: Annotated[str, typer.Option(
        help="Architecture preset (`ddguide presets` lists them with their sizes; small16, shapes32 and small64 "
             "are sized for a CPU).")] = "shapes32",
    arch: Annotated[Optional[str], typer.Option(
        help='U-Net options as JSON replacing the preset\'s (the fields `convert --arch` takes), e.g. '
             '\'{"image_size": 28, "channel_mult": [1, 2, 2]}\'.')] = None,
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
    channels: Annotated[Optional[int], typer.Option(
        help="Image channels of the model: 1 (grey) or 3 (RGB). Default: the --init model's, else 1 when every "
             "image is grey (mode L, or RGB with R == G == B everywhere) and 3 otherwise; a 3-channel model reads "
             "grey images as RGB, a 1-channel model refuses colour images.")] = None,
    p2_gamma: Annotated[float, typer.Option(
        help="Perception-prioritised weighting (Choi et al. 2022): weight each image's loss by "
             "1 / (k + SNR(t))^gamma, favouring the noisier steps that lay out content; 0 is plain L_simple, "
             "the P2 paper uses 1 (or 0.5).")] = 0.0,
    p2_k: Annotated[float, typer.Option(help="The k of --p2-gamma's weight.")] = 1.0,
    compile_: CompileOpt = False,
    device: DeviceOpt = "auto",
    preview: Annotated[int, typer.Option(help=(
        "Images in the sample grid redrawn beside the model at each checkpoint (OUT.samples.png; DDIM 25, the "
        "same noise each time); 0 for none."))] = 16,
    export: Annotated[bool, typer.Option(
        "--export", help="Write the model from the last checkpoint of a stopped run (the same command otherwise) "
                         "without training further.")] = False,
) -> None:
    """Train an unconditional diffusion model; rerun the same command to resume after a stop.

    Rerunning with a smaller --steps than the checkpoint has reached writes the model from that checkpoint; with
    --export the same command writes the model from the last checkpoint whatever --steps says."""
    from ddguide.core.runtime import is_main_process
    from ddguide.stages.train import TrainConfig, train_recipe
    from ddguide.stages.train import train as run

    recipe = train_recipe(steps=steps, batch=batch, lr=lr, lr_final=lr_final, ema_decay=ema, grad_clip=grad_clip,
                          precision=_precision(precision, device, compile_), seed=seed,
                          checkpoint_every=checkpoint_every, compile=compile_, p2_gamma=p2_gamma, p2_k=p2_k)
    cfg = TrainConfig(data=str(data), out=str(out), preset=preset, recipe=recipe, schedule=schedule,
                      init=str(init) if init else None, resize=resize, threads=threads, device=device,
                      preview=preview, export=export,
                      arch=_json_opt(arch, "--arch") or None, channels=channels)
    with progress_bar("training") as bar:
        path = run(cfg, progress=bar.update)
    if is_main_process():  # under torchrun, rank 0 wrote the model
        written = artifact_config(path)
        in_channels = written.get("unet", {}).get("in_channels")
        out_console.print(f"wrote {path} ({'grey, 1 channel' if in_channels == 1 else 'RGB, 3 channels'})")
        report(out=path, steps=written.get("trained_steps"), channels=in_channels)


# ----------------------------------------------------------------------------------------------- presets


@app.command(cls=ListCommand)
@handle_errors
def presets() -> None:
    """List the architecture presets (`train --preset`, `convert --preset`): image size, parameters, source."""
    from ddguide.core.presets import PRESETS, parameter_count

    table = Table(title="architecture presets")
    for column in ("preset", "image size", "parameters", "schedule", "source"):
        table.add_column(column, justify="right" if column in ("image size", "parameters") else "left")
    rows = []
    for name, p in PRESETS.items():
        n = parameter_count(p.unet)
        rows.append({"name": name, "image_size": p.unet.image_size, "parameters": n,
                     "schedule": f"{p.diffusion.schedule} {p.diffusion.steps}", "source": p.source})
        shown = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
        table.add_row(name, f"{p.unet.image_size}x{p.unet.image_size}", shown, rows[-1]["schedule"], p.source)
    out_console.print(table)
    report(presets=rows)


# ----------------------------------------------------------------------------------------------- info


@app.command(cls=ListCommand)
@handle_errors
def info(file: Annotated[Path, typer.Argument(help="Any ddguide artifact.")]) -> None:
    """Say what an artifact is and where it came from."""
    from ddguide.core import artifacts

    about = artifacts.describe(file)
    about.typed()  # a config its kind's loader would refuse is refused here too
    table = Table(show_header=False, box=None)
    table.add_row("file", str(file))
    for key, value in {**about.envelope(), **dict(sorted(about.extra.items()))}.items():
        table.add_row(key, value)
    null = _null_class_row(about)
    if null:
        table.add_row("null class", null)
    out_console.print(table)
    out_console.print_json(json.dumps(about.config))  # json.dumps escapes control characters
    report(file=file, **about.envelope(), config=about.config,
           **({"null_class": null.startswith("yes")} if null else {}))


def _null_class_row(about: Any) -> str | None:
    """For a class-conditional model: whether its last class row is the null class CFG needs (None otherwise)."""
    from ddguide.core.model import class_rows, null_class_of

    if about.kind != "model":
        return None
    meta = about.typed()
    null, rows = null_class_of(meta), class_rows(meta)
    if null is None or rows is None:
        return None
    return (f"yes (row {rows - 1}; {rows - 1} classes)" if null else
            f"no ({rows} classes; --cfg needs --cfg-uncond MODEL)")


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
    steps: StepsOpt = 2000,
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
    export: Annotated[bool, typer.Option(
        "--export", help="Write the model from the last checkpoint of a stopped run (the same command otherwise) "
                         "without training further.")] = False,
) -> None:
    """Fine-tune an unconditional model into a class-conditional one (label dropout, for --cfg sampling);
    rerun the same command to resume after a stop.

    The default 2000 steps take about 20 minutes on 2 CPU cores with the shipped model (~0.6 s a step at batch
    64); on a GPU give more (e.g. --steps 10000) for stronger class conditioning."""
    from ddguide.core.runtime import is_main_process
    from ddguide.stages.finetune import FinetuneConfig, finetune_recipe
    from ddguide.stages.finetune import finetune as run

    recipe = finetune_recipe(steps=steps, batch=batch, lr=lr, ema_decay=ema, grad_clip=grad_clip,
                             precision=_precision(precision, device, compile_), seed=seed,
                             checkpoint_every=checkpoint_every, compile=compile_)
    cfg = FinetuneConfig(data=str(data), out=str(out), model=str(model) if model else None, recipe=recipe,
                         label_dropout=label_dropout, resize=resize, threads=threads, device=device,
                         export=export)
    with progress_bar("fine-tuning") as bar:
        path = run(cfg, progress=bar.update)
    if is_main_process():
        out_console.print(f"wrote {path}")
        report(out=path, steps=artifact_config(path).get("trained_steps"))
