"""The paper's commands: `extract`, `train-head`, `sample` and `filter`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ddguide.cli import (
    ModelOpt,
    _precision,
    app,
    artifact_config,
    console,
    handle_errors,
    out_console,
    progress_bar,
    refuse_existing,
    report,
)
from ddguide.cli.args import ListCommand
from ddguide.cli.options import DeviceOpt, PrecisionOpt, ShardOpt, ThreadsOpt
from ddguide.core.defaults import DEFAULT_BLOCKS_RULE, DEFAULT_TIMESTEPS
from ddguide.core.errors import UserError

# ----------------------------------------------------------------------------------------------- sample


@app.command(cls=ListCommand)
@handle_errors
def sample(
    out: Annotated[Path, typer.Option(help="Folder for the PNGs, index.csv and grid.png.")] = Path("samples"),
    model: ModelOpt = None,
    n: Annotated[int, typer.Option("-n", "--num-images", help="Number of images.")] = 16,
    steps: Annotated[int, typer.Option(help="Sampling steps (respaced from the model's schedule).")] = 50,
    sampler: Annotated[str, typer.Option(help=(
        "ddpm (ancestral; from the shipped model at 50 steps 91.4 % of the samples are valid against DDIM's 86.7 %, "
        "README model card) or ddim (deterministic at eta 0, as the guidance benchmarks use)."))] = "ddpm",
    eta: Annotated[Optional[float], typer.Option(help=(
        "DDIM eta: 0 deterministic, 1 DDPM-like noise (default 0; 1 with --particles, whose resampled copies "
        "need noise to differ)."))] = None,
    seed: Annotated[int, typer.Option(help="Image k uses seed + k.")] = 0,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    class_: Annotated[Optional[list[str]], typer.Option(
        "--class", metavar="C ...", help="Class names or ids of a class-conditional model ('all' cycles evenly).")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(
        "--cfg", help="Classifier-free guidance weight w: eps = (1+w) eps(x,c) - w eps(x,null).")] = None,
    cfg_uncond: Annotated[Optional[Path], typer.Option(
        help="An unconditional model (same image size, channels and schedule) whose eps is --cfg's null branch: "
             "eps = (1+w) eps(x,c) - w eps_uncond(x). Needed by class-conditional models without a null class "
             "(converted guided-diffusion ones; `ddguide info` says).")] = None,
    guide: Annotated[Optional[list[str]], typer.Option(
        metavar="HEAD[:w[:target]] ...", help=(
            "Heads to guide with; several multiply as a product of experts. A plug-in guide is Python code: "
            "module:function[:w] or file.py:function[:w], a differentiable log_p(x0_hat) of (N, C, H, W) in "
            "[-1, 1] -> (N,) (README \"Python API\")."))] = None,
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
        help="Guide only while LO <= t <= HI (schedule indices), given as HI LO. Default: t >= 0.2 T (999 200 on a "
             "1000-step model: guiding below it changed no measured share); 999 0 guides at every step, as the "
             "paper does.")] = None,
    normalize_grad: Annotated[bool, typer.Option(
        "--normalize-grad", help="Rescale each image's guidance gradient to unit RMS before --lambda scales it "
                                 "(lambda becomes a step size, whatever the guides' scale).")] = False,
    guide_model: Annotated[Optional[Path], typer.Option(
        help="The model whose features the heads read, when it is not --model (e.g. the unconditional model a "
             "class-conditional --model was fine-tuned from).")] = None,
    reject: Annotated[Optional[Path], typer.Option(
        help="Rejection head (on the unconditional model's features): keep drawing until -n images of each "
             "class are accepted.")] = None,
    threshold: Annotated[float, typer.Option(help="Accept a sample when the rejection head's p(class) >= this.")] = 0.2,
    reject_model: Annotated[Optional[Path], typer.Option(
        help="The unconditional model the rejection head reads (default: the shipped model).")] = None,
    guide_every: Annotated[int, typer.Option(help="Guide (Eq. 13) only every k-th sampling step.")] = 1,
    particles: Annotated[int, typer.Option(help=(
        "K particles per image, steered by Feynman-Kac potentials from the heads' log p(y | x0_hat) (no backward "
        "pass; with --lambda > 0 the Eq. 13 step is the proposal); the best particle on the final image is kept. "
        "--batch counts images, each with K chains."))] = 1,
    smc: Annotated[Optional[str], typer.Option(help=(
        "Particle sampler: fk (Feynman-Kac steering; implied by --particles K > 1), or tds (the twisted diffusion "
        "sampler: the Eq. 13 gradient shifts each step's kernel by lambda sigma^2 grad, exact importance weights, "
        "the kept image drawn from the final weights; one backward pass per particle and step; needs a "
        "stochastic sampler; the potential scale is the twist's exponent)."))] = None,
    potential: Annotated[str, typer.Option(help=(
        "FK potential of a particle's lineage: max (running maximum of the reward), sum, or diff (its latest "
        "change)."))] = "max",
    potential_scale: Annotated[float, typer.Option(help="Potentials are exp(scale * reward statistic).")] = 1.0,
    resample_every: Annotated[int, typer.Option(help=(
        "Score the particles every this many steps and resample an image's particles when their effective sample "
        "size is below K/2."))] = 5,
    resample_window: Annotated[Optional[tuple[int, int]], typer.Option(
        help="Score and resample only while LO <= t <= HI (schedule indices), given as HI LO.")] = None,
    search: Annotated[Optional[str], typer.Option(help=(
        "best-of-n: draw N candidates per image and keep the verifier's best; zero-order: then rounds of N "
        "neighbours of the best starting noise on its sphere; prune: N candidates run the first steps and only "
        "the verifier's best go on (see --prune-at)."))] = None,
    candidates: Annotated[int, typer.Option(help="Candidates per image and per round for --search.")] = 4,
    rounds: Annotated[int, typer.Option(help="Zero-order search rounds after the first N candidates.")] = 2,
    search_step: Annotated[float, typer.Option(help="Zero-order step: the noise moves by this times a Gaussian "
                                                     "direction, then back to its sphere.")] = 0.5,
    prune_at: Annotated[Optional[list[str]], typer.Option(metavar="T:K ...", help=(
        "Schedule of the prune search: after the step at timestep T (the first kept one <= T) the verifier scores "
        "each live candidate's x0_hat and the best K go on. Default: the best 3/8 after 28 % of the steps, the best "
        "one after 64 % (with 25 DDIM steps, 8 candidates cost about 4 plain samples)."))] = None,
    verifier: Annotated[Optional[list[str]], typer.Option(metavar="HEAD[:w[:target]] ...", help=(
        "Heads that score particles and candidates (default: the --guide heads); they may differ from the "
        "guides."))] = None,
    shard: ShardOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Sample images: unconditional, guided by heads (--guide), by class (--class, --cfg, --reject), or both."""
    from ddguide.core.runtime import set_threads
    from ddguide.stages.sample import RejectSpec, SampleConfig
    from ddguide.stages.sample import sample as run_sample

    precision = _precision(precision, device)
    set_threads(threads)
    cfg = SampleConfig(
        out=str(out), model=str(model) if model else None, n=n, steps=steps, sampler=sampler, eta=eta, seed=seed,
        batch=batch, device=device, precision=precision, guides=list(guide or []), target=target,
        mask=str(mask) if mask else None, lam=lam, guide_grad=guide_grad, guide_window=guide_window,
        guide_model=str(guide_model) if guide_model else None,
        classes=list(class_ or []), cfg_scale=cfg_scale, cfg_uncond=str(cfg_uncond) if cfg_uncond else None,
        reject=RejectSpec(str(reject), threshold, str(reject_model) if reject_model else None) if reject else None,
        guide_every=guide_every, particles=particles, smc=smc, potential=potential, potential_scale=potential_scale,
        resample_every=resample_every, resample_window=resample_window, search=search, candidates=candidates,
        rounds=rounds, search_step=search_step, prune_at=parse_prune_at(prune_at or []),
        verifier=list(verifier or []), normalize_grad=normalize_grad,
        shard=shard)
    cfg.validate()
    with progress_bar("accepted" if reject else "sampling") as bar:
        result = run_sample(cfg, progress=bar.update)
    if result.per_class is not None:
        _acceptance_table(result)
        out_console.print(f"wrote {result.kept} accepted images, index.csv and grid.png to {out}")
        report(out=out, images=result.kept, kept=result.kept, per_class=result.per_class)
        return
    if shard is not None:
        joined = "joined every shard's index.csv and grid.png" if result.joined else "the last shard joins index.csv"
        out_console.print(f"wrote {result.kept} images (shard {shard}) to {result.out}; {joined}")
        report(out=result.out, images=result.kept, shard=shard, joined=result.joined)
        return
    out_console.print(f"wrote {n} images, index.csv and grid.png to {result.out}")
    report(out=result.out, images=n)


