"""Guided denoisers: wrappers that return a denoiser with the same signature, ``(x_t, t) -> out``.

- :func:`classifier_free` — Ho & Salimans: ``eps = (1 + w) eps(x, c) - w eps(x, null)`` (paper §4.2, §5.3).
- :func:`head_guidance` — the paper's Eq. 13 through heads on the model's own features (see below).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ddguide.diffusion import split_output
from ddguide.errors import UserError
from ddguide.models import Model, autocast
from ddguide.sampling import Denoiser


def class_labels(model: Model, classes: Sequence[int | str], indices: Sequence[int]) -> torch.Tensor:
    """Per-image class ids: image k gets ``classes[k % len(classes)]`` (``--class all`` cycles evenly)."""
    null = null_class(model)  # refuses unconditional models
    names = model.classes or []
    ids = []
    for c in classes:
        if isinstance(c, str) and not c.isdigit():
            if c not in names:
                raise UserError(f"class {c!r} is not in the model; it knows {', '.join(names) or 'no class names'}")
            ids.append(names.index(c))
        else:
            ids.append(int(c))
    known = len(names) if names else null
    for i in ids:
        if not 0 <= i < known:
            raise UserError(f"class id {i} is out of range: the model has {known} classes")
    return torch.tensor([ids[k % len(ids)] for k in indices], dtype=torch.long)


def null_class(model: Model) -> int:
    """The label that means 'no class': the last embedding row of a fine-tuned model."""
    if model.net.cfg.num_classes is None:
        raise UserError("--class and --cfg need a class-conditional model (see `ddguide finetune`)")
    return model.net.cfg.num_classes - 1


def classifier_free(model: Model, labels: torch.Tensor, w: float, precision: str = "fp32") -> Denoiser:
    """CFG in one batched pass of 2N images. ``labels`` (N,) is never modified: the null labels are a new
    tensor (the reference code overwrote its label tensor in place)."""
    null = torch.full_like(labels, null_class(model))
    both = torch.cat([labels, null]).to(model.device)  # (2N,)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(x.device, precision):
            out = model(torch.cat([x, x]), torch.cat([t, t]), both[: 2 * len(x)]).float()
        cond, uncond = out.chunk(2)
        eps_c, var = split_output(cond, x.shape[1])
        eps_u, _ = split_output(uncond, x.shape[1])
        eps = (1 + w) * eps_c - w * eps_u
        return eps if var is None else torch.cat([eps, var], dim=1)

    return denoise


def conditional(model: Model, labels: torch.Tensor, precision: str = "fp32") -> Denoiser:
    """The class-conditional model without guidance (w = 0), one pass of N images."""
    labels = labels.to(model.device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(x.device, precision):
            return model(x, t, labels[: len(x)]).float()

    return denoise


def class_sampling(classes: Sequence[str] | None, w: float | None, precision: str):
    """Denoiser factory and index columns for ``sample --class C [--cfg W]`` (both None when no class is given).

    ``all`` cycles through every class of the model, so N images cover the classes evenly.
    """
    if not classes:
        if w is not None:
            raise UserError("--cfg needs --class")
        return None, None

    def chosen(model: Model) -> list[int | str]:
        if list(classes) == ["all"]:
            return list(range(len(model.classes or []) or null_class(model)))
        return list(classes)

    def denoiser_for(model: Model, indices: Sequence[int]) -> Denoiser:
        labels = class_labels(model, chosen(model), indices)
        return classifier_free(model, labels, w, precision) if w else conditional(model, labels, precision)

    def row_info(model: Model, _images: torch.Tensor, indices: Sequence[int]) -> list[dict]:
        labels = class_labels(model, chosen(model), indices).tolist()
        names = model.classes or []
        return [{"class": names[c] if names else c, "guidance": f"cfg:{w or 0}"} for c in labels]

    return denoiser_for, row_info
