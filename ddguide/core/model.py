"""Model artifacts: a U-Net plus the diffusion it was trained with, adapted once into a denoiser.

After :func:`load_model` no code cares where the weights came from: ``model(x_t, t)`` takes schedule indices
``t`` (rescaling them for improved-diffusion models) and ``model.features(x, t, blocks)`` returns feature taps.
The network is ddguide's ADM U-Net or a diffusers ``UNet2DModel`` (:mod:`ddguide.core.diffusers_unet`, from a
converted artifact or straight from a diffusers folder), both with the same interface.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from ddguide.core import artifacts
from ddguide.core.diffusers_unet import NETWORK as DIFFUSERS
from ddguide.core.diffusers_unet import DiffusersConfig, DiffusersUNet, check_config, read_folder
from ddguide.core.diffusion import DiffusionConfig, alphas_cumprod, split_output
from ddguide.core.errors import UserError
from ddguide.core.runtime import autocast, fast_layout
from ddguide.core.unet import UNetConfig, UNetModel

DEFAULT_MODEL = "shapes32.safetensors"
Network = UNetModel | DiffusersUNet  # what a Model wraps: the same interface (forward, features, blocks)
NetworkConfig = UNetConfig | DiffusersConfig


class Model(nn.Module):
    """A network (ADM, or a diffusers UNet2DModel) with its diffusion settings. ``forward(x_t, t, y)`` returns
    the raw network output."""

    def __init__(self, net: Network, diffusion: DiffusionConfig, *, fingerprint: str = "",
                 classes: list[str] | None = None, info: dict[str, Any] | None = None,
                 null_class: bool | None = None):
        super().__init__()
        self.net = net
        self.diffusion = diffusion
        self.fingerprint = fingerprint
        self.classes = classes
        self.info = dict(info or {})
        self.null_class = null_class  # as its file says (None: not said; see has_null_class)
        self.source_path: Path | None = None  # the file it was loaded from (set by load_model)
        self.abar = alphas_cumprod(diffusion)  # float64 (T,), kept on the CPU: not a parameter

    @property
    def image_size(self) -> int:
        return self.net.cfg.image_size

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def labels(self) -> int | None:
        """Rows of the class embedding (None: an unconditional model)."""
        return self.net.cfg.num_classes

    @property
    def has_null_class(self) -> bool:
        """Whether the last class-embedding row is the null class, the unconditional branch of CFG.

        ``finetune`` adds one; guided-diffusion's class-conditional models (1000 ImageNet classes) have none. A file
        that does not say keeps the reading of the ddguide that wrote it: a null row, unless it was converted from
        a published checkpoint."""
        return self.labels is not None and _null_class(self.null_class, self.info)

    @property
    def null_label(self) -> int | None:
        """The label that means 'no class' (None: the model has no null class)."""
        return self.labels - 1 if self.labels is not None and self.has_null_class else None

    @property
    def num_classes(self) -> int | None:
        """The real classes a class-conditional model draws (the null row not counted); None: unconditional."""
        return None if self.labels is None else self.labels - int(self.has_null_class)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, self.diffusion.model_time(t), y)

    def features(self, x: torch.Tensor, t: torch.Tensor, blocks: Iterable[str],
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Feature taps for images ``x`` at schedule indices ``t`` (no noise is added here)."""
        return self.net.features(x, self.diffusion.model_time(t), blocks, y)

    def meta(self) -> artifacts.ModelMeta:
        """The typed config its artifact stores."""
        return artifacts.ModelMeta(unet=self.net.cfg.to_dict(), diffusion=self.diffusion.to_dict(),
                                   classes=self.classes, info=self.info,
                                   null_class=None if self.labels is None else self.has_null_class,
                                   network=DIFFUSERS if isinstance(self.net, DiffusersUNet) else None)

    def config(self) -> dict[str, Any]:
        """The JSON object its artifact stores as config."""
        return self.meta().to_metadata()


def _null_class(recorded: bool | None, info: dict[str, Any]) -> bool:
    """A class-conditional model's null class as its file says, or, where it does not say, as the ddguide that
    wrote it read it: a null row, unless the model was converted from a published checkpoint."""
    return recorded if recorded is not None else "converted_from" not in info


def class_rows(meta: artifacts.ModelMeta) -> int | None:
    """The class-embedding rows a model artifact's config describes (None: unconditional)."""
    rows = meta.unet.get("num_class_embeds" if meta.network == DIFFUSERS else "num_classes")
    return rows if isinstance(rows, int) else None


def null_class_of(meta: artifacts.ModelMeta) -> bool | None:
    """Whether a model artifact's last class row is the null class, from its config alone (None: unconditional)."""
    return None if class_rows(meta) is None else _null_class(meta.null_class, meta.info)


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
    """Load a ``model`` artifact (None = the shipped default), or a diffusers ``UNet2DModel`` folder, in eval mode
    on ``device``, in the weight layout that device convolves fastest (:func:`~ddguide.core.runtime.fast_layout`)."""
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        model = fast_layout(model_from_folder(path).to(device).eval(), device)
        model.source_path = path
        return model
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise UserError(f"{path}: a PyTorch checkpoint; convert it first with `ddguide convert {path} --out "
                        f"{path.with_suffix('.safetensors').name}`")
    art = artifacts.load(path, "model")
    model = fast_layout(model_from_artifact(art).to(device).eval(), device)
    model.source_path = path
    return model


