"""Model artifacts: a U-Net plus the diffusion it was trained with, adapted once into a denoiser.

After :func:`load_model` no code cares where the weights came from: ``model(x_t, t)`` takes schedule indices
``t`` (rescaling them for improved-diffusion models) and ``model.features(x, t, blocks)`` returns feature taps.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from ddguide import artifacts
from ddguide.diffusion import DiffusionConfig, alphas_cumprod, split_output
from ddguide.errors import UserError
from ddguide.unet import UNetConfig, UNetModel

DEFAULT_MODEL = "shapes32.safetensors"


class Model(nn.Module):
    """An ADM network with its diffusion settings. ``forward(x_t, t, y)`` returns the raw network output."""

    def __init__(self, net: UNetModel, diffusion: DiffusionConfig, *, fingerprint: str = "",
                 classes: list[str] | None = None, info: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.diffusion = diffusion
        self.fingerprint = fingerprint
        self.classes = classes
        self.info = dict(info or {})
        self.source_path: Path | None = None  # the file it was loaded from (set by load_model)
        self.abar = alphas_cumprod(diffusion)  # float64 (T,), kept on the CPU: not a parameter

    @property
    def image_size(self) -> int:
        return self.net.cfg.image_size

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, self.diffusion.model_time(t), y)

    def features(self, x: torch.Tensor, t: torch.Tensor, blocks: Iterable[str],
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Feature taps for images ``x`` at schedule indices ``t`` (no noise is added here)."""
        return self.net.features(x, self.diffusion.model_time(t), blocks, y)

    def meta(self) -> artifacts.ModelMeta:
        """The typed config its artifact stores."""
        return artifacts.ModelMeta(unet=self.net.cfg.to_dict(), diffusion=self.diffusion.to_dict(),
                                   classes=self.classes, info=self.info)

    def config(self) -> dict[str, Any]:
        """The JSON object its artifact stores as config."""
        return self.meta().to_metadata()


