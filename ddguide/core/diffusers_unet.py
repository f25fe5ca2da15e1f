"""diffusers ``UNet2DModel`` networks as ddguide networks, adapted once at the boundary.

A diffusers model folder (``config.json`` and ``diffusion_pytorch_model.safetensors``, as ``save_pretrained``
writes it) with its scheduler config is read by :func:`read_folder`. The network is diffusers' own module, wrapped
by :class:`DiffusersUNet` with the interface of ddguide's ADM U-Net: ``forward(x, t, y)`` returns the raw output
(eps, plus variance channels when it learns them) and feature taps name its blocks

    ``down.<i>``  ``down_blocks[i]`` (its hidden state, after its downsampler)
    ``mid``       ``mid_block``
    ``up.<i>``    ``up_blocks[i]`` (after its upsampler)

read with forward hooks; a pass for features stops after the deepest tapped block. Building one needs diffusers
(``pip install 'ddguide[diffusers]'``); a model artifact of such a network stores the ``UNet2DModel`` config and
diffusers' own tensor names, so ``UNet2DModel(**config).load_state_dict(tensors)`` loads it outside ddguide too.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddguide.core import artifacts
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.unet import RecordedBlocks

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler_config.json"
NETWORK = "diffusers"  # the ``network`` a model artifact of this kind names


def require_diffusers() -> Any:
    """diffusers' ``UNet2DModel`` class, or one line saying how to install it."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UserError("this is a diffusers model: reading it needs diffusers (pip install 'ddguide[diffusers]')") \
            from None
    return UNet2DModel


@dataclass(frozen=True)
class DiffusersConfig:
    """A ``UNet2DModel`` config (the arguments of its constructor, as in its ``config.json``), with the fields
    ddguide asks every network's config for."""

    config: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        size = self.config.get("sample_size")
        return int(size if isinstance(size, int) else size[0])

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 3))

    @property
    def out_channels(self) -> int:
        return int(self.config.get("out_channels", 3))

    @property
    def num_classes(self) -> int | None:
        """Rows of the class embedding (None: unconditional)."""
        rows = self.config.get("num_class_embeds")
        return int(rows) if rows is not None else None

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dict(self.config)


