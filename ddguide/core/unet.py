"""The ADM U-Net (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021) with feature taps.

Parameter names and shapes are identical to openai guided-diffusion's ``UNetModel`` (and improved-diffusion's,
which is the same layout with fewer options), so published checkpoints load as they are. Details that change
the computation without changing any key are reproduced too: the timestep embedding puts cos before sin,
GroupNorm runs in float32, scale-shift is ``norm(h) * (1 + scale) + shift``, and attention splits ``qkv``
into heads before (legacy) or after (new order) splitting it into q, k, v.

Feature taps name blocks ``in.<i>`` (``input_blocks[i]``), ``mid`` (``middle_block``) and ``out.<i>``
(``output_blocks[i]``); :meth:`UNetModel.features` stops after the deepest requested block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddguide.core.errors import UserError


@dataclass(frozen=True)
class UNetConfig:
    """Architecture options, in guided-diffusion's vocabulary (``attention_resolutions`` as downsampling rates
    are derived from the flag's resolutions and ``image_size``)."""

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 64
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature-map sides that get self-attention
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 2)
    num_classes: int | None = None
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    norm_groups: int = 32  # published models use 32; tiny test models use fewer

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown U-Net options: {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("attention_resolutions", "channel_mult"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels


# --------------------------------------------------------------------------------------------- building blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first as in ADM. (N,) -> (N, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (ADM's ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).type(x.dtype)


def _onednn_1x1(x: torch.Tensor) -> bool:
    """Whether a dilation of 2 routes this 1x1 convolution to oneDNN (see :class:`Conv1x1`)."""
    return x.device.type == "cpu" and (x.shape[0] > 1 or x.numel() > 20480)


class Conv1x1(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters and keys) that runs on oneDNN at any thread count and batch.

    PyTorch sends float32 1x1 convolutions with batch < 16 on one thread to its own ``_slow_conv2d`` kernels,
    1.6-1.8x slower than oneDNN on this CPU (13-15 % of an ADM-64 step). A 1x1 kernel's dilation does not change
    its result, but a dilated convolution is never given to those kernels, so it is passed dilation 2 (except
    where PyTorch would pick its native kernels anyway: batch 1 with fewer than 20481 elements)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_1x1(x):
            return F.conv2d(x, self.weight, self.bias, dilation=2)
        return super().forward(x)


class Conv1x1d(nn.Conv1d):
    """:class:`Conv1x1` for ``nn.Conv1d`` (attention's ``qkv`` and ``proj_out``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_1x1(x):
            return F.conv1d(x, self.weight, self.bias, dilation=2)
        return super().forward(x)


class EmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the timestep embedding (ADM's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        # the key is `op` in both cases: a strided conv or a parameter-free average pool
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding; optionally resamples (resblock_updown)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool, groups: int, up: bool = False, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else Conv1x1(channels, out_channels, 1)
        self.use_scale_shift_norm = use_scale_shift_norm

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the norm/activation and the conv, for both paths
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (N, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention. ``legacy`` order splits heads first, then q/k/v (improved-diffusion and most
    guided-diffusion models); the new order splits q/k/v first (guided-diffusion's 64x64 model)."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool, groups: int):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        if channels % self.num_heads:
            raise UserError(f"attention: {channels} channels do not split into {self.num_heads} heads")
        self.norm = GroupNorm32(groups, channels)
        self.qkv = Conv1x1d(channels, 3 * channels, 1)
        self.proj_out = Conv1x1d(channels, channels, 1)
        self.new_order = new_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # (N, C, L)
        qkv = self.qkv(self.norm(x))  # (N, 3C, L)
        length, heads, ch = x.shape[-1], self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (t.reshape(n * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
        # softmax(q^T k / sqrt(ch)) v, heads as batch: (N*H, L, ch)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = a.transpose(1, 2).reshape(n, c, length)
        return (x + self.proj_out(h)).reshape(n, c, *spatial)


# --------------------------------------------------------------------------------------------- the network


class RecordedBlocks:
    """The tap shapes a network records when it is built, ``_blocks[name] = (channels, downsampling)``, and the
    questions every network answers from them (the ADM U-Net and the diffusers wrapper share them).
    ``known_blocks()`` says, for the one-line refusal of an unknown block, which blocks the network has."""

    _blocks: dict[str, tuple[int, int]]

    def known_blocks(self) -> str:
        raise NotImplementedError

    def block_channels(self, name: str) -> int:
        """Channels of a tapped block's output."""
        self.check_blocks([name])
        return self._blocks[name][0]

    def block_downsampling(self, name: str) -> int:
        """How many times smaller than the image a block's output is."""
        self.check_blocks([name])
        return self._blocks[name][1]

    def check_blocks(self, blocks: Iterable[str]) -> None:
        """Refuse block names this network does not have (one line naming the ones it has)."""
        for b in blocks:
            if b not in self._blocks:
                raise UserError(f"unknown block {b!r}; {self.known_blocks()}")


class UNetModel(RecordedBlocks, nn.Module):
    """ADM U-Net: ``forward(x, t, y)`` returns the raw output (eps, plus variance channels if learn_sigma)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, g, **kw)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, cfg.num_head_channels, cfg.use_new_attention_order, g)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        # every block's output (channels, downsampling), recorded as it is built: the tap vocabulary
        self._blocks: dict[str, tuple[int, int]] = {}
        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        self._blocks["in.0"] = (ch, ds)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                self._blocks[f"in.{len(self.input_blocks) - 1}"] = (ch, ds)
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
                self._blocks[f"in.{len(self.input_blocks) - 1}"] = (ch, ds)

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, cfg.num_heads), res(ch, ch))
        self._blocks["mid"] = (ch, ds)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
                self._blocks[f"out.{len(self.output_blocks) - 1}"] = (ch, ds)

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    # -- block vocabulary ------------------------------------------------------------------------------------

    def block_names(self) -> list[str]:
        """All tappable blocks in execution order."""
        return ([f"in.{i}" for i in range(len(self.input_blocks))] + ["mid"]
                + [f"out.{i}" for i in range(len(self.output_blocks))])

    def upsampling_blocks(self) -> list[str]:
        """Output blocks that end by doubling the resolution, coarsest first (the paper's 'upsampling blocks')."""
        return [f"out.{i}" for i, block in enumerate(self.output_blocks)
                if isinstance(block[-1], Upsample) or (isinstance(block[-1], ResBlock) and block[-1].updown)]

    def default_taps(self) -> tuple[str, ...]:
        """``extract``'s default taps: ``mid`` and the two finest upsampling blocks (``mid out.5 out.8`` on the
        shipped model). Chosen by benchmarks/taps.py: the only tap set there whose heads reach >= 0.93 on fresh
        images for colour, shape, count and position alike (README, "Choosing taps")."""
        return tuple(dict.fromkeys(("mid", *self.upsampling_blocks()[-2:])))

    def attribute_blocks(self) -> tuple[str, str]:
        """The taps of the paper's attribute heads (§5.1): ``mid`` and the second upsampling block."""
        ups = self.upsampling_blocks()
        return "mid", ups[min(1, len(ups) - 1)]

    def block_module(self, name: str) -> nn.Module:
        """The module whose output is the tap ``name``."""
        self.check_blocks([name])
        modules = [*self.input_blocks, self.middle_block, *self.output_blocks]  # block_names() order
        return modules[self.block_names().index(name)]

    def known_blocks(self) -> str:
        return f"this model has in.0..in.{len(self.input_blocks) - 1}, mid, out.0..out.{len(self.output_blocks) - 1}"

    # -- forward ---------------------------------------------------------------------------------------------

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Timestep (+ class) embedding. ``t`` is the model's own time input (already rescaled if needed)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            if self.cfg.num_classes is None:
                raise UserError("class labels given to an unconditional model")
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, y)  # (N, 4*mc)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))  # (N, out_channels, H, W)

    def features(self, x: torch.Tensor, t: torch.Tensor, blocks: Iterable[str],
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the named blocks for input ``x`` at model time ``t``, stopping after the deepest one."""
        wanted = list(dict.fromkeys(blocks))
        self.check_blocks(wanted)
        order = self.block_names()
        last = max(order.index(b) for b in wanted)
        emb = self.embed(t, y)
        taps: dict[str, torch.Tensor] = {}
        # the output blocks that run take the last skips; the others (the finest, largest) need not be kept
        n_out = sum(name.startswith("out.") for name in order[: last + 1])
        keep_from = len(self.input_blocks) - n_out
        hs: list[torch.Tensor | None] = []
        h = x
        for name in order[: last + 1]:
            kind, _, idx = name.partition(".")
            if kind == "in":
                h = self.input_blocks[int(idx)](h, emb)
                hs.append(h if int(idx) >= keep_from else None)
            elif kind == "mid":
                h = self.middle_block(h, emb)
            else:
                h = self.output_blocks[int(idx)](torch.cat([h, hs.pop()], dim=1), emb)
            if name in wanted:
                taps[name] = h
        return {b: taps[b] for b in wanted}
