"""`train-head --augment x0`: heads trained also on the taps of x0_hat(x_t), the inputs guidance feeds them;
`--augment adv`: also on adversarial versions of the labelled images (PGD through the feature pass); `--augment
x0-adv`: on adversarial versions of their x0_hat.

`--augment none` (the default) must give the head it always gave: the digests below cover the weights, the
config (the two paths left out) and the fingerprint of heads written by train-head before --augment existed
(in the NCHW layout models loaded in then: the `nchw_layout` fixture).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, cli, expect_ok, expect_user_error, shapes_data
from ddguide.core import artifacts
from ddguide.core.model import save_model

pytestmark = pytest.mark.usefixtures("nchw_layout")  # every test here loads models as the digests were recorded

# kind -> digest of a 6-step head on the module's features, recorded with train-head before --augment existed
NONE_DIGESTS = {"classifier": "8f29b05435d2284b", "segmentation": "17d025e19629f540"}


def head_digest(path: Path) -> str:
    art = artifacts.load(path, "head")
    config = dict(art.config)
    config["train"] = {k: v for k, v in config["train"].items() if k not in ("features", "out")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + art.fingerprint.encode())
    for key in sorted(art.tensors):
        h.update(key.encode())
        h.update(art.tensors[key].numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def feats(tmp_path_factory, tiny_model_path, nchw_layout) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("augment")
    data = shapes_data(root, n=12, size=16)
    out = {}
    for kind, targets in (("classifier", ("--labels", data / "attributes.csv", "--label", "has_circle")),
                          ("segmentation", ("--masks", data / "masks"))):
        out[kind] = root / f"{kind}.safetensors"
        expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 10,
                      *targets, "--device", "cpu", "--out", out[kind]))
    return out


def train(feats_path, out, *args):
    return cli("train-head", feats_path, "--steps", 6, "--out", out, *args)


@pytest.mark.parametrize("kind", ["classifier", "segmentation"])
def test_augment_none_gives_the_head_it_always_gave(feats, tmp_path, tiny_model_path, kind):
    for name, args in (("default", ()), ("none", ("--augment", "none")),
                       ("none-model", ("--augment", "none", "--model", tiny_model_path))):
        out = tmp_path / f"{name}.safetensors"
        expect_ok(train(feats[kind], out, "--kind", kind, *args))
        assert head_digest(out) == NONE_DIGESTS[kind], name
        assert "augment" not in artifacts.load(out, "head").config["train"]


# augmentation -> (its options, the training record it must write, keys that record must lack, its metrics)
AUGMENTED = {
    "x0": ((), {"augment": "x0", "augment_fraction": 0.5, "augment_t": [0, 500], "precision": "fp32"},
           ("adv_eps", "adv_steps"), ("x0",)),
    "adv": (("--adv-eps", 0.2, "--adv-steps", 2),
            {"augment": "adv", "augment_fraction": 0.5, "adv_eps": 0.2, "adv_steps": 2, "precision": "fp32"},
            ("augment_t",), ("x0", "adv")),
    "x0-adv": (("--adv-steps", 2),
               {"augment": "x0-adv", "augment_fraction": 0.5, "augment_t": [0, 500], "adv_eps": 0.25, "adv_steps": 2,
                "precision": "fp32"}, (), ("x0", "adv")),
}


@pytest.mark.parametrize("augment", list(AUGMENTED))
@pytest.mark.parametrize("kind", ["classifier", "segmentation"])
def test_augment_trains_records_and_repeats(feats, tmp_path, tiny_model_path, kind, augment):
    extra, record, absent, metrics = AUGMENTED[augment]
    args = ("--kind", kind, "--augment", augment, *extra, "--model", tiny_model_path, "--device", "cpu",
            "--precision", "fp32")
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    expect_ok(train(feats[kind], a, *args))
    expect_ok(train(feats[kind], b, *args))
    expect_ok(train(feats[kind], c, *args, "--seed", 1))
    art = artifacts.load(a, "head")
    t = art.config["train"]
    assert {k: t[k] for k in record} == record
    assert not any(k in t for k in absent)
    for metric in metrics:
        name = f"val_miou_{metric}" if kind == "segmentation" else f"val_accuracy_{metric}"
        assert 0 <= art.config["metrics"][name] <= 1
    assert head_digest(a) == head_digest(b)  # one seed, one head
    assert head_digest(a) != head_digest(c)
    none = tmp_path / "none.safetensors"
    expect_ok(train(feats[kind], none, "--kind", kind))
    weights = artifacts.load(none, "head").tensors
    assert any(not torch.equal(weights[k], art.tensors[k]) for k in weights)  # the augmentation did something


def test_x0_adv_attacks_from_x0_hat_not_from_the_images(feats, tmp_path, tiny_model_path):
    """--augment x0-adv and --augment adv with one seed and radius train different heads: the attack's start
    differs (x0_hat at a drawn t, against the clean image)."""
    heads = {}
    for augment in ("adv", "x0-adv"):
        heads[augment] = tmp_path / f"{augment}.safetensors"
        expect_ok(train(feats["classifier"], heads[augment], "--augment", augment, "--adv-steps", 1, "--model",
                        tiny_model_path, "--device", "cpu", "--precision", "fp32"))
    a, b = (artifacts.load(heads[k], "head").tensors for k in ("adv", "x0-adv"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_augment_leaves_the_global_generator_alone(feats, tmp_path, tiny_model_path):
    from ddguide.stages.train_head import TrainHeadConfig, train_head

    torch.manual_seed(3)
    before = torch.get_rng_state()
    train_head(TrainHeadConfig(features=str(feats["classifier"]), out=str(tmp_path / "h.safetensors"), steps=3,
                               augment="x0", model=str(tiny_model_path)))
    assert torch.equal(torch.get_rng_state(), before)


def test_augment_fraction_zero_keeps_the_clean_weights(feats, tmp_path, tiny_model_path):
    """With no share augmented the weights are the clean head's: the augmentation draws from its own generator."""
    none, zero = tmp_path / "none.safetensors", tmp_path / "zero.safetensors"
    expect_ok(train(feats["classifier"], none))
    expect_ok(train(feats["classifier"], zero, "--augment", "x0", "--augment-fraction", 0, "--model",
                    tiny_model_path, "--device", "cpu"))
    a, b = artifacts.load(none, "head").tensors, artifacts.load(zero, "head").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_other_than_the_features_is_refused(feats, tmp_path):
    other = tmp_path / "other.safetensors"
    save_model(other, build_tiny(seed=1))
    out = tmp_path / "h.safetensors"
    for args in (("--augment", "x0"), ("--augment", "x0", "--model", other), ("--model", other)):
        expect_user_error(train(feats["classifier"], out, "--device", "cpu", *args), "heads and features only work")
        assert not out.exists()
    expect_user_error(train(feats["classifier"], out, "--augment", "x0"), "the shipped model")


