"""Where and how a network runs: the device (``--device auto`` picks CUDA when present), the precision
(``--precision auto``: bf16 autocast where the device has fast bf16), and the shard of this process (from
torchrun or ``--shard i/n``: rank, world size, the slice of the work it does, gathering results, barriers)."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ddguide.core.errors import UserError


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process under ``torchrun`` (which sets RANK and WORLD_SIZE), else (0, 1)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


@dataclass(frozen=True)
class Shard:
    """The part of a job this process does: slice ``bounds(n)`` of ``world`` consecutive slices of the images.

    One rule for every stage that loops over images: image k is computed the same way whichever shard does it,
    each shard writes its own part (:meth:`part`), and the parts joined in rank order are what one process
    writes. Under ``torchrun`` the processes are ``linked`` (barriers and gathers work); ``--shard i/n`` links
    nothing, for job arrays on machines that cannot talk: whichever shard finds every part present joins them
    (or ``ddguide merge``)."""

    rank: int = 0
    world: int = 1
    linked: bool = False  # torchrun's process group is there to wait on and gather through

    @property
    def alone(self) -> bool:
        return self.world == 1

    def bounds(self, n: int) -> tuple[int, int]:
        """The consecutive slice ``[lo, hi)`` of ``n`` items this shard works on (all of them alone)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def part(self, path: str | os.PathLike) -> Path:
        """This shard's part of ``path``: ``feats.safetensors`` -> ``feats.part0of2.safetensors``."""
        return part_path(path, self.rank, self.world)

    def parts(self, path: str | os.PathLike) -> list[Path]:
        """Every shard's part of ``path``, in rank order."""
        return [part_path(path, r, self.world) for r in range(self.world)]

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


