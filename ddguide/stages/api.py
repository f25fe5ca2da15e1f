"""The Python API (``import ddguide``): the stages as functions with keyword options, for notebooks and scripts.

Each function builds the same config as its command and calls the same stage, so ``ddguide.sample(...)`` gives
the images ``ddguide sample`` writes for the same options. Nothing prints; errors the user can fix raise
:class:`ddguide.UserError` with the line the command would print. ``sample`` returns images in memory and writes
no file unless ``out`` names a folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ddguide.core.errors import UserError
from ddguide.core.model import Model
from ddguide.core.runtime import resolve_device, resolve_precision

OUTPUTS = ("tensor", "pil", "numpy", "result", "folder")


def load_model(path: str | os.PathLike | None = None, device: str = "auto") -> Model:
    """A model artifact (default: the shipped model) on ``device`` (auto: CUDA when present)."""
    from ddguide.core.model import load_model as load

    return load(path, resolve_device(device))


def _precision(precision: str, device: str) -> str:
    return resolve_precision(precision, resolve_device(device)) if precision == "auto" else precision


def _specs(value: Any) -> list[Any]:
    """One guide or many: a head path, ``module:function``, a callable or ``(callable, weight)``."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)) or callable(value) or (isinstance(value, tuple) and len(value) == 2
                                                                   and callable(value[0])):
        value = [value]
    return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]


def _config(cls: type, name: str, fields: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword arguments {', '.join(unknown)} (known: "
                        f"{', '.join(sorted(known))})")
    return cls(**{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in fields.items()})


def sample(n: int = 16, *, model: str | os.PathLike | Model | None = None, guides: Any = None,
           classes: Any = None, verifier: Any = None, reject: str | os.PathLike | None = None,
           threshold: float = 0.2, reject_model: str | os.PathLike | None = None, device: str = "auto",
           precision: str = "auto", output: str = "tensor", out: str | os.PathLike | None = None,
           progress: Callable[[int, int], None] | None = None, **options: Any) -> Any:
    """Sample ``n`` images with the options of ``ddguide sample`` (``steps``, ``sampler``, ``eta``, ``seed``,
    ``batch``, ``target``, ``mask``, ``lam``, ``guide_grad``, ``guide_window``, ``guide_model``, ``cfg_scale``,
    ``guide_every``, ``particles``, ``smc``, ``potential``, ``search``, ``candidates``, ``rounds``,
    ``normalize_grad``, ...: the fields of :class:`ddguide.SampleConfig`).

    ``guides``: head files (``HEAD[:w[:target]]``), plug-in specs (``module:function[:w]``), or Python callables
    ``log_p(x0_hat) -> (N,)`` (``x0_hat`` float (N, C, H, W) in [-1, 1]), alone or as ``(callable, weight)``.
    ``model``: a path or a model from :func:`load_model`.

    Returns, by ``output``: ``tensor`` float (N, C, H, W) in [-1, 1] on the CPU; ``pil`` a list of PIL images;
    ``numpy`` uint8 (N, H, W, C), the pixels ``ddguide sample`` writes; ``result`` the images with the rows of
    index.csv (:class:`ddguide.stages.sample.Generated`); ``folder`` the path of ``out``. Files are written only
    when ``out`` is given: then the folder is the one ``ddguide sample --out`` writes.
    """
    from ddguide.stages.sample import RejectSpec, SampleConfig
    from ddguide.stages.sample import generate as generate_images
    from ddguide.stages.sample import sample as sample_folder

    if output not in OUTPUTS:
        raise UserError(f"unknown output {output!r} (choose from {', '.join(OUTPUTS)})")
    if output == "folder" and out is None:
        raise UserError("output='folder' needs out=FOLDER")
    loaded = model if isinstance(model, Model) else None
    if loaded is not None and device == "auto":
        device = str(loaded.device)
    fields = dict(options, n=n, guides=_specs(guides), verifier=_specs(verifier), device=device,
                  precision=_precision(precision, device),
                  model=None if model is None or loaded is not None else os.fspath(model),
                  classes=[str(c) for c in ([classes] if isinstance(classes, (str, int)) else classes or [])],
                  reject=None if reject is None else RejectSpec(
                      os.fspath(reject), threshold, None if reject_model is None else os.fspath(reject_model)),
                  out="" if out is None else os.fspath(out))
    if isinstance(fields.get("guide_window"), list):
        fields["guide_window"] = tuple(fields["guide_window"])
    cfg = _config(SampleConfig, "sample", fields)
    grads = None if loaded is None else [p.requires_grad for p in loaded.parameters()]
    try:
        if out is None:
            result = generate_images(cfg, progress, model=loaded)
        else:
            written = sample_folder(cfg, progress, model=loaded, keep=output != "folder")
            if output == "folder":
                return written.out
            result = written.kept_images
    finally:
        if loaded is not None and grads is not None:  # sampling switched them off; the user's model is theirs
            for p, g in zip(loaded.parameters(), grads, strict=True):
                p.requires_grad_(g)
    if output == "tensor":
        return result.x
    if output == "numpy":
        return result.images
    if output == "pil":
        from PIL import Image

        return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in result.images]
    return result