def check_config(config: Any, where: str) -> DiffusersConfig:
    """A ``UNet2DModel`` config ddguide can use: a square ``sample_size``, a positional time embedding (the
    Fourier one belongs to score-SDE models of another parametrisation) and integer class labels, if any."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object")
    size = config.get("sample_size")
    square = isinstance(size, int) or (isinstance(size, list) and len(size) == 2 and size[0] == size[1]
                                       and isinstance(size[0], int))
    if not square or not 1 <= (size if isinstance(size, int) else size[0]) <= 4096:
        raise UserError(f"{where}: sample_size {size!r} is not one square image size (ddguide samples square images)")
    if config.get("time_embedding_type", "positional") != "positional":
        raise UserError(f"{where}: time_embedding_type {config['time_embedding_type']!r} is not supported (ddguide "
                        "reads DDPM models with the positional time embedding)")
    if config.get("class_embed_type") is not None:
        raise UserError(f"{where}: class_embed_type {config['class_embed_type']!r} is not supported (only class "
                        "labels through num_class_embeds)")
    for name in ("in_channels", "out_channels", "num_class_embeds"):
        value = config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{where}: {name} should be a whole number >= 1, found {str(value)[:40]!r}")
    return DiffusersConfig(config)


class _Stop(Exception):
    """Raised by the hook of the deepest tapped block: the rest of the forward pass is not needed."""


class DiffusersUNet(RecordedBlocks, nn.Module):
    """A diffusers ``UNet2DModel`` with ddguide's network interface. Its state dict is the diffusers module's own
    (the wrapper holds nothing else), so artifacts keep diffusers' tensor names."""

    def __init__(self, cfg: DiffusersConfig):
        super().__init__()
        unet_class = require_diffusers()
        known = set(inspect.signature(unet_class.__init__).parameters) - {"self"}
        unknown = sorted(set(cfg.config) - known)
        if unknown:
            raise UserError(f"UNet2DModel config: unknown field(s) {', '.join(unknown)[:120]}")
        self.cfg = cfg
        try:
            self.unet = unet_class(**cfg.config)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ZeroDivisionError) as e:
            raise UserError(f"its UNet2DModel config does not build a network ({str(e).splitlines()[0][:160]})") \
                from None
        self._blocks = self._probe()

    # -- the state is the diffusers module's --------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.unet.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.unet.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- block vocabulary ------------------------------------------------------------------------------------

    def _probe(self) -> dict[str, tuple[int, int]]:
        """Each block's output (channels, downsampling), from one forward pass on the meta device (no compute)."""
        size, shapes = self.cfg.image_size, {}
        x = torch.zeros(1, self.cfg.in_channels, size, size, device="meta")
        t = torch.zeros(1, dtype=torch.long, device="meta")
        y = None if self.cfg.num_classes is None else torch.zeros(1, dtype=torch.long, device="meta")
        with torch.device("meta"):
            probe = type(self.unet)(**self.cfg.config)
        handles = [module.register_forward_hook(_recorder(shapes, name))
                   for name, module in _blocks_of(probe).items()]
        try:
            probe(x, t, class_labels=y, return_dict=False)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"its UNet2DModel config does not run on {size}x{size} images "
                            f"({str(e).splitlines()[0][:160]})") from None
        finally:
            for h in handles:
                h.remove()
        return {name: (shape[1], max(1, round(size / shape[-1]))) for name, shape in shapes.items()}

    def block_names(self) -> list[str]:
        """All tappable blocks in execution order."""
        return list(self._blocks)

    def upsampling_blocks(self) -> list[str]:
        """Up blocks that end by doubling the resolution, coarsest first."""
        names = self.block_names()
        return [b for prev, b in itertools.pairwise(names)
                if b.startswith("up.") and self._blocks[b][1] < self._blocks[prev][1]]

    def default_taps(self) -> tuple[str, ...]:
        """``extract``'s default: ``mid`` and the two finest upsampling blocks, as for ADM U-Nets."""
        ups = self.upsampling_blocks() or [n for n in self.block_names() if n.startswith("up.")][:1]
        return tuple(dict.fromkeys([*(["mid"] if "mid" in self._blocks else []), *ups[-2:]]))

    def attribute_blocks(self) -> tuple[str, str]:
        """The taps of the paper's attribute heads (§5.1): ``mid`` and the second upsampling block."""
        ups = self.upsampling_blocks() or self.block_names()[-1:]
        return ("mid" if "mid" in self._blocks else ups[0]), ups[min(1, len(ups) - 1)]

    def block_module(self, name: str) -> nn.Module:
        """The module whose output is the tap ``name``."""
        self.check_blocks([name])
        return _blocks_of(self.unet)[name]

    def known_blocks(self) -> str:
        mid = ", mid" if "mid" in self._blocks else ""
        return (f"this diffusers model has down.0..down.{len(self.unet.down_blocks) - 1}{mid}, "
                f"up.0..up.{len(self.unet.up_blocks) - 1}")

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None and self.cfg.num_classes is None:
            raise UserError("class labels given to an unconditional model")
        return self.unet(x, t, class_labels=y, return_dict=False)[0]  # (N, out_channels, H, W)

    def features(self, x: torch.Tensor, t: torch.Tensor, blocks: Iterable[str],
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the named blocks for input ``x`` at model time ``t``, stopping after the deepest one."""
        wanted = list(dict.fromkeys(blocks))
        self.check_blocks(wanted)
        order = self.block_names()
        deepest = order[max(order.index(b) for b in wanted)]
        taps: dict[str, torch.Tensor] = {}
        modules = _blocks_of(self.unet)
        handles = [modules[b].register_forward_hook(_recorder(taps, b, stop=b == deepest)) for b in wanted]
        try:
            self.unet(x, t, class_labels=y, return_dict=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {b: taps[b] for b in wanted}


def _blocks_of(unet: nn.Module) -> dict[str, nn.Module]:
    """A UNet2DModel's tappable blocks by tap name, in execution order."""
    blocks = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
    if unet.mid_block is not None:
        blocks["mid"] = unet.mid_block
    blocks.update({f"up.{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


def _recorder(into: dict[str, Any], name: str, stop: bool = False) -> Any:
    """A forward hook keeping a block's hidden state (down blocks also return their skips: the first element)."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        into[name] = hidden if hidden.device.type != "meta" else tuple(hidden.shape)
        if stop:
            raise _Stop

    return hook


# ------------------------------------------------------------------------------------------- the scheduler

BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' name -> ddguide's schedule
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")


def diffusion_from_scheduler(sched: Any, unet: DiffusersConfig, where: str) -> DiffusionConfig:
    """The ddguide diffusion of a diffusers scheduler config (DDPMScheduler's fields; DDIMScheduler's agree), or
    one line naming the setting ddguide cannot sample with."""
    if not isinstance(sched, dict):
        raise UserError(f"{where}: expected a JSON object")
    steps = sched.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or not 1 <= steps <= 100_000:
        raise UserError(f"{where}: num_train_timesteps should be in 1..100000, found {str(steps)[:40]!r}")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UserError(f"{where}: prediction_type {str(prediction)[:40]!r} is not supported (ddguide's samplers and "
                        "guidance need a model that predicts the noise: epsilon)")
    if sched.get("trained_betas") is not None:
        raise UserError(f"{where}: trained_betas are not supported (ddguide builds linear or squaredcos_cap_v2 "
                        "schedules)")
    if sched.get("rescale_betas_zero_snr"):
        raise UserError(f"{where}: rescale_betas_zero_snr is not supported")
    beta_schedule = sched.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise UserError(f"{where}: beta_schedule {str(beta_schedule)[:40]!r} is not supported (choose from "
                        f"{', '.join(BETA_SCHEDULES)})")
    if beta_schedule == "linear":
        _check_linear_range(sched, steps, where)
    variance = sched.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        raise UserError(f"{where}: variance_type {str(variance)[:40]!r} is not supported (choose from "
                        f"{', '.join(VARIANCE_TYPES)})")
    if (variance == "learned_range") != unet.learn_sigma:
        raise UserError(f"{where}: variance_type {variance!r} does not fit a model with {unet.out_channels} output "
                        f"channels for {unet.in_channels} image channels (learned_range needs twice as many)")
    return DiffusionConfig(steps=steps, schedule=BETA_SCHEDULES[beta_schedule])


def _check_linear_range(sched: dict[str, Any], steps: int, where: str) -> None:
    """ddguide's linear schedule is DDPM's: 1e-4..2e-2 at 1000 steps, scaled by 1000 / T."""
    scale = 1000 / steps
    for name, default, ours in (("beta_start", 0.0001, 1e-4 * scale), ("beta_end", 0.02, 2e-2 * scale)):
        value = sched.get(name, default)
        if not isinstance(value, (int, float)) or not math.isclose(value, ours, rel_tol=1e-6):
            raise UserError(f"{where}: a linear schedule with {name} {str(value)[:20]} is not supported (ddguide's "
                            f"linear schedule over {steps} steps has {name} {ours:g})")


# ------------------------------------------------------------------------------------------- the folder


@dataclass
class Folder:
    """What a diffusers model folder holds, checked: the network config, its diffusion, float32 tensors and where
    they came from."""

    unet: DiffusersConfig
    diffusion: DiffusionConfig
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def read_folder(path: str | Path, diffusion: dict[str, Any] | None = None) -> Folder:
    """Read a ``UNet2DModel`` folder, or a pipeline folder holding ``unet/``, and its scheduler config
    (``scheduler_config.json`` beside ``config.json``, in ``../scheduler/`` as pipelines save it, or in the
    parent folder). ``diffusion`` (ddguide's DiffusionConfig fields) replaces the scheduler config."""
    path = Path(path)
    unet_dir = path / "unet" if not (path / CONFIG).exists() and (path / "unet" / CONFIG).is_file() else path
    if not (unet_dir / CONFIG).is_file():
        raise UserError(f"{path}: no {CONFIG} (a diffusers model folder holds {CONFIG} and {WEIGHTS}, as "
                        "save_pretrained writes them)")
    config = _read_json(unet_dir / CONFIG)
    kind = config.get("_class_name", "UNet2DModel") if isinstance(config, dict) else None
    if kind != "UNet2DModel":
        raise UserError(f"{unet_dir / CONFIG}: a {str(kind)[:40]} config; ddguide reads diffusers' UNet2DModel "
                        "(pixel-space models, unconditional or class-conditional)")
    version = config.pop("_diffusers_version", None)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = check_config(config, str(unet_dir / CONFIG))
    if diffusion:
        diff = DiffusionConfig.from_dict(artifacts.check_fields(DiffusionConfig, diffusion, "--diffusion"))
        scheduler = None
    else:
        found = _scheduler_path(unet_dir)
        if found is None:
            raise UserError(f"{path}: no {SCHEDULER} beside {CONFIG}, in ../scheduler/ or in the parent folder; "
                            "pass the diffusion settings with --diffusion '{\"steps\": 1000, \"schedule\": "
                            "\"linear\"}'")
        scheduler = _read_json(found)
        diff = diffusion_from_scheduler(scheduler, unet, str(found))
    tensors = _read_weights(unet_dir)
    name = "/".join(unet_dir.parts[-2:]) if unet_dir.name == "unet" else unet_dir.name  # pipe/unet, or the folder
    info = {"source": "diffusers", "converted_from": name or str(path), "diffusers_version": version,
            "scheduler": scheduler}
    return Folder(unet, diff, tensors, {k: v for k, v in info.items() if v is not None})


def _scheduler_path(unet_dir: Path) -> Path | None:
    for candidate in (unet_dir / SCHEDULER, unet_dir.parent / "scheduler" / SCHEDULER, unet_dir.parent / SCHEDULER):
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None


def _read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = unet_dir / WEIGHTS
    if not weights.is_file():
        others = sorted(p.name for p in unet_dir.glob("diffusion_pytorch_model*"))
        hint = (f" (found {', '.join(others[:3])}: ddguide reads unsharded safetensors only; save with "
                "save_pretrained(..., safe_serialization=True))") if others else ""
        raise UserError(f"{unet_dir}: no {WEIGHTS}{hint}")
    artifacts.read_header(weights)  # the header type-checked before any tensor is read
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{weights}: unreadable safetensors data ({str(e)[:160]})") from None
    artifacts.check_finite(weights, tensors)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
