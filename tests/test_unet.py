"""The ADM U-Net against the reference implementations: every published preset's state_dict layout, outputs and
feature taps equal to guided-/improved-diffusion's on the same weights, improved-diffusion's time rescaling,
truncated and batched feature taps, and the convert round trip.

Test data (tests/data/README.md says how it was made): ``adm_manifests.json`` holds the reference layouts of the
published checkpoints; ``parity/*.safetensors`` hold small reference models (weights, inputs, outputs, block
outputs) computed by the reference code itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ddguide.core.unet as unet_mod
from ddguide.core.diffusion import DiffusionConfig
from ddguide.core.errors import UserError
from ddguide.core.model import Model, load_model
from ddguide.core.presets import DEFAULT_CHANNEL_MULT, PRESETS
from ddguide.core.unet import UNetConfig, UNetModel
from ddguide.stages.convert import ConvertConfig, check_fits, convert

DATA = Path(__file__).parent / "data"
MANIFESTS = json.loads((DATA / "adm_manifests.json").read_text())
PARITY_FILES = sorted((DATA / "parity").glob("*.safetensors"))
PUBLISHED = [name for name, p in PRESETS.items() if not p.source.startswith("ddguide")]  # not ours (shapes32, small16, ...)
ATOL = 1e-5
RTOL = 1e-5


# --- helpers --------------------------------------------------------------------------------------





@dataclasses.dataclass
class Case:
    name: str
    cfg: UNetConfig
    state_dict: dict[str, torch.Tensor]  # reference keys, float32
    tensors: dict[str, torch.Tensor]  # inputs, outputs, taps
    taps: list[str]
    meta: dict[str, str]

    @property
    def x(self) -> torch.Tensor:
        return self.tensors["input.x"]

    @property
    def t(self) -> torch.Tensor:
        return self.tensors["input.t"]

    @property
    def y(self) -> torch.Tensor | None:
        return self.tensors.get("input.y")

    def net(self, **changes) -> UNetModel:
        net = UNetModel(dataclasses.replace(self.cfg, **changes)).eval()
        net.load_state_dict(self.state_dict)
        return net


_CACHE: dict[str, Case] = {}


def load_case(path: Path) -> Case:
    if path.stem not in _CACHE:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        sd = {k.removeprefix("sd."): v.float() for k, v in tensors.items() if k.startswith("sd.")}
        rest = {k: v for k, v in tensors.items() if not k.startswith("sd.")}
        _CACHE[path.stem] = Case(path.stem, UNetConfig.from_dict(json.loads(meta["unet"])), sd, rest,
                                 json.loads(meta["taps"]), meta)
    return _CACHE[path.stem]


def case(name: str) -> Case:
    return load_case(DATA / "parity" / f"{name}.safetensors")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """fp32 agreement: |actual - expected| <= ATOL + RTOL * |expected| everywhere (the values are O(1))."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=ATOL, rtol=RTOL), (what, max_err(actual, expected))


def flags_to_config(flags: dict) -> dict:
    """The UNetConfig a reference run with these command-line flags builds (the reference create_model's rules)."""
    size = flags["image_size"]
    mult = flags.get("channel_mult", "")
    return dict(
        image_size=size, in_channels=3, model_channels=flags["num_channels"],
        out_channels=6 if flags["learn_sigma"] else 3, num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=tuple(int(r) for r in flags["attention_resolutions"].split(",")),
        dropout=flags["dropout"],
        channel_mult=DEFAULT_CHANNEL_MULT[size] if mult == "" else tuple(int(m) for m in mult.split(",")),
        num_classes=1000 if flags["class_cond"] else None, num_heads=flags["num_heads"],
        num_head_channels=flags.get("num_head_channels", -1), num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"], resblock_updown=flags.get("resblock_updown", False),
        use_new_attention_order=flags.get("use_new_attention_order", False), norm_groups=32)


# --- published layouts ----------------------------------------------------------------------------


