"""Named architectures with their diffusion settings: the published ADM checkpoints (guided-diffusion,
improved-diffusion), whose file names select them in ``convert``, and ddguide's own small presets for ``train``."""

from __future__ import annotations

from dataclasses import dataclass

from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.unet import UNetConfig

# --------------------------------------------------------------------------------------------- presets

# Channel multipliers guided-/improved-diffusion pick from the image size when none is given.
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


@dataclass(frozen=True)
class Preset:
    """A named architecture together with the diffusion it was trained with (sampling needs both)."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    source: str


def _adm(size: int, channels: int, res_blocks: int, attn: tuple[int, ...], *, learn_sigma: bool = True,
         classes: int | None = None, heads: int = 4, head_channels: int = -1, scale_shift: bool = True,
         updown: bool = False, new_order: bool = False, dropout: float = 0.0) -> UNetConfig:
    return UNetConfig(image_size=size, model_channels=channels, out_channels=6 if learn_sigma else 3,
                      num_res_blocks=res_blocks, attention_resolutions=attn, dropout=dropout,
                      channel_mult=DEFAULT_CHANNEL_MULT[size], num_classes=classes, num_heads=heads,
                      num_head_channels=head_channels, use_scale_shift_norm=scale_shift, resblock_updown=updown,
                      use_new_attention_order=new_order)


def _presets() -> dict[str, Preset]:
    # improved-diffusion rescales its time input to [0, 1000); its ImageNet-64 and CIFAR-10 models use
    # 4000 cosine steps. guided-diffusion feeds the raw index and (except 64x64) a 1000-step linear schedule.
    cos4000 = DiffusionConfig(steps=4000, schedule="cosine", rescale_timesteps=True)
    lin1000 = DiffusionConfig(steps=1000, schedule="linear")
    cos1000 = DiffusionConfig(steps=1000, schedule="cosine")
    gd = "openai guided-diffusion"
    ddpm_seg = "ddpm-segmentation (guided-diffusion layout, P2-weighting FFHQ model)"
    lsun_like = _adm(256, 256, 2, (32, 16, 8), head_channels=64, updown=True, dropout=0.1)
    tiny = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_heads=2, norm_groups=4)
    return {
        "imagenet64_uncond_100M_1500K": Preset(_adm(64, 128, 3, (16, 8)), cos4000, "openai improved-diffusion"),
        "cifar10_uncond_50M_500K": Preset(_adm(32, 128, 3, (16, 8), dropout=0.3), cos4000,
                                          "openai improved-diffusion"),
        "lsun_uncond_100M_1200K_bs128": Preset(_adm(256, 128, 2, (16,), heads=1, scale_shift=False),
                                               lin1000, "openai improved-diffusion"),
        "64x64_diffusion": Preset(_adm(64, 192, 3, (32, 16, 8), classes=1000, head_channels=64, updown=True,
                                       new_order=True, dropout=0.1), cos1000, gd),
        "128x128_diffusion": Preset(_adm(128, 256, 2, (32, 16, 8), classes=1000, updown=True), lin1000, gd),
        "256x256_diffusion": Preset(_adm(256, 256, 2, (32, 16, 8), classes=1000, head_channels=64, updown=True),
                                    lin1000, gd),
        "256x256_diffusion_uncond": Preset(_adm(256, 256, 2, (32, 16, 8), head_channels=64, updown=True),
                                           lin1000, gd),
        "lsun_bedroom": Preset(lsun_like, lin1000, gd),
        "lsun_cat": Preset(lsun_like, lin1000, gd),
        "lsun_horse": Preset(lsun_like, lin1000, gd),
        "ffhq": Preset(lsun_like, lin1000, ddpm_seg),
        # small models trained on a CPU with `ddguide train`
        "shapes32": Preset(UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                                      attention_resolutions=(8,), num_heads=4, norm_groups=8),
                           DiffusionConfig(steps=1000, schedule="cosine"), "ddguide train"),
        "small16": Preset(UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                                     attention_resolutions=(8,), num_heads=4, norm_groups=8),
                          DiffusionConfig(steps=1000, schedule="cosine"), "ddguide train"),
        "small64": Preset(UNetConfig(image_size=64, model_channels=32, channel_mult=(1, 2, 2, 2, 2), num_res_blocks=2,
                                     attention_resolutions=(8,), num_heads=4, norm_groups=8),
                          DiffusionConfig(steps=1000, schedule="cosine"), "ddguide train"),
        "tiny": Preset(tiny, DiffusionConfig(steps=1000, schedule="linear"), "ddguide tests"),
    }


PRESETS: dict[str, Preset] = _presets()


def parameter_count(unet: UNetConfig) -> int:
    """The number of weights of a U-Net, counted on the meta device (nothing allocated, even at 550M)."""
    import torch

    from ddguide.core.unet import UNetModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNetModel(unet).parameters())


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
