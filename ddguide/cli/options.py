"""Command-line options that several commands share, declared once as ``Annotated`` aliases.

The training recipe's options are used by ``train`` and ``finetune`` (and those that fit, by ``cas``); each
command keeps its own default in its signature (``train`` and ``finetune`` default to other step counts and
learning rates). Ranges in ``--help`` come from :data:`ddguide.cli.ranges.RANGES` by parameter name, so an alias
needs none of its own.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option(help=(
    "auto, fp32, or bf16 autocast (on a 2-core avx512_bf16 CPU: 1.9x the fp32 U-Net speed of a 121M-parameter "
    "model, 1.6x the shapes32 training step; benchmarks/unet_speed.py, benchmarks/train_speed.py). auto: bf16 "
    "where the device has fast bf16 (CUDA with bf16, a CPU with avx512_bf16 or AMX) and not --compile on the "
    "CPU, else fp32; the choice is printed."))]
CompileOpt = Annotated[bool, typer.Option("--compile", help=(
    "Run the steps through torch.compile (a one-off compilation of a few minutes), meant for CUDA. On the CPU "
    "only with --precision fp32 (compiled bf16 training loses gradients there), which is slower than eager bf16. "
    "A run may resume with or without it."))]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's choice).")]
ShardOpt = Annotated[Optional[str], typer.Option(metavar="I/N", help=(
    "Do the I-th of N consecutive slices of the images (0 <= I < N), for job arrays whose processes cannot talk: "
    "each shard writes its own part and the last to finish joins the parts (else `ddguide merge OUT`) into what "
    "one process writes. Under torchrun leave it out: RANK and WORLD_SIZE shard the same way."))]

# the training recipe (ddguide.stages.training.Recipe)
StepsOpt = Annotated[int, typer.Option(help="Total optimisation steps.")]
BatchOpt = Annotated[int, typer.Option(help="Images per step.")]
LrOpt = Annotated[float, typer.Option(help="Adam learning rate.")]
EmaOpt = Annotated[float, typer.Option(help="EMA decay of the weights that are shipped.")]
GradClipOpt = Annotated[float, typer.Option(help="Gradient norm clip.")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Steps between checkpoints.")]


def seed_option(seeds: str) -> Any:
    """A ``--seed`` option whose help says what it seeds (``seeds``)."""
    return Annotated[int, typer.Option(help=f"Seed of {seeds}.")]


TrainSeedOpt = seed_option("initialisation, batches and noise")
FinetuneSeedOpt = seed_option("the class embedding, batches, label dropout and noise")
CasSeedOpt = seed_option("initialisation, shuffling and augmentation")