def test_manifests_cover_every_published_preset():
    assert sorted(MANIFESTS) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_layout_matches_reference(name):
    entry = MANIFESTS[name]
    with torch.device("meta"):
        net = UNetModel(PRESETS[name].unet)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    expected = entry["state_dict"]
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    misshaped = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not misshaped, list(misshaped.items())[:5]
    assert list(ours) == list(expected)  # same order as the reference's state_dict too
    assert sum(p.numel() for p in net.parameters()) == entry["params"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_options_match_reference_flags(name):
    """Options that do not show in the layout (dropout, heads, attention order) follow the published flags."""
    cfg = PRESETS[name].unet
    assert cfg.to_dict() == UNetConfig.from_dict(flags_to_config(MANIFESTS[name]["flags"])).to_dict()


@pytest.mark.parametrize("name", PUBLISHED)
def test_converter_accepts_published_layout(name):
    sd = {k: torch.empty(shape, device="meta") for k, shape in MANIFESTS[name]["state_dict"].items()}
    check_fits(PRESETS[name].unet, sd, f"{name}.pt")


def test_published_time_inputs():
    """improved-diffusion's 4000-step models see t * 1000/4000; guided-diffusion's see the raw index."""
    t = torch.tensor([0, 1, 492, 3517, 3999])
    for name in ("imagenet64_uncond_100M_1500K", "cifar10_uncond_50M_500K"):
        d = PRESETS[name].diffusion
        assert (d.steps, d.schedule, d.rescale_timesteps) == (4000, "cosine", True)
        assert torch.equal(d.model_time(t), t.float() * 0.25)
    t = torch.tensor([0, 1, 500, 999])
    for name in PUBLISHED:
        d = PRESETS[name].diffusion
        if MANIFESTS[name]["family"] == "g":
            assert d.steps == 1000 and not d.rescale_timesteps and torch.equal(d.model_time(t), t)
        else:  # the reference rule: t * 1000 / steps (the identity in value for a 1000-step model)
            assert torch.equal(d.model_time(t).float(), t.float() * (1000.0 / d.steps))


# --- parity with the reference code ---------------------------------------------------------------


def test_parity_data_covers_every_option():
    cases = [load_case(p) for p in PARITY_FILES]
    assert len(cases) >= 5
    cfgs = [c.cfg for c in cases]
    assert {c.use_new_attention_order for c in cfgs} == {True, False}
    # the published combinations: legacy + num_heads (128x128, improved-diffusion), legacy + num_head_channels
    # (256x256, LSUN, FFHQ), new order + num_head_channels (64x64)
    assert {(c.use_new_attention_order, c.num_head_channels == -1) for c in cfgs} >= {
        (False, True), (False, False), (True, False)}
    assert {c.use_scale_shift_norm for c in cfgs} == {True, False}
    assert {c.resblock_updown for c in cfgs} == {True, False}
    assert {c.learn_sigma for c in cfgs} == {True, False}
    assert any(c.num_classes for c in cfgs) and any(c.num_classes is None for c in cfgs)
    assert any(c.num_head_channels == -1 and c.num_heads_upsample not in (-1, c.num_heads) for c in cfgs)
    assert {len(c.channel_mult) for c in cfgs} >= {2, 3}
    assert any(len(set(c.channel_mult)) > 1 for c in cfgs)  # a channel change between levels
    assert any(len(c.attention_resolutions) > 1 for c in cfgs)
    assert any(c.image_size in c.attention_resolutions for c in cfgs)  # attention at full resolution
    assert any(c.num_res_blocks > 1 for c in cfgs)
    assert any(c.dropout > 0 for c in cfgs)
    refs = {json.loads(c.meta["reference"])["repo"] for c in cases}
    assert refs == {"openai/guided-diffusion", "openai/improved-diffusion"}
    assert any(not torch.equal(c.t, c.t.round()) for c in cases)  # fractional times


@pytest.mark.parametrize("path", PARITY_FILES, ids=lambda p: p.stem)
def test_forward_matches_reference(path):
    c = load_case(path)
    assert c.cfg.norm_groups == 32
    # the re-randomised weights leave no zero-initialised layer (that would hide a branch)
    zero = [k for k, v in c.state_dict.items() if not v.abs().amax() > 0]
    assert not zero, zero[:3]
    with torch.no_grad():
        out = c.net()(c.x, c.t, c.y)
    assert out.shape[1] == c.cfg.out_channels
    assert_matches(out, c.tensors["output"])


@pytest.mark.parametrize("path", PARITY_FILES, ids=lambda p: p.stem)
def test_features_match_reference(path):
    c = load_case(path)
    net = c.net()
    with torch.no_grad():
        together = net.features(c.x, c.t, c.taps, c.y)
        assert list(together) == c.taps
        for tap in c.taps:
            ref = c.tensors[f"tap.{tap}"]
            assert_matches(together[tap], ref, tap)
            alone = net.features(c.x, c.t, [tap], c.y)[tap]
            assert_matches(alone, ref, tap)
            assert net.block_channels(tap) == ref.shape[1]
            assert net.block_downsampling(tap) * ref.shape[-1] == c.cfg.image_size


# The data is discriminative: each detail the parity tests guard changes the outputs by far more than ATOL.
# (With 32 channels and 32 groups, GroupNorm cancels a per-channel shift, so the configs without scale-shift
# have a 64-channel level where the timestep and class embedding do show.)


@pytest.mark.parametrize("path", PARITY_FILES, ids=lambda p: p.stem)
def test_parity_data_catches_attention_order(path):
    c = load_case(path)
    single_head = c.cfg.num_head_channels == -1 and c.cfg.num_heads == 1 and c.cfg.num_heads_upsample in (-1, 1)
    with torch.no_grad():
        out = c.net(use_new_attention_order=not c.cfg.use_new_attention_order)(c.x, c.t, c.y)
    if single_head:  # one head: both orders are the same computation
        assert_matches(out, c.tensors["output"])
    else:
        assert max_err(out, c.tensors["output"]) > 1e-3


@pytest.mark.parametrize("path", PARITY_FILES, ids=lambda p: p.stem)
def test_parity_data_catches_time_and_label(path):
    c = load_case(path)
    net = c.net()
    with torch.no_grad():
        assert max_err(net(c.x, c.t + 1, c.y), c.tensors["output"]) > 1e-3
        if c.y is not None:
            other = (c.y + 1) % c.cfg.num_classes
            assert max_err(net(c.x, c.t, other), c.tensors["output"]) > 1e-3


@pytest.mark.parametrize("path", PARITY_FILES, ids=lambda p: p.stem)
def test_parity_data_catches_embedding_order(path, monkeypatch):
    """sin before cos (instead of the reference's cos before sin) is caught."""
    c = load_case(path)
    original = unet_mod.timestep_embedding

    def sin_first(t, dim, max_period=10000.0):
        emb = original(t, dim, max_period)
        return torch.cat([emb[:, dim // 2:], emb[:, : dim // 2]], dim=1)

    monkeypatch.setattr(unet_mod, "timestep_embedding", sin_first)
    with torch.no_grad():
        out = c.net()(c.x, c.t, c.y)
    assert max_err(out, c.tensors["output"]) > 1e-3


def test_improved_diffusion_time_rescaling_through_model():
    """Model(x, t_index) equals the reference GaussianDiffusion calling its UNet with _scale_timesteps(t)."""
    c = case("idf_rescale_cosine4000")
    diffusion = DiffusionConfig.from_dict(json.loads(c.meta["diffusion"]))
    assert diffusion == DiffusionConfig(steps=4000, schedule="cosine", rescale_timesteps=True)
    t_index = c.tensors["rescale.t_index"]
    ref_time = c.tensors["rescale.model_time"]
    assert torch.equal(ref_time, t_index.float() * (1000.0 / 4000))
    assert torch.equal(diffusion.model_time(t_index), ref_time)
    for name in ("imagenet64_uncond_100M_1500K", "cifar10_uncond_50M_500K"):
        assert torch.equal(PRESETS[name].diffusion.model_time(t_index), ref_time)
    model = Model(c.net(), diffusion).eval()
    with torch.no_grad():
        out = model(c.x, t_index)
        assert_matches(out, c.tensors["rescale.output"])
        # without the rescaling the network would see 492 and 3517: clearly different
        assert max_err(c.net()(c.x, t_index), c.tensors["rescale.output"]) > 1e-3
        feats = model.features(c.x, t_index, ["mid"])["mid"]
        assert_matches(feats, c.net().features(c.x, ref_time, ["mid"])["mid"])


# --- truncated and batched feature taps -----------------------------------------------------------


def test_features_stop_after_deepest_tap(monkeypatch):
    c = case("gd_legacy_headch_noscaleshift_updown")
    net = c.net()

    def boom(*args, **kwargs):
        raise AssertionError("ran past the deepest tapped block")

    monkeypatch.setattr(net.output_blocks[0], "forward", boom)
    monkeypatch.setattr(net.out, "forward", boom)
    with torch.no_grad():
        feats = net.features(c.x, c.t, ["mid", "in.2"], c.y)
    assert list(feats) == ["mid", "in.2"]
    assert_matches(feats["mid"], c.tensors["tap.mid"])
    assert_matches(feats["in.2"], c.tensors["tap.in.2"])
    with pytest.raises(AssertionError, match="ran past"):
        net.features(c.x, c.t, ["out.0"], c.y)


def test_features_skip_the_rest_of_the_decoder(monkeypatch):
    c = case("gd_legacy_heads_updown_cond")
    net = c.net()

    def boom(*args, **kwargs):
        raise AssertionError("ran past the deepest tapped block")

    last = len(net.output_blocks) - 1
    monkeypatch.setattr(net.output_blocks[last], "forward", boom)
    with torch.no_grad():
        feats = net.features(c.x, c.t, [f"out.{last - 1}", "mid"], c.y)
    assert feats["mid"].shape == c.tensors["tap.mid"].shape
    assert_matches(feats["mid"], c.tensors["tap.mid"])


def test_features_batch_several_timesteps():
    """One pass over (image, time) pairs equals separate passes per timestep."""
    c = case("idf_rescale_cosine4000")
    model = Model(c.net(), DiffusionConfig(steps=4000, schedule="cosine", rescale_timesteps=True)).eval()
    blocks = ["in.2", "mid", "out.2"]
    times = [30, 1200, 3900]
    n = c.x.shape[0]
    with torch.no_grad():
        batched = model.features(c.x.repeat(len(times), 1, 1, 1),
                                 torch.tensor(times).repeat_interleave(n), blocks)
        for j, tt in enumerate(times):
            single = model.features(c.x, torch.full((n,), tt), blocks)
            for b in blocks:
                assert_matches(batched[b][j * n:(j + 1) * n], single[b], f"t={tt} {b}")
        # and timesteps really change the features
        assert max_err(batched["mid"][:n], batched["mid"][n:2 * n]) > 1e-2


def test_features_class_conditional_and_unknown_block():
    c = case("idf_noscaleshift_cond")
    net = c.net()
    with torch.no_grad():
        a = net.features(c.x, c.t, ["mid"], c.y)["mid"]
        b = net.features(c.x, c.t, ["mid"], (c.y + 1) % 3)["mid"]
    assert_matches(a, c.tensors["tap.mid"])
    assert max_err(a, b) > 1e-3
    with pytest.raises(UserError, match="unknown block"):
        net.features(c.x, c.t, ["out.99"], c.y)
    with pytest.raises(UserError, match="unknown block"):
        net.features(c.x, c.t, ["middle"], c.y)


# --- convert round trip ---------------------------------------------------------------------------


def save_reference_checkpoint(path: Path, c: Case) -> Path:
    torch.save({k: v.clone() for k, v in c.state_dict.items()}, path)
    return path


def test_convert_round_trip(tmp_path):
    """A reference-format .pt converts with explicit options and loads back with unchanged outputs (in eval mode:
    this model has dropout 0.1)."""
    c = case("gd_legacy_heads_updown_cond")
    ckpt = save_reference_checkpoint(tmp_path / "custom_model.pt", c)
    out = tmp_path / "model.safetensors"
    convert(ConvertConfig(checkpoint=str(ckpt), out=str(out), overrides=c.cfg.to_dict()))
    model = load_model(out)
    assert model.net.cfg == c.cfg and not model.training
    with torch.no_grad():
        assert_matches(model(c.x, c.t, c.y), c.tensors["output"])
        feats = model.features(c.x, c.t, c.taps, c.y)
    for tap in c.taps:
        assert_matches(feats[tap], c.tensors[f"tap.{tap}"])


def test_convert_round_trip_rescaled(tmp_path):
    c = case("idf_rescale_cosine4000")
    ckpt = save_reference_checkpoint(tmp_path / "ema_0.9999_500000.pt", c)
    out = tmp_path / "idf.safetensors"
    convert(ConvertConfig(checkpoint=str(ckpt), out=str(out), overrides=c.cfg.to_dict(),
                          diffusion=json.loads(c.meta["diffusion"])))
    model = load_model(out)
    assert model.diffusion == DiffusionConfig(steps=4000, schedule="cosine", rescale_timesteps=True)
    with torch.no_grad():
        assert_matches(model(c.x, c.tensors["rescale.t_index"]), c.tensors["rescale.output"])


@pytest.mark.parametrize("name, change, flag", [
    ("gd_legacy_heads_updown_cond", {"out_channels": 3}, "learn_sigma=True"),
    ("gd_neworder_headch_fullres", {"out_channels": 6}, "learn_sigma=False"),
    ("gd_legacy_headch_noscaleshift_updown", {"use_scale_shift_norm": True}, "use_scale_shift_norm=False"),
    ("gd_legacy_heads_updown_cond", {"use_scale_shift_norm": False}, "use_scale_shift_norm=True"),
    ("gd_legacy_heads_updown_cond", {"resblock_updown": False}, "resblock_updown=True"),
    ("idf_noscaleshift_cond", {"num_classes": None}, "class_cond=True"),
])
def test_convert_refuses_wrong_flag(tmp_path, name, change, flag):
    c = case(name)
    ckpt = save_reference_checkpoint(tmp_path / "model.pt", c)
    out = tmp_path / "out" / "model.safetensors"
    overrides = {**c.cfg.to_dict(), **change}
    with pytest.raises(UserError) as err:
        convert(ConvertConfig(checkpoint=str(ckpt), out=str(out), overrides=overrides))
    msg = str(err.value)
    assert "does not fit" in msg and flag in msg, msg
    assert "\n" not in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["model.pt"]  # not even a temporary file


def test_upsampling_blocks_are_the_resolution_doubling_output_blocks():
    import torch

    from ddguide.core.presets import PRESETS
    from ddguide.core.unet import UNetModel

    assert UNetModel(PRESETS["shapes32"].unet).upsampling_blocks() == ["out.2", "out.5", "out.8"]
    with torch.device("meta"):  # resblock_updown variant
        assert UNetModel(PRESETS["64x64_diffusion"].unet).upsampling_blocks() == ["out.3", "out.7", "out.11"]


def test_attribute_blocks_and_block_modules():
    from conftest import build_tiny

    net = build_tiny().net
    mid, up = net.attribute_blocks()
    assert mid == "mid" and up in net.upsampling_blocks()
    assert net.block_module("mid") is net.middle_block and net.block_module("in.0") is net.input_blocks[0]
    assert net.block_module(f"out.{len(net.output_blocks) - 1}") is net.output_blocks[-1]


def test_pointwise_convolutions_stay_on_onednn_and_equal_nn_conv():
    # PyTorch gives fp32 1x1 convolutions at batch < 16 on one thread to _slow_conv2d; ours take oneDNN,
    # with the outputs and gradients of nn.Conv1d / nn.Conv2d.
    torch.manual_seed(0)
    for new, old, x in ((unet_mod.Conv1x1(24, 40, 1), torch.nn.Conv2d(24, 40, 1), torch.randn(2, 24, 9, 7)),
                        (unet_mod.Conv1x1d(24, 72, 1), torch.nn.Conv1d(24, 72, 1), torch.randn(3, 24, 50))):
        old.load_state_dict(new.state_dict())
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outs = [new(xs[0]), old(xs[1])]
        torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=RTOL)
        for out in outs:
            out.square().sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(new.weight.grad, old.weight.grad, atol=ATOL, rtol=RTOL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = UNetModel(PRESETS["tiny"].unet).eval()
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
        with torch.profiler.profile() as prof:
            net(x, torch.tensor([3, 500])).sum().backward()
    finally:
        torch.set_num_threads(threads)
    ops = {e.key for e in prof.key_averages()}
    assert not any("slow_conv" in op for op in ops), sorted(op for op in ops if "conv" in op)