def extract(data: str | os.PathLike, out: str | os.PathLike, *, precision: str = "auto", device: str = "auto",
            progress: Callable[[int, int], None] | None = None, **options: Any) -> Path:
    """``ddguide extract``: denoiser features of the images in ``data`` written to ``out``; the options are the
    fields of :class:`ddguide.ExtractConfig` (``model``, ``blocks``, ``timesteps``, ``labels``, ``label``,
    ``masks``, ``noise``, ``batch``, ...). Returns the artifact's path."""
    from ddguide.stages.extract import ExtractConfig
    from ddguide.stages.extract import extract as run

    for key in ("blocks", "timesteps"):
        if key in options and options[key] is not None:
            options[key] = tuple(options[key]) if not isinstance(options[key], (str, int)) else (options[key],)
    cfg = _config(ExtractConfig, "extract", dict(options, data=data, out=out, device=device,
                                                 precision=_precision(precision, device)))
    return Path(run(cfg, progress=progress))


def train_head(features: str | os.PathLike, out: str | os.PathLike, *,
               progress: Callable[[int, int, str], None] | None = None, **options: Any) -> Path:
    """``ddguide train-head``: a head on the features artifact ``features`` written to ``out``; the options are
    the fields of :class:`ddguide.TrainHeadConfig` (``kind``, ``steps``, ``batch``, ``lr``, ``seed``, ...).
    Returns the head's path (pass it to :func:`sample` as a guide)."""
    from ddguide.stages.train_head import TrainHeadConfig
    from ddguide.stages.train_head import train_head as run

    if options.get("precision") == "auto":
        options["precision"] = _precision("auto", options.get("device", "cpu"))
    for key in ("blocks", "timesteps"):
        if options.get(key) is not None and not isinstance(options[key], tuple):
            options[key] = tuple(options[key]) if not isinstance(options[key], (str, int)) else (options[key],)
    cfg = _config(TrainHeadConfig, "train_head", dict(options, features=features, out=out))
    return Path(run(cfg, progress=progress))


def fid(a: Any, b: Any = None, *, progress: Callable[[str, int, int], None] | None = None,
        **options: Any) -> Any:
    """``ddguide fid A [B]``: the Fréchet distance between two image sets (folders, samples folders, index.csv,
    saved statistics); the options are the fields of :class:`ddguide.FidConfig` (``features``, ``model``,
    ``save_stats``, ...). Returns the result (``.fid``, ``.feature_space``, the statistics)."""
    from ddguide.metrics.fid import FidConfig, run_fid

    if options.get("precision") == "auto":
        options["precision"] = "fp32"  # as the command: statistics comparable across machines
    cfg = _config(FidConfig, "fid", dict(options, a=a, b=None if b is None else b))
    return run_fid(cfg, progress=progress)


__all__: Sequence[str] = ("load_model", "sample", "extract", "train_head", "fid")