@pytest.mark.parametrize("args, fragment", [
    (("--augment", "foo"), "--augment: unknown augmentation 'foo' (choose from none, x0, adv, x0-adv)"),
    (("--augment", "x0", "--augment-fraction", 1.5), "--augment-fraction must be in [0, 1], got 1.5"),
    (("--augment-fraction", -0.1), "--augment-fraction must be in [0, 1], got -0.1"),
    (("--augment-fraction", "nan"), "--augment-fraction must be a finite number"),
    (("--augment", "x0", "--kind", "rejection"), "--augment x0 is for classifier and segmentation heads"),
    (("--augment", "adv", "--kind", "rejection"), "--augment adv is for classifier and segmentation heads"),
    (("--augment", "adv", "--adv-eps", 0), "--adv-eps must be in (0, 2], got 0"),
    (("--augment", "adv", "--adv-eps", "nan"), "--adv-eps must be a finite number"),
    (("--augment", "adv", "--adv-steps", 0), "--adv-steps must be in 1..100, got 0"),
    (("--augment", "x0-adv", "--adv-eps", 3), "--adv-eps must be in (0, 2], got 3"),
    (("--augment", "x0-adv", "--kind", "pixel"), "--augment x0-adv is for classifier and segmentation heads"),
])
def test_bad_augment_values_are_one_line(feats, tmp_path, tiny_model_path, args, fragment):
    out = tmp_path / "h.safetensors"
    expect_user_error(train(feats["classifier"], out, "--model", tiny_model_path, "--device", "cpu", *args), fragment)
    assert not out.exists()


def test_help_shows_the_augment_options():
    from typer.testing import CliRunner

    from ddguide.cli import app

    text = CliRunner().invoke(app, ["train-head", "--help"], env={"COLUMNS": "2000"}).output
    assert "--augment-fraction" in text and "[range: in [0, 1]]" in text and "--augment " in text



def test_pgd_stays_in_the_ball_and_raises_the_loss(feats, tmp_path, tiny_model_path):
    """The perturbation keeps to its L2 radius and to [-1, 1], and the head's loss on it is higher than on the
    clean images (the point of the attack); a larger radius raises it further."""
    import math

    import torch.nn.functional as F

    from ddguide.core.model import load_model
    from ddguide.method.features import load_features
    from ddguide.method.heads import load_head
    from ddguide.stages.train_head import _pixels, _targets, pgd, taps_input

    out = tmp_path / "h.safetensors"
    expect_ok(train(feats["classifier"], out, "--steps", 20))
    head, f = load_head(out), load_features(feats["classifier"])
    model = load_model(tiny_model_path)
    y, _ = _targets(f, "classifier")
    idx = torch.arange(len(y))
    images = _pixels(f.images, model.device)

    def loss(x):
        with torch.no_grad():
            return float(F.cross_entropy(head.net(taps_input(model, head.spec, x, idx, normalize=False,
                                                            precision="fp32")), y))

    clean = loss(images)
    losses = []
    for eps in (0.05, 0.3):
        adv = pgd(head.net, model, head.spec, images, y, idx, eps=eps, steps=3, normalize=False, precision="fp32")
        radius = eps * math.sqrt(images[0].numel())
        assert float((adv - images).flatten(1).norm(dim=1).max()) <= radius * (1 + 1e-5)
        assert float(adv.min()) >= -1 and float(adv.max()) <= 1
        losses.append(loss(adv))
    assert clean < losses[0] < losses[1]