def model_from_artifact(art: artifacts.Artifact) -> Model:
    """The model a loaded ``model`` artifact describes, its config checked before any network is built."""
    meta = artifacts.ModelMeta.from_metadata(art.config, art.path)
    net_cfg, diffusion = model_config(meta, art.path)
    net = network_with(net_cfg, art.tensors, art.path)
    return Model(net, diffusion, fingerprint=art.fingerprint, classes=meta.classes, info=meta.info,
                 null_class=meta.null_class)


def model_from_folder(path: str | os.PathLike, diffusion: dict[str, Any] | None = None) -> Model:
    """The model of a diffusers ``UNet2DModel`` folder and its scheduler config (``diffusion``: ddguide's
    diffusion fields in place of the scheduler config). Its fingerprint is that of the artifact `convert` writes."""
    folder = read_folder(path, diffusion)
    net = network_with(folder.unet, folder.tensors, path)
    return Model(net, folder.diffusion, fingerprint=artifacts.fingerprint(folder.tensors), info=folder.info,
                 null_class=None if folder.unet.num_classes is None else False)  # a diffusers model has no null row


def build_network(cfg: NetworkConfig) -> Network:
    """The network a config describes (random weights; on the meta device under ``torch.device("meta")``)."""
    return DiffusersUNet(cfg) if isinstance(cfg, DiffusersConfig) else UNetModel(cfg)


def network_with(cfg: NetworkConfig, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Network:
    """The network of ``cfg`` holding ``tensors`` as its weights, which must fit it exactly."""
    check_tensors_fit(cfg, tensors, path)  # before any network is built
    with torch.device("meta"):  # no random initialisation to overwrite: the file's tensors become the weights
        net = build_network(cfg)
    net.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
    return net


# architecture bounds a model config must keep to (published ADM models are far inside them)
UNET_LIMITS = {"image_size": 4096, "in_channels": 64, "model_channels": 4096, "out_channels": 128,
               "num_res_blocks": 32, "num_heads": 256, "num_head_channels": 4096, "num_heads_upsample": 256,
               "norm_groups": 4096, "num_classes": 1_000_000}


def model_config(config: dict[str, Any] | artifacts.ModelMeta,
                 path: str | os.PathLike) -> tuple[NetworkConfig, DiffusionConfig]:
    """The U-Net and diffusion sections of a model artifact's config, type- and range-checked."""
    meta = config if isinstance(config, artifacts.ModelMeta) else artifacts.ModelMeta.from_metadata(config, path)
    if meta.network == DIFFUSERS:
        return check_config(meta.unet, f"{path}: UNet2DModel config"), _diffusion_config(meta, path)
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
    return UNetConfig.from_dict(unet), _diffusion_config(meta, path)


def _diffusion_config(meta: artifacts.ModelMeta, path: str | os.PathLike) -> DiffusionConfig:
    artifacts.check_fields(DiffusionConfig, meta.diffusion, f"{path}: diffusion config")
    if not 1 <= meta.diffusion.get("steps", 1) <= 100_000:
        raise UserError(f"{path}: diffusion steps must be in 1..100000")
    return DiffusionConfig.from_dict(meta.diffusion)


def config_shapes(cfg: NetworkConfig, path: str | os.PathLike = "the config") -> dict[str, tuple[int, ...]]:
    """Key -> shape of the network a config builds, on the meta device (no memory is allocated)."""
    try:
        with torch.device("meta"):
            net = build_network(cfg)
    except UserError as e:
        if isinstance(cfg, DiffusersConfig):  # its own message names the diffusers setting
            raise UserError(f"{path}: {e}") from None
        raise UserError(f"{path}: its U-Net config does not build a network ({str(e)[:120]})") from None
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, AssertionError, KeyError) as e:
        raise UserError(f"{path}: its U-Net config does not build a network ({str(e)[:120]})") from None
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_tensors_fit(cfg: NetworkConfig, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
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


def denoiser(model: Model, labels: torch.Tensor | None = None, *, precision: str = "fp32") -> "LabelledDenoiser":
    """The base denoiser of a model: ``denoise(x_t, t, y=None) -> Prediction``, the only place that runs the
    network under autocast and splits its learned-variance channels. ``labels`` are the default class labels of
    a class-conditional model (``y`` overrides them for one call); gradients are left to the caller (the samplers
    run without them, guidance turns them on)."""
    from ddguide.core.sampling import Prediction

    default = None if labels is None else labels.to(model.device)

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Prediction:
        y = default[: len(x)] if y is None and default is not None else y
        with autocast(x.device, precision):
            out = model(x, t, y).float()
        return Prediction(*split_output(out, x.shape[1]))

    return denoise


LabelledDenoiser = Any  # Callable[[Tensor, Tensor, Tensor | None], Prediction]