def part_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """The part of ``path`` that shard ``rank`` of ``world`` writes (the suffix stays last)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.part{rank}of{world}{path.suffix}")


def resolve_shard(text: str | None = None) -> Shard:
    """``--shard i/n`` (shard i of n, 0 <= i < n, no communication), or else torchrun's RANK/WORLD_SIZE."""
    rank, world = process_shard()
    if text is None:
        return Shard(rank, world, linked=world > 1)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard {text}: expected i/n, shard i of n counted from 0 (e.g. --shard 0/4)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise UserError(f"--shard {text}: needs n >= 1 and 0 <= i < n (the shards of 4 are 0/4 .. 3/4)")
    if world > 1:
        raise UserError(f"--shard {text} under torchrun (WORLD_SIZE={world}): torchrun already splits the work; "
                        "use one or the other")
    return Shard(i, n)


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a ``torchrun`` group: the process that writes and reports."""
    return process_shard()[0] == 0


def shard_bounds(n: int) -> tuple[int, int]:
    """The consecutive slice ``[lo, hi)`` of ``n`` items that this torchrun rank works on (all of them alone)."""
    return resolve_shard().bounds(n)


def join_process_group(device: torch.device) -> None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) once per process; it is left at exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)


def all_gather(value: Any, device: torch.device) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in a single process."""
    world = process_shard()[1]
    if world == 1:
        return [value]
    import torch.distributed as dist

    join_process_group(device)
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def sum_over_ranks(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of every rank's ``value`` (one shape on all ranks), on every rank; ``value`` in a single process."""
    if process_shard()[1] == 1:
        return value
    import torch.distributed as dist

    join_process_group(device)
    total = value.detach().to(device, copy=True)
    dist.all_reduce(total)
    return total


def broadcast_from_main(tensors: Iterable[torch.Tensor], device: torch.device) -> None:
    """Overwrite ``tensors`` (on ``device``) with rank 0's values, in place on every rank of a torchrun group."""
    if process_shard()[1] > 1:
        import torch.distributed as dist

        join_process_group(device)
        for t in tensors:
            dist.broadcast(t, 0)


def barrier(device: torch.device) -> None:
    """Wait for every rank of a torchrun group (nothing to wait for in a single process)."""
    if process_shard()[1] > 1:
        import torch.distributed as dist

        join_process_group(device)
        dist.barrier()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per torchrun process
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """Torch's CPU threads for this process (``--threads``); None leaves torch's own choice."""
    if threads is not None:
        if not 1 <= threads <= 4096:
            raise UserError(f"--threads must be in 1..4096, got {threads}")
        torch.set_num_threads(threads)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast runs the U-Net faster than fp32 on ``device``: a CUDA device with bf16 support,
    or a CPU whose oneDNN has native bf16 (avx512_bf16 / AMX: benchmarks/unet_speed.py measures 1.9x on the
    121M-parameter ADM-64 forward, ~1.2x on the shipped model). Without native bf16 a CPU emulates it, slower."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device, *, compile: bool = False) -> str:
    """``auto`` becomes bf16 where :func:`bf16_is_fast` (and not for ``--compile`` on the CPU, whose compiled
    bf16 backward is wrong), fp32 otherwise; other values are returned as they are."""
    if precision != "auto":
        return precision
    if compile and device.type == "cpu":
        return "fp32"
    return "bf16" if bf16_is_fast(device) else "fp32"


def describe_precision(precision: str, device: torch.device, *, compile: bool = False) -> str:
    """One line saying which precision a run uses, and why when it was ``auto``."""
    chosen = resolve_precision(precision, device, compile=compile)
    name = "bf16 autocast" if chosen == "bf16" else ("fp16 autocast" if chosen == "fp16" else chosen)
    if precision != "auto":
        return f"precision: {name}"
    why = ("--compile on the CPU" if compile and device.type == "cpu" and bf16_is_fast(device) else
           f"{device.type} {'has' if chosen == 'bf16' else 'lacks'} fast bf16")
    return f"precision: {name} (auto: {why}{'; --precision fp32 for full precision' if chosen == 'bf16' else ''})"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast on request (fp16 is refused on the CPU, where ADM's derivatives fail in half precision);
    ``auto`` as :func:`resolve_precision` decides."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        yield
        return
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("--precision fp16 needs CUDA; on the CPU use fp32 or bf16")
        with torch.autocast("cuda", dtype=torch.float16):
            yield
        return
    raise UserError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")


def fast_layout(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """The weight layout whose convolutions run fastest on ``device``, in place: channels_last (NHWC) on the CPU,
    where oneDNN convolves NHWC natively and otherwise reorders every NCHW activation in and out of each
    convolution (`benchmarks/unet_speed.py --layouts`, one thread: forward 1.08-1.18x, guided step 1.08-1.13x on
    shapes32 and ADM-64). An NCHW input then runs NHWC from the first convolution on. Values agree with NCHW to
    float rounding (accumulation order), not bit for bit. Each weight is reordered within its own memory, so a
    model costs no second copy of its weights (`benchmarks/extract_memory.py`). Other devices keep their layout
    (unmeasured)."""
    if torch.device(device).type != "cpu":
        return module
    reordered: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}  # (storage, offset, shape) -> new view
    for m in module.modules():
        for param in m.parameters(recurse=False):
            w = param.data
            if w.dim() != 4 or w.is_contiguous(memory_format=torch.channels_last):
                continue
            where = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape))
            if where in reordered:  # another tensor on the same bytes, which now hold the new order
                param.data = reordered[where]
            elif w.is_contiguous():
                # rewrite the weight's own bytes in the new order: a model read from a file keeps its weights
                # in the file's (private, copy-on-write) mapping instead of a second copy of them all
                nhwc = w.contiguous(memory_format=torch.channels_last)
                param.data = reordered[where] = w.as_strided(w.shape, nhwc.stride()).copy_(nhwc)
            else:  # not dense: a copy of its own
                param.data = w.contiguous(memory_format=torch.channels_last)
    return module


def store_for_autocast(module: torch.nn.Module, precision: str, device: torch.device) -> None:
    """For inference under half-precision autocast: keep the weights and biases of convolutions and linear
    layers in the dtype autocast casts them to at every call, so the outputs are the same, bit for bit (the cast
    is done once instead of per call), and those weights take half the memory (1.1 GB of the ffhq layout's
    2.2 GB). Normalisation layers keep fp32, which autocast runs them in. fp32: nothing changes."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))
    if dtype is None:
        return
    for m in module.modules():
        cast = isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))
        for param in m.parameters(recurse=False):
            # the others get storage of their own too: weights read as views of one file buffer keep all of it
            # alive while any of them is left on it
            param.data = param.data.to(dtype) if cast else param.data.clone()
        for name, buffer in m.named_buffers(recurse=False):
            m._buffers[name] = buffer.clone()
