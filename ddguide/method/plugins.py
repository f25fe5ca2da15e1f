"""Plug-in guides: any differentiable ``log_p(x0_hat) -> (N,)`` of the user's, as one expert of Eq. 13's product.

A plug-in guide reads x0_hat itself (float ``(N, C, H, W)`` in [-1, 1], on the model's device) instead of a
head on the model's features; guidance differentiates through it exactly as through a head (both
``--guide-grad`` modes, the same lambda), and particles and search use it as a verifier. From Python it is the
callable itself, ``(callable, weight)``, or any object that is callable and may carry ``weight`` (and ``name``);
on the command line it is ``--guide module:function[:weight]`` or ``--guide path/to/file.py:function[:weight]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ddguide.core.errors import UserError

_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ATTR = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class PluginGuide:
    """A user's log-likelihood of x0_hat with its weight in the product of experts."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    name: str = "plug-in guide"

    def log_p(self, x0: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """``fn(x0)`` as float (N,) on x0's device; a wrong type or shape, NaN or inf, or a value that does not
        depend on x0 while a gradient is wanted stops with one line."""
        try:
            out = self.fn(x0)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code: its failure is the user's to fix
            raise UserError(f"{self.name} failed: {e.__class__.__name__}: {e}") from None
        n = len(x0)
        if not isinstance(out, torch.Tensor):
            raise UserError(f"{self.name} returned {type(out).__name__}, expected a tensor of shape ({n},)")
        if tuple(out.shape) != (n,):
            raise UserError(f"{self.name} returned a tensor of shape {tuple(out.shape)} for {n} images, expected "
                            f"({n},): one log-likelihood per image")
        out = out.to(device=x0.device, dtype=torch.float32)
        if not bool(torch.isfinite(out.detach()).all()):
            span = f"images {indices[0]}..{indices[-1]}" if len(indices) else "the batch"
            raise UserError(f"{self.name} returned NaN or infinite values ({span}); no image was written")
        if x0.requires_grad and not out.requires_grad:
            raise UserError(f"{self.name} returned values that do not depend on x0_hat through torch operations "
                            "(detached, or computed outside torch): guidance needs their gradient")
        return out


def as_plugin(guide: Any, weight: float | None = None) -> PluginGuide:
    """A callable (or ``(callable, weight)``, or a :class:`PluginGuide`) as a :class:`PluginGuide`; an object's
    ``weight`` and ``name`` attributes are used when it has them."""
    if isinstance(guide, PluginGuide):
        return guide if weight is None else PluginGuide(guide.fn, float(weight), guide.name)
    if isinstance(guide, tuple) and len(guide) == 2 and callable(guide[0]):
        return as_plugin(guide[0], guide[1])
    if not callable(guide):
        raise UserError(f"a guide must be a head file, a callable log_p(x0) or (callable, weight); got "
                        f"{type(guide).__name__}")
    w = weight if weight is not None else getattr(guide, "weight", 1.0)
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise UserError(f"guide weight {w!r} is not a number") from None
    if not math.isfinite(w):
        raise UserError(f"guide weight {w} is not finite")
    name = getattr(guide, "name", None) or getattr(guide, "__qualname__", None) or type(guide).__name__
    return PluginGuide(guide, w, f"plug-in guide {name}")


# ------------------------------------------------------------------------------------ --guide module:function


def is_plugin_spec(text: str) -> bool:
    """Whether a ``--guide`` value names Python code rather than a head file: ``file.py:function[:w]``, or
    ``module:function[:w]`` when the part before ``:`` is no existing file, no ``.safetensors`` path, and a
    dotted module name, and the part after it a name (a head's ``HEAD:weight`` has a number there)."""
    source, sep, rest = text.partition(":")
    if not sep:
        return False
    if source.endswith(".py"):
        return True
    if Path(source).exists() or source.endswith(".safetensors") or not _MODULE.match(source):
        return False
    return bool(_ATTR.match(rest.partition(":")[0]))


def guide_weight(weight_text: str, spec: str, after: str) -> float:
    """The weight of a ``--guide`` spec (1 when none is written): a finite number, else one line naming the spec."""
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise UserError(f"--guide {spec!r}: the weight after {after} must be a number") from None
    if not math.isfinite(weight):
        raise UserError(f"--guide {spec!r}: the weight after {after} must be a finite number")
    return weight


def load_plugin(text: str) -> PluginGuide:
    """``module:function[:weight]`` or ``path/file.py:function[:weight]`` -> the guide (the module is imported
    with the current folder on ``sys.path``, as a script run from it would see)."""
    source, _, rest = text.partition(":")
    attr, _, weight_text = rest.partition(":")
    if not attr or ":" in weight_text:
        raise UserError(f"--guide {text!r}: a plug-in guide is module:function[:weight] or file.py:function[:weight]")
    weight = guide_weight(weight_text, text, "the function")
    module = _import(source, text)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--guide {text!r}: {source} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--guide {text!r}: {source}:{attr} is a {type(obj).__name__}, not a callable "
                        "log_p(x0) -> (N,)")
    guide = as_plugin(obj, weight if weight_text else None)
    guide.name = f"plug-in guide {source}:{attr}"
    return guide


def _import(source: str, text: str) -> Any:
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise UserError(f"--guide {text!r}: {source} not found")
            name = "ddguide_plugin_" + re.sub(r"\W", "_", str(path.resolve()))
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise UserError(f"--guide {text!r}: cannot import {source}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        here = os.getcwd()
        sys.path.insert(0, here)
        try:
            return importlib.import_module(source)
        finally:
            if here in sys.path:
                sys.path.remove(here)
    except UserError:
        raise
    except ModuleNotFoundError as e:
        raise UserError(f"--guide {text!r}: no module named {e.name!r} (a head file, a file.py or an importable "
                        "module:function)") from None
    except Exception as e:  # noqa: BLE001 - importing the user's code ran it
        raise UserError(f"--guide {text!r}: importing {source} failed: {e.__class__.__name__}: {e}") from None