def save_model(path: str | os.PathLike, model: Model, *, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write a ``model`` artifact (weights as float32 unless given otherwise); returns its fingerprint."""
    sd = state_dict if state_dict is not None else model.net.state_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    fp = artifacts.fingerprint(sd)
    artifacts.save(path, sd, config=model.meta(), fingerprint=fp)
    model.fingerprint = fp
    return fp


def default_model_path() -> Path:
    """The unconditional model shipped inside the package."""
    return Path(str(resources.files("ddguide") / "assets" / DEFAULT_MODEL))


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Model:
    """Load a ``model`` artifact (None = the shipped default) in eval mode on ``device``."""
    path = Path(path) if path is not None else default_model_path()
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise UserError(f"{path}: a PyTorch checkpoint; convert it first with `ddguide convert {path} --out "
                        f"{path.with_suffix('.safetensors').name}`")
    art = artifacts.load(path, "model")
    model = model_from_artifact(art).to(device).eval()
    model.source_path = path
    return model


def model_from_artifact(art: artifacts.Artifact) -> Model:
    """The model a loaded ``model`` artifact describes, its config checked before any network is built."""
    meta = artifacts.ModelMeta.from_metadata(art.config, art.path)
    unet_cfg, diffusion = model_config(meta, art.path)
    check_tensors_fit(unet_cfg, art.tensors, art.path)  # before any network is built
    with torch.device("meta"):  # no random initialisation to overwrite: the file's tensors become the weights
        net = UNetModel(unet_cfg)
    net.load_state_dict({k: v.float() for k, v in art.tensors.items()}, assign=True)
    return Model(net, diffusion, fingerprint=art.fingerprint, classes=meta.classes, info=meta.info)


# architecture bounds a model config must keep to (published ADM models are far inside them)
UNET_LIMITS = {"image_size": 4096, "in_channels": 64, "model_channels": 4096, "out_channels": 128,
               "num_res_blocks": 32, "num_heads": 256, "num_head_channels": 4096, "num_heads_upsample": 256,
               "norm_groups": 4096, "num_classes": 1_000_000}


def model_config(config: dict[str, Any] | artifacts.ModelMeta,
                 path: str | os.PathLike) -> tuple[UNetConfig, DiffusionConfig]:
    """The U-Net and diffusion sections of a model artifact's config, type- and range-checked."""
    meta = config if isinstance(config, artifacts.ModelMeta) else artifacts.ModelMeta.from_metadata(config, path)
    unet = artifacts.check_fields(UNetConfig, meta.unet, f"{path}: U-Net config")
    for name, limit in UNET_LIMITS.items():
        value = unet.get(name)
        if isinstance(value, int) and not (value >= 1 or (value == -1 and name.startswith("num_head"))):
            raise UserError(f"{path}: U-Net config {name} must be >= 1, found {value}")
        if isinstance(value, int) and value > limit:
            raise UserError(f"{path}: U-Net config {name} {value} is beyond ddguide's limit of {limit}")
    mult, attn = unet.get("channel_mult", [1]), unet.get("attention_resolutions", [])
    if not 1 <= len(mult) <= 8 or any(not 0 < m <= 64 for m in mult) or len(attn) > 16:
        raise UserError(f"{path}: U-Net config channel_mult or attention_resolutions out of range")
    artifacts.check_fields(DiffusionConfig, meta.diffusion, f"{path}: diffusion config")
    if not 1 <= meta.diffusion.get("steps", 1) <= 100_000:
        raise UserError(f"{path}: diffusion steps must be in 1..100000")
    return UNetConfig.from_dict(unet), DiffusionConfig.from_dict(meta.diffusion)


def config_shapes(cfg: UNetConfig, path: str | os.PathLike = "the config") -> dict[str, tuple[int, ...]]:
    """Key -> shape of the network a config builds, on the meta device (no memory is allocated)."""
    try:
        with torch.device("meta"):
            net = UNetModel(cfg)
    except (UserError, ValueError, TypeError, ZeroDivisionError, RuntimeError, AssertionError, KeyError) as e:
        raise UserError(f"{path}: its U-Net config does not build a network ({str(e)[:120]})") from None
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_tensors_fit(cfg: UNetConfig, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """The file's tensors must be exactly the network its config describes (names, shapes, floating dtypes):
    so the parameter count a config implies is the one the file holds, checked before anything is built."""
    expected = config_shapes(cfg, path)
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        shaped = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        n_expected = sum(_numel(s) for s in expected.values())
        n_found = sum(_numel(s) for s in found.values())
        raise UserError(f"{path}: weights do not fit the architecture in its own config ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(shaped)} mis-shaped tensors; the config implies "
                        f"{n_expected:,} parameters, the file holds {n_found:,})")
    wrong = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if wrong:
        raise UserError(f"{path}: tensor {wrong[0]} is {tensors[wrong[0]].dtype}, expected floating-point weights")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process under ``torchrun`` (which sets RANK and WORLD_SIZE), else (0, 1)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a ``torchrun`` group: the process that writes and reports."""
    return process_shard()[0] == 0


def shard_bounds(n: int) -> tuple[int, int]:
    """The consecutive slice ``[lo, hi)`` of ``n`` items that this torchrun rank works on (all of them alone)."""
    rank, world = process_shard()
    return n * rank // world, n * (rank + 1) // world


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


def denoiser(model: Model, labels: torch.Tensor | None = None, *, precision: str = "fp32") -> "LabelledDenoiser":
    """The base denoiser of a model: ``denoise(x_t, t, y=None) -> Prediction``, the only place that runs the
    network under autocast and splits its learned-variance channels. ``labels`` are the default class labels of
    a class-conditional model (``y`` overrides them for one call); gradients are left to the caller (the samplers
    run without them, guidance turns them on)."""
    from ddguide.sampling import Prediction

    default = None if labels is None else labels.to(model.device)

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Prediction:
        y = default[: len(x)] if y is None and default is not None else y
        with autocast(x.device, precision):
            out = model(x, t, y).float()
        return Prediction(*split_output(out, x.shape[1]))

    return denoise


LabelledDenoiser = Any  # Callable[[Tensor, Tensor, Tensor | None], Prediction]
