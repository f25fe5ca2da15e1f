"""train-head seeds its own initialisation: the caller's random state is left as it was."""

from __future__ import annotations

import torch

from conftest import shapes_data
from ddguide.method.heads import load_head
from ddguide.stages.extract import ExtractConfig, extract
from ddguide.stages.train_head import TrainHeadConfig, train_head


def test_train_head_leaves_the_global_generator_alone(tiny_model_path, tmp_path):
    data = shapes_data(tmp_path)
    feats = extract(ExtractConfig(data=str(data / "images"), out=str(tmp_path / "f.safetensors"),
                                  model=str(tiny_model_path), blocks=("mid",), timesteps=(10,),
                                  labels=str(data / "attributes.csv"), label="has_red", device="cpu"))
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        head = train_head(TrainHeadConfig(features=str(feats), out=str(tmp_path / f"h{global_seed}.safetensors"),
                                          steps=2))
        assert torch.equal(torch.get_rng_state(), before)
        weights.append(load_head(head).net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the head's seed alone decides
