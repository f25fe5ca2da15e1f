"""The artifact contract, kind by kind: every typed kind saves and loads back unchanged, refuses another kind or
another schema in one line, names both files when it meets an artifact of another model, and a write stopped
half-way leaves nothing behind.

A kind joins the contract by appending a :class:`Case` to ``CASES`` (``test_every_typed_kind_has_a_case`` fails
until it does).
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny
from ddguide.core import artifacts
from ddguide.core.checkpoint import CheckpointMeta, RunState, restore_checkpoint, save_checkpoint
from ddguide.core.errors import UserError
from ddguide.core.model import load_model, save_model
from ddguide.method.features import load_features
from ddguide.method.heads import Head, check_compatible, load_head, save_head
from ddguide.metrics.fid import FidStats, check_comparable, load_stats, save_stats

FOREIGN = "0123456789abcdef"  # the fingerprint of a model that is not the one at hand
SPEC = {"blocks": ["mid"], "timesteps": [10], "noise": "none", "seed": 0}
Written = tuple[dict[str, torch.Tensor], Any]  # (tensors, typed config) as the writer was given them


@dataclass(frozen=True)
class Case:
    """One artifact kind: its stage's writer and reader, and the check that meets an artifact of another model.

    ``write(path)`` writes an artifact and returns what it wrote; ``read(path)`` returns (tensors, typed config
    or None) through the stage's own loader; ``foreign(path, folder)`` pairs the artifact at ``path`` with one
    of another model (or feature network) written in ``folder`` and must raise naming both files.
    """

    kind: str
    write: Callable[[Path], Written]
    read: Callable[[Path], tuple[dict[str, torch.Tensor], Any]]
    foreign: Callable[[Path, Path], None]


# ------------------------------------------------------------------------------------------------------ model


def write_model(path: Path) -> Written:
    model = build_tiny(seed=0)
    save_model(path, model)
    return dict(model.net.state_dict()), model.meta()


def read_model(path: Path):
    model = load_model(path)
    return dict(model.net.state_dict()), model.meta()


def foreign_model(path: Path, folder: Path) -> None:
    head = folder / "foreign-head.safetensors"
    write_head(head, fingerprint=FOREIGN)
    check_compatible(load_head(head), load_model(path).fingerprint, path)


# --------------------------------------------------------------------------------------------------- features


def write_features(path: Path, fingerprint: str = FOREIGN) -> Written:
    gen = torch.Generator().manual_seed(0)
    n, channels = 6, build_tiny().net.block_channels("mid")
    tensors = {"images": torch.randint(0, 256, (n, 16, 16, 3), generator=gen, dtype=torch.uint8),
               "feat.mid@10": torch.randn(n, channels, 8, 8, generator=gen),
               "labels": torch.tensor([0, 1] * (n // 2))}
    meta = artifacts.FeaturesMeta(spec=SPEC, image_size=16, model=fingerprint, count=n, images_hash="abc",
                                  label="has_red", classes=["0", "1"])
    layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    with artifacts.StreamingWriter(path, layout, config=meta, fingerprint=fingerprint) as writer:
        for name, value in tensors.items():
            for start in range(0, n, 4):  # in slices, as extract writes them
                writer.write(name, start, value[start:start + 4])
    return tensors, meta


def read_features(path: Path):
    feats = load_features(path)
    return {**feats.taps, "images": feats.images, "labels": feats.labels}, feats.meta


def foreign_features(path: Path, folder: Path) -> None:
    model = folder / "model.safetensors"
    save_model(model, build_tiny(seed=1))
    artifacts.check_fingerprint(load_features(path).fingerprint, load_model(model).fingerprint, consumer=path,
                                source=model)


# ------------------------------------------------------------------------------------------------------- head


def write_head(path: Path, fingerprint: str = FOREIGN) -> Written:
    meta = artifacts.HeadMeta(kind="classifier", classes=["0", "1"], spec=SPEC,
                              in_channels=build_tiny().net.block_channels("mid"), image_size=16, temperature=0.5,
                              label="has_red", metrics={"val_accuracy": 0.75})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = Head(meta, fingerprint)
    save_head(path, head)
    return dict(head.net.state_dict()), meta


def read_head(path: Path):
    head = load_head(path)
    return dict(head.net.state_dict()), head.cfg


def foreign_head(path: Path, folder: Path) -> None:
    model = folder / "model.safetensors"
    save_model(model, build_tiny(seed=1))
    check_compatible(load_head(path), load_model(model).fingerprint, model)


# -------------------------------------------------------------------------------------------------- fid-stats


def write_stats(path: Path, fingerprint: str = FOREIGN) -> Written:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4))
    stats = FidStats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), n=20, feature_space="denoiser-mid-t100",
                     fingerprint=fingerprint, features={"block": "mid", "timestep": 100}, source="images")
    save_stats(path, stats)
    meta = artifacts.FidStatsMeta(feature_space=stats.feature_space, dim=4, n=20, features=stats.features,
                                  source="images")
    return {"mu": torch.from_numpy(stats.mu), "sigma": torch.from_numpy(stats.sigma)}, meta


def read_stats(path: Path):
    stats = load_stats(path)
    return {"mu": torch.from_numpy(stats.mu), "sigma": torch.from_numpy(stats.sigma)}, None


def foreign_stats(path: Path, folder: Path) -> None:
    other = folder / "other-stats.safetensors"
    write_stats(other, fingerprint="fedcba9876543210")
    check_comparable(load_stats(path), load_stats(other))


# ------------------------------------------------------------------------------------------------- checkpoint

RUN = {"data": "images", "steps": 4}


def _training_state():
    net = build_tiny(seed=0).net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return net, opt, torch.Generator().manual_seed(0), RunState()


def write_checkpoint(path: Path) -> Written:
    net, opt, gen, state = _training_state()
    net(torch.zeros(1, 3, 16, 16), torch.zeros(1)).sum().backward()
    opt.step()
    state.step, state.losses = 1, [0.5]
    save_checkpoint(path, RUN, net, None, opt, gen, state)
    return dict(artifacts.load(path, "checkpoint").tensors), CheckpointMeta(identity=RUN, step=1)


def read_checkpoint(path: Path):
    net, opt, gen, state = _training_state()
    restore_checkpoint(path, RUN, net, None, opt, gen, state, torch.device("cpu"))  # the stage's own loader
    assert state.step == 1 and state.losses == [0.5]
    return dict(artifacts.load(path, "checkpoint").tensors), None


def foreign_checkpoint(path: Path, folder: Path) -> None:
    """A checkpoint of another run (other data): refused naming both runs' options."""
    net, opt, gen, state = _training_state()
    restore_checkpoint(path, {**RUN, "data": str(folder)}, net, None, opt, gen, state, torch.device("cpu"))