# ----------------------------------------------------------------------------------------------- method


@app.command(cls=ListCommand)
@handle_errors
def extract(
    data: Annotated[Path, typer.Argument(help=(
        "Image folder (flat, or class sub-folders whose names are labels). A 3-channel model reads grey images as "
        "RGB; a 1-channel (grey) model refuses colour images."))],
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
    shard: ShardOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Extract denoiser features (native resolution, streamed to disk) with labels or masks."""
    from ddguide.core.runtime import is_main_process, set_threads
    from ddguide.stages.extract import ExtractConfig
    from ddguide.stages.extract import extract as run
    from ddguide.stages.tapsweep import AUTO, extract_auto

    precision = _precision(precision, device)
    set_threads(threads)

    auto_blocks, auto_times = blocks == [AUTO], timesteps == [AUTO]
    if (AUTO in blocks and not auto_blocks) or (AUTO in timesteps and not auto_times):
        raise UserError("auto stands alone: --blocks auto, --timesteps auto")
    if auto_times and not auto_blocks:
        raise UserError("--timesteps auto goes with --blocks auto")
    cfg = ExtractConfig(data=str(data), out=str(out), model=str(model) if model else None,
                        blocks=tuple(blocks) if not auto_blocks else (), noise=noise, seed=seed,
                        timesteps=() if auto_times else _int_list(timesteps, "--timesteps"),
                        labels=str(labels) if labels else None, label=label, masks=str(masks) if masks else None,
                        batch=batch, storage=storage, device=device, precision=precision, resize=resize,
                        shard=shard)
    if auto_blocks and shard is not None:
        raise UserError("--blocks auto chooses taps on every image in one process: run it without --shard")
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
    if path != out:  # --shard: the shard's part, until the last shard joins the parts
        out_console.print(f"wrote {path} (shard {shard}); the last shard to finish joins the parts into {out}")
        report(out=path, shard=shard, joined=False)
    elif is_main_process():  # under torchrun, rank 0 joined the parts
        out_console.print(f"wrote {path}")
        written = artifact_config(path)
        spec = written.get("spec", {})
        report(out=path, images=written.get("count"), blocks=spec.get("blocks"), timesteps=spec.get("timesteps"))


def parse_prune_at(values: list[str]) -> list[tuple[int, int]]:
    """``--prune-at 760:4 600:1`` as [(760, 4), (600, 1)]."""
    pairs = []
    for v in values:
        t, sep, k = v.partition(":")
        if not sep or not t.strip().isdigit() or not k.strip().isdigit():
            raise UserError(f"--prune-at: expected T:K (a timestep and the candidates kept, e.g. 760:1), got {v!r}")
        pairs.append((int(t), int(k)))
    return pairs


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
    seed: Annotated[int, typer.Option(help="Seed of the split, initialisation, batches and augmentation.")] = 0,
    augment: Annotated[str, typer.Option(help=(
        "none; x0: also train on the taps of x0_hat(x_t) of the labelled images at t ~ U{0..T/2} (what a head "
        "reads while it guides); adv: also on adversarial versions of the labelled images (PGD on the head's "
        "loss within --adv-eps, through the feature pass), so that guidance must change the image to change "
        "the head's answer (README \"Heads guidance cannot fool\"); x0-adv: adversarial versions of the "
        "x0_hat inputs instead of the clean images. Classifier and segmentation heads; "
        "validation stays on clean images, plus val_accuracy_x0 (and val_accuracy_adv)."))] = "none",
    augment_fraction: Annotated[float, typer.Option(help="Share of each batch that --augment replaces.")] = 0.5,
    adv_eps: Annotated[float, typer.Option(help=(
        "--augment adv / x0-adv: the perturbation's L2 radius as RMS per pixel on the [-1, 1] scale (0.25 measured best "
        "on the digits; from 0.35 the head loses its classes)."))] = 0.25,
    adv_steps: Annotated[int, typer.Option(help="--augment adv / x0-adv: gradient steps per perturbation.")] = 3,
    model: Annotated[Optional[Path], typer.Option(help=(
        "The model the features came from, which --augment runs (default: the shipped model); refused "
        "unless it is the features' model."))] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Train a head on denoiser features (or on pixels, --kind pixel)."""
    from ddguide.core.runtime import set_threads
    from ddguide.method.heads import load_head
    from ddguide.stages.train_head import TrainHeadConfig, chance_warning
    from ddguide.stages.train_head import train_head as run

    if augment != "none":  # only the augmentation runs the model
        precision = _precision(precision, device)
    set_threads(threads)
    cfg = TrainHeadConfig(features=str(features), out=str(out), kind=kind, steps=steps, batch=batch, lr=lr,
                          val_fraction=val_fraction, seed=seed, blocks=tuple(blocks) if blocks else None,
                          timesteps=tuple(timesteps) if timesteps else None, augment=augment,
                          augment_fraction=augment_fraction, adv_eps=adv_eps, adv_steps=adv_steps,
                          model=str(model) if model else None, device=device,
                          precision=precision)
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
    shard: ShardOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Keep the samples that a rejection head on the unconditional model's features accepts."""
    from ddguide.core.runtime import is_main_process, set_threads
    from ddguide.stages.filter import FilterConfig, filter_folder

    if shard is None:  # the shards of --shard fill one folder
        refuse_existing(out)
    precision = _precision(precision, device)
    set_threads(threads)
    with progress_bar("filtering") as bar:
        result = filter_folder(FilterConfig(str(folder), str(head), str(out), threshold,
                                            str(model) if model else None, batch, device, precision, shard),
                               progress=bar.update)
    if shard is not None:
        joined = "joined every shard's index.csv" if result.joined else "the last shard joins index.csv"
        out_console.print(f"kept {result.kept} of {result.total} samples of shard {shard} in {out}; {joined}")
        report(out=out, kept=result.kept, total=result.total, per_class=result.per_class, shard=shard,
               joined=result.joined)
    elif is_main_process():  # under torchrun every rank knows the result; one prints it
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


# ----------------------------------------------------------------------------------------------- merge


@app.command("merge", cls=ListCommand)
@handle_errors
def merge_command(
    out: Annotated[Path, typer.Argument(help=(
        "The output the --shard runs named: a samples or filter folder (its index.partIofN.csv), a features "
        "artifact, fid statistics or a cas report (the OUT.partIofN.safetensors beside it)."))],
) -> None:
    """Join the parts that `--shard i/n` runs of sample, extract, filter, fid or cas wrote (the last shard to finish
    does it itself; this is for parts gathered from elsewhere or a shard rerun alone)."""
    from ddguide.stages.merge import merge

    result = merge(out)
    out_console.print(f"joined {result.parts} parts into {result.out} ({result.kind}, {result.images} images)")
    report(out=result.out, kind=result.kind, parts=result.parts, images=result.images)
