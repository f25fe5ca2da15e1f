"""The evaluation commands: `fid` and `cas`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ddguide.cli import ModelOpt, app, console, handle_errors, out_console, progress_bar, report
from ddguide.cli.args import ListCommand
from ddguide.cli.options import BatchOpt, CasSeedOpt, DeviceOpt, LrOpt, PrecisionOpt, ShardOpt, ThreadsOpt

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
             "weights are found). Inception reads grey images as RGB; denoiser features read images at --model's "
             "channels (a 1-channel model refuses colour images).")] = "auto",
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
    shard: ShardOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(help=(
        "auto (here fp32, so that statistics saved on one machine compare with those of another and with "
        "pytorch-fid's), fp32, bf16 or fp16 (CUDA) autocast of the feature network: faster, approximate."))]
        = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Fréchet distance between two image sets: the FID with Inception features (pytorch-fid compatible), a
    Fréchet distance on denoiser features otherwise (labelled by its feature space, never called FID)."""
    from ddguide.core.runtime import is_main_process, set_threads
    from ddguide.metrics.fid import INCEPTION_SPACE, FidConfig, run_fid

    set_threads(threads)
    cfg = FidConfig(a=str(a), b=str(b) if b is not None else None, features=features,
                    inception_weights=str(inception_weights) if inception_weights else None,
                    model=str(model) if model else None, timestep=timestep, batch=batch, device=device,
                    precision="fp32" if precision == "auto" else precision,
                    save_stats=str(save_stats) if save_stats else None, resize=resize, shard=shard)
    with progress_bar("features") as bar:  # appears at the first image batch: stats-only runs show none
        result = run_fid(cfg, progress=lambda label, done, total: bar.update(done, total, label))
    if not is_main_process():  # under torchrun every rank has the result; rank 0 reports it
        return
    console.print(f"using {result.note}", highlight=False)
    if not result.joined:
        console.print(f"wrote shard {shard} of the statistics of {a} ({result.a.n} images) to {result.saved}; "
                      f"the last shard to finish joins the parts into {save_stats}", highlight=False)
        report(out=result.saved, shard=shard, joined=False, n_a=result.a.n)
        return
    if result.saved is not None:
        console.print(f"wrote statistics of {a} ({result.a.n} images) to {result.saved}", highlight=False)
    if result.fid is not None:
        sizes = " vs ".join(str(s.n) if s.n else "?" for s in (result.a, result.b))
        console.print(f"{result.feature_space}, {sizes} images", highlight=False)
        if result.feature_space == INCEPTION_SPACE:
            out_console.print(f"FID {result.fid:.4f}", highlight=False)
        else:  # not an FID: the distance is named by the features it was computed on
            out_console.print(f"Fréchet distance ({result.feature_space} features) {result.fid:.4f}",
                              highlight=False)
    is_fid = result.feature_space == INCEPTION_SPACE
    report(**({"out": result.saved} if result.saved is not None else {}), distance=result.fid,
           fid=result.fid if is_fid else None, feature_space=result.feature_space, n_a=result.a.n,
           n_b=result.b.n if result.b is not None else None)


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
        help="Report artifact to write. A checkpoint beside it lets a stopped run resume (rerun the same command); "
             "it is removed once the report is written, unless --keep-checkpoint.")]
        = Path("cas_report.safetensors"),
    keep_checkpoint: Annotated[bool, typer.Option(
        "--keep-checkpoint", help=(
            "Keep the trained classifier's checkpoint beside the report (--shard runs test with it; joining their "
            "parts removes it unless a shard was given --keep-checkpoint too)."))] = False,
    stem: Annotated[str, typer.Option(
        help="auto (3x3 stride-1 stem without max-pool for images of 64 px or less), small or imagenet.")] = "auto",
    image_size: Annotated[Optional[int], typer.Option(
        help="Classifier input side (default: the test images' side).")] = None,
    resize: Annotated[str, typer.Option(
        help="Images of another size: refuse, resize or center-crop.")] = "refuse",
    seed: CasSeedOpt = 0,
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help=(
        "Random horizontal flips of the training images; --no-hflip for data whose mirror image is another "
        "thing (digits, text)."))] = True,
    shard: Annotated[Optional[str], typer.Option(metavar="I/N", help=(
        "Test the I-th of N consecutive slices of the test images (0 <= I < N) with the classifier trained "
        "before (its checkpoint beside --out: train first without --shard or under torchrun, with "
        "--keep-checkpoint), for job arrays "
        "whose processes cannot talk: each shard writes its part of the report and the last to finish joins "
        "the parts (else `ddguide merge OUT`). Under torchrun leave it out: the ranks train with DDP and split "
        "the test set themselves."))] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
) -> None:
    """Classification Accuracy Score: train a classifier on (synthetic) data, test it on real data."""
    from ddguide.core.runtime import is_main_process
    from ddguide.stages.cas import CasConfig
    from ddguide.stages.cas import cas as run

    cfg = CasConfig(train=[str(t) for t in train], test=str(test), out=str(out), arch=arch, epochs=epochs,
                    batch=batch, lr=lr, milestones=list(milestones), mixup_cutmix=mixup_cutmix, stem=stem,
                    image_size=image_size, resize=resize, seed=seed, precision=precision, device=device,
                    threads=threads, hflip=hflip, keep_checkpoint=keep_checkpoint, shard=shard)
    warning = [cfg.milestone_warning()]  # said once training starts: a refused run keeps its one error line

    def update(done: int, total: int, info: str = "") -> None:
        if warning[0]:
            from rich.markup import escape

            console.print(f"[yellow]warning:[/yellow] {escape(warning.pop())}", highlight=False, soft_wrap=True,
                          markup=True)
            warning.append(None)
        bar.update(done, total, info)

    with progress_bar("CAS") as bar:
        result = run(cfg, progress=update)
    if not is_main_process():  # under torchrun every rank has the result; rank 0 reports it
        return
    if not result.joined:
        console.print(f"wrote shard {shard} of the report ({result.n_test} test images, top-1 "
                      f"{100 * result.top1:.2f}%) to {result.report}; the last shard to finish joins the parts "
                      f"into {out}", highlight=False)
        report(out=result.report, shard=shard, joined=False, n_test=result.n_test)
        return
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
