"""Resumable training state on disk: the ``checkpoint`` artifact that ``train``, ``finetune`` and ``cas`` keep
beside their output.

A checkpoint holds the network's weights (``model.<name>``), the EMA weights (``ema.<name>``, absent for a run
without EMA), Adam's state (``adam.<param>.<slot>``), the generator state (``rng``; ``rng.<r>`` for the other ranks
of a torchrun group), the device stream's generator state when the run draws t and the noise on the device
(``rng.device``; ``rng.device.<r>`` for the other ranks; absent otherwise) and the loss history (``losses``, one
value per step). Its config is a
:class:`CheckpointMeta`: the run's identity, which a resumed run must match, and the step reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ddguide.core import artifacts
from ddguide.core.errors import UserError

Ema = dict[str, torch.Tensor]


@dataclass
class RunState:
    """Where a run is: the steps (or epochs) finished and one loss per finished step."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


@artifacts.typed_config("checkpoint")
@dataclass(frozen=True)
class CheckpointMeta:
    """The config of a ``checkpoint`` artifact: the run's identity (the options it must be resumed with) and the
    step it reached."""

    identity: Any
    step: int

    def to_metadata(self) -> dict[str, Any]:
        """The JSON object stored as the artifact's config."""
        return {"identity": self.identity, "step": self.step}

    @classmethod
    def from_metadata(cls, config: dict[str, Any], path: str | Path) -> CheckpointMeta:
        """Read a checkpoint's config; a missing or invalid step is one line naming ``path``."""
        step = config.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise UserError(f"{path}: a checkpoint without the step it reached; delete it to start over")
        return cls(identity=config.get("identity"), step=step)


def checkpoint_path(out: str | Path) -> Path:
    """The checkpoint kept beside the output ``out`` (``m.safetensors`` -> ``m.ckpt.safetensors``)."""
    out = Path(out)
    return out.with_name(out.stem + ".ckpt.safetensors")


def save_checkpoint(path: Path, identity: dict[str, Any], net: torch.nn.Module, ema: Ema | None,
                    opt: torch.optim.Optimizer, gen: torch.Generator, state: RunState,
                    other_rngs: Sequence[torch.Tensor] = (), device_rngs: Sequence[torch.Tensor] = ()) -> None:
    """Write the whole state of a run (atomically); ``other_rngs`` are the generator states of ranks 1, 2, ...,
    ``device_rngs`` the device streams' states of ranks 0, 1, ... (none: a run without one) and ``ema`` None is a
    run without EMA weights."""
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in (ema or {}).items()})
    tensors.update(_adam_tensors(net, opt))
    tensors["rng"] = gen.get_state()
    tensors.update({f"rng.{r}": rng for r, rng in enumerate(other_rngs, start=1)})
    tensors.update({_device_key(r): rng for r, rng in enumerate(device_rngs)})
    tensors["losses"] = torch.tensor(state.losses, dtype=torch.float32)
    artifacts.save(path, tensors, config=CheckpointMeta(identity=identity, step=state.step), fingerprint="")


def restore_checkpoint(path: Path, identity: dict[str, Any], net: torch.nn.Module, ema: Ema | None,
                       opt: torch.optim.Optimizer, gen: torch.Generator, state: RunState, device: torch.device,
                       rank: int = 0, device_gen: torch.Generator | None = None) -> bool:
    """Load a checkpoint of the same run into ``net``, ``ema``, ``opt``, ``gen`` and ``state``.

    A checkpoint of another identity, or one that lacks part of the state, is refused in one line. Returns False
    when it holds no generator state for ``rank`` (a rank the saved run did not have); ``gen`` is then unchanged.
    ``device_gen``, a run's device stream, takes the state saved for ``rank`` when the checkpoint holds one of its
    kind; otherwise (a run without a device stream, one on another kind of device) it is seeded from ``gen`` as
    restored, so the resumed run is still one fixed sequence.
    """
    art = artifacts.load(path, "checkpoint")
    meta = CheckpointMeta.from_metadata(art.config, path)
    if meta.identity != identity:
        raise UserError(f"{path}: a checkpoint of a different training run (its options "
                        f"{json.dumps(meta.identity)}, this run's {json.dumps(identity)}); delete it or choose "
                        "another --out")
    _check_tensors(art, meta, net, ema or {})
    t = art.tensors
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for k in ema or {}:
        ema[k].copy_(t[f"ema.{k}"])
    _load_adam(t, net, opt, device)
    state.step = meta.step
    state.losses = t["losses"].tolist()
    rng = t.get("rng" if rank == 0 else f"rng.{rank}")
    if rng is not None:
        gen.set_state(rng)
    if device_gen is not None:
        saved = t.get(_device_key(rank))
        if saved is not None and saved.dtype == torch.uint8 and saved.shape == device_gen.get_state().shape:
            device_gen.set_state(saved)
        else:
            seed_device_stream(device_gen, gen)
    return rng is not None


def seed_device_stream(device_gen: torch.Generator, gen: torch.Generator) -> None:
    """Seed a run's device stream from its generator (one draw from ``gen``): a fresh run is reproducible from its
    seed alone."""
    device_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))


def _device_key(rank: int) -> str:
    return "rng.device" if rank == 0 else f"rng.device.{rank}"


def _adam_tensors(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter slots keyed by parameter name (a 0-d step stored as one value)."""
    out = {}
    for name, p in net.named_parameters():
        for slot, value in opt.state.get(p, {}).items():
            out[f"adam.{name}.{slot}"] = value.reshape(-1) if value.ndim == 0 else value
    return out


def _load_adam(t: dict[str, torch.Tensor], net: torch.nn.Module, opt: torch.optim.Optimizer,
               device: torch.device) -> None:
    for name, p in net.named_parameters():
        if f"adam.{name}.step" in t:
            opt.state[p] = {"step": t[f"adam.{name}.step"].reshape(()),
                            "exp_avg": t[f"adam.{name}.exp_avg"].to(device),
                            "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].to(device)}


def _check_tensors(art: artifacts.Artifact, meta: CheckpointMeta, net: torch.nn.Module, ema: Ema) -> None:
    """A checkpoint must hold the whole state it resumes: weights and EMA weights of this network's shapes, the
    loss history (one value per step) and the generator state."""
    t, path = art.tensors, art.path
    for prefix, names in (("model.", net.state_dict()), ("ema.", ema)):
        for k, v in names.items():
            if f"{prefix}{k}" not in t or tuple(t[f"{prefix}{k}"].shape) != tuple(v.shape):
                raise UserError(f"{path}: checkpoint lacks {prefix}{k} of this network's shape; delete it to "
                                "start over or choose another --out")
    losses = t.get("losses")
    if losses is None or losses.ndim != 1 or len(losses) != meta.step:
        raise UserError(f"{path}: a checkpoint without its loss history ({meta.step} steps); delete it to start "
                        "over")
    if "rng" not in t or t["rng"].dtype != torch.uint8:
        raise UserError(f"{path}: a checkpoint without its generator state; delete it to start over")
