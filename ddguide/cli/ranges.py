"""Numeric command-line options, checked once for every command before anything runs.

Every float option must be finite (``nan`` and ``inf`` parse as floats), and an option named in :data:`RANGES`
must lie in its range, whichever command takes it. The CLI calls :func:`check_options` with the parsed values.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ddguide.core.errors import UserError

BIG = 2**31 - 1  # a count beyond this is a typo, not a plan

# parameter name -> (the range in words, the test); one meaning per name across commands
RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "n": (f">= 1 (and at most {10**8})", lambda v: 1 <= v <= 10**8),
    "steps": (f">= 1 (and at most {10**9})", lambda v: 1 <= v <= 10**9),
    "batch": (f">= 1 (and at most {2**20})", lambda v: 1 <= v <= 2**20),
    "epochs": (">= 1 (and at most 100000)", lambda v: 1 <= v <= 100_000),
    "checkpoint_every": (">= 1", lambda v: 1 <= v <= BIG),
    "threads": ("in 1..4096", lambda v: 1 <= v <= 4096),
    "labels": (">= 1 (and at most 100000)", lambda v: 1 <= v <= 100_000),
    "seed": (">= 0 (and below 2**63)", lambda v: 0 <= v < 2**63),
    "timestep": (">= 0", lambda v: 0 <= v <= BIG),
    "image_size": ("in 1..4096", lambda v: 1 <= v <= 4096),
    "lr": ("> 0", lambda v: v > 0),
    "lr_final": (">= 0", lambda v: v >= 0),
    "ema": ("in [0, 1)", lambda v: 0 <= v < 1),
    "grad_clip": ("> 0", lambda v: v > 0),
    "eta": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "threshold": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "lam": (">= 0", lambda v: v >= 0),
    "p2_gamma": (">= 0", lambda v: v >= 0),
    "p2_k": ("> 0", lambda v: v > 0),
    "label_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "mixup_cutmix": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "augment_fraction": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "adv_eps": ("in (0, 2]", lambda v: 0 < v <= 2),
    "adv_steps": ("in 1..100", lambda v: 1 <= v <= 100),
    "milestones": ("two epochs A B with 0 <= A <= B", lambda v: 0 <= v[0] <= v[1]),
    "guide_window": ("HI LO with HI >= LO >= 0 (schedule indices)", lambda v: v[0] >= v[1] >= 0),
    "resample_window": ("HI LO with HI >= LO >= 0 (schedule indices)", lambda v: v[0] >= v[1] >= 0),
    "guide_every": (">= 1", lambda v: 1 <= v <= BIG),
    "particles": (">= 1 (and at most 4096)", lambda v: 1 <= v <= 4096),
    "candidates": (">= 1 (and at most 4096)", lambda v: 1 <= v <= 4096),
    "rounds": (">= 0 (and at most 1000)", lambda v: 0 <= v <= 1000),
    "resample_every": (">= 1", lambda v: 1 <= v <= BIG),
    "potential_scale": (">= 0", lambda v: v >= 0),
    "search_step": ("in (0, 10]", lambda v: 0 < v <= 10),
}


# parameter name -> the values it may take, for string options that a run might otherwise only read late
CHOICES: dict[str, tuple[str, ...]] = {
    "resize": ("refuse", "resize", "center-crop"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "sampler": ("ddim", "ddpm"),
    "guide_grad": ("full", "x0"),
    "smc": ("fk", "tds"),
    "potential": ("max", "diff", "sum"),
    "search": ("best-of-n", "zero-order", "prune"),
    "noise": ("none", "fixed"),
    "storage": ("fp32", "fp16"),
    "augment": ("none", "x0", "adv", "x0-adv"),
}


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, float)]
    return []


def _numeric(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(values: dict[str, Any], flags: dict[str, str] | None = None) -> None:
    """Refuse a non-finite float or an out-of-range value among ``values`` (parameter name -> parsed value);
    ``flags`` gives the spelling to name in the message (``lam`` -> ``--lambda``)."""
    flags = flags or {}
    for name, value in values.items():
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if any(not math.isfinite(v) for v in _floats(value)):
            raise UserError(f"{flag} must be a finite number, got {value}")
        if name in CHOICES and isinstance(value, str) and value not in CHOICES[name]:
            what = {"resize": "resize policy", "noise": "noise mode", "guide_grad": "gradient mode",
                    "augment": "augmentation"}.get(name, name)
            raise UserError(f"{flag}: unknown {what} {value!r} (choose from {', '.join(CHOICES[name])})")
        if name not in RANGES or not _numeric(value):
            continue
        words, test = RANGES[name]
        if not test(value):
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise UserError(f"{flag} must be {words}, got {shown}")


def finite(value: float, what: str) -> float:
    """``value`` if it is finite, else one line naming ``what``."""
    if not math.isfinite(value):
        raise UserError(f"{what}: expected a finite number, got {value}")
    return value