CASES = [
    Case("model", write_model, read_model, foreign_model),
    Case("features", write_features, read_features, foreign_features),
    Case("head", write_head, read_head, foreign_head),
    Case("fid-stats", write_stats, read_stats, foreign_stats),
    Case("checkpoint", write_checkpoint, read_checkpoint, foreign_checkpoint),
]
by_kind = pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])


def one_line_error(call: Callable[[], Any], *fragments: str) -> str:
    """``call()`` raises a one-line UserError holding every fragment; returns its message."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of ``src`` with some ``ddguide.*`` metadata replaced."""
    meta = artifacts.read_metadata(src)
    save_file(load_file(str(src)), str(dst), metadata={**meta, **{f"ddguide.{k}": v for k, v in changes.items()}})
    return dst


# ------------------------------------------------------------------------------------------------------ tests


def test_every_typed_kind_has_a_case():
    assert set(artifacts.META_TYPES) <= {c.kind for c in CASES}


@by_kind
def test_round_trip_keeps_tensors_and_metadata(case: Case, tmp_path: Path):
    path = tmp_path / f"{case.kind}.safetensors"
    tensors, meta = case.write(path)
    about = artifacts.describe(path, case.kind)
    assert about.kind == case.kind and about.schema == artifacts.SCHEMA
    assert about.typed() == meta and about.config == meta.to_metadata()
    assert type(meta).from_metadata(meta.to_metadata(), path) == meta
    loaded, loaded_meta = case.read(path)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert loaded_meta is None or loaded_meta == meta


@by_kind
def test_another_kind_is_refused_in_one_line(case: Case, tmp_path: Path):
    report = artifacts.save(tmp_path / "report.safetensors", {"x": torch.zeros(2)}, kind="report", config={},
                            fingerprint="")
    one_line_error(lambda: case.read(report), str(report), "'report' artifact", repr(case.kind))


@by_kind
def test_another_schema_is_refused_in_one_line(case: Case, tmp_path: Path):
    path = tmp_path / f"{case.kind}.safetensors"
    case.write(path)
    newer = with_metadata(path, tmp_path / "newer.safetensors", schema=str(artifacts.SCHEMA + 1))
    one_line_error(lambda: case.read(newer), str(newer), f"schema {artifacts.SCHEMA + 1} is not supported")


@by_kind
def test_a_config_of_the_wrong_shape_is_refused_in_one_line(case: Case, tmp_path: Path):
    path = tmp_path / f"{case.kind}.safetensors"
    case.write(path)
    broken = with_metadata(path, tmp_path / "broken.safetensors", config='{"wings": 2}')
    one_line_error(lambda: case.read(broken), str(broken))
    one_line_error(lambda: artifacts.describe(broken).typed(), str(broken))


@by_kind
def test_an_artifact_of_another_model_names_both_files(case: Case, tmp_path: Path):
    path = tmp_path / f"{case.kind}.safetensors"
    case.write(path)
    others = tmp_path / "others"
    others.mkdir()
    message = one_line_error(lambda: case.foreign(path, others), str(path))
    assert str(others) in message, message


def interrupt_mid_data(monkeypatch) -> None:
    """Stop every writer half-way through its data: a whole-file write after half its bytes, a streamed one
    after its first slice."""
    real_write_bytes, real_stream_write = pathlib.Path.write_bytes, artifacts.StreamingWriter.write
    calls = []

    def half_then_stop(self: Path, data: bytes) -> int:
        real_write_bytes(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    def slice_then_stop(self, name, start, values):
        calls.append(name)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real_stream_write(self, name, start, values)

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_stop)
    monkeypatch.setattr(artifacts.StreamingWriter, "write", slice_then_stop)


def interrupt_at_rename(monkeypatch) -> None:
    """Stop every writer with its temporary complete, just before it is renamed into place."""

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stop)


@by_kind
@pytest.mark.parametrize("interrupt", [interrupt_mid_data, interrupt_at_rename], ids=["mid-data", "at-rename"])
def test_an_interrupted_write_leaves_no_file_and_no_temporary(case: Case, interrupt, tmp_path: Path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(KeyboardInterrupt):
            case.write(folder / f"{case.kind}.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == []
