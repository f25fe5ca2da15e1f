"""The shared training engine: one Recipe in both stage configs, the public checkpoint functions, the CLI's
recipe options declared once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from ddguide.cli import models as cli
from ddguide.core import artifacts
from ddguide.core.checkpoint import CheckpointMeta, RunState, checkpoint_path, restore_checkpoint, save_checkpoint
from ddguide.core.errors import UserError
from ddguide.stages.finetune import FINETUNE_RECIPE, FinetuneConfig, finetune_recipe
from ddguide.stages.train import TRAIN_RECIPE, TrainConfig, train_recipe
from ddguide.stages.training import Recipe, ema_update, flat_config, run_identity

RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}


# --- configs that compose ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TrainConfig, FinetuneConfig])
def test_stage_configs_hold_a_recipe_and_repeat_none_of_its_fields(config):
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert fields["recipe"].type in (Recipe, "Recipe")
    assert not RECIPE_FIELDS & set(fields), RECIPE_FIELDS & set(fields)


def test_a_field_added_to_the_recipe_reaches_both_stages():
    @dataclasses.dataclass(kw_only=True)
    class Longer(Recipe):
        dropout: float = 0.25

    recipe = Longer(steps=3, lr=1e-3, warmup=0)
    configs = [TrainConfig(data="d", out="o", recipe=recipe), FinetuneConfig(data="d", out="o", recipe=recipe)]
    for cfg in configs:
        assert flat_config(cfg)["dropout"] == 0.25 and "recipe" not in flat_config(cfg)
        assert run_identity(cfg, ["dropout", "lr"]) == {"dropout": 0.25, "lr": 1e-3}


def test_each_stage_keeps_its_own_defaults():
    assert (TrainConfig("d", "o").recipe, FinetuneConfig("d", "o").recipe) == (TRAIN_RECIPE, FINETUNE_RECIPE)
    assert (TRAIN_RECIPE.steps, TRAIN_RECIPE.lr, TRAIN_RECIPE.warmup) == (20000, 2e-4, 200)
    assert (FINETUNE_RECIPE.steps, FINETUNE_RECIPE.lr, FINETUNE_RECIPE.warmup) == (2000, 1e-4, 0)
    assert train_recipe(steps=5).warmup == 200 and finetune_recipe(steps=5).lr == 1e-4
    assert TrainConfig("d", "o").recipe is not TrainConfig("d", "o").recipe  # no shared mutable default
    with pytest.raises(TypeError):
        Recipe(10, 1e-3, 0)  # by keyword only


def test_the_identities_are_those_older_checkpoints_hold():
    train = TrainConfig(data="d", out="o", preset="tiny")
    assert train.identity() == {"data": "d", "preset": "tiny", "batch": 64, "lr": 2e-4, "warmup": 200,
                                "ema_decay": 0.999, "grad_clip": 1.0, "schedule": None, "seed": 0}
    decayed = TrainConfig(data="d", out="o", init="m", recipe=train_recipe(lr_final=0.0, p2_gamma=1.0))
    assert {"init", "lr_final", "steps", "p2_gamma", "p2_k"} <= set(decayed.identity())
    fine = FinetuneConfig(data="d", out="o")
    assert fine.identity() == {"data": "d", "batch": 64, "lr": 1e-4, "label_dropout": 0.1, "ema_decay": 0.999,
                               "grad_clip": 1.0, "seed": 0, "resize": "refuse"}
    assert "warmup" in FinetuneConfig(data="d", out="o", recipe=finetune_recipe(warmup=10)).identity()


def test_recipe_validation_is_one_line():
    for bad, fragment in ((dict(steps=0), "--steps"), (dict(lr=0.0), "--lr"), (dict(p2_gamma=-1.0), "--p2-gamma")):
        with pytest.raises(UserError, match=fragment):
            train_recipe(**bad).validate()
    with pytest.raises(UserError, match="--label-dropout"):
        FinetuneConfig(data="d", out="o", label_dropout=1.0).validate()


# --- checkpoints -------------------------------------------------------------------------------------------------


def _trained(seed: int):
    """A small network, its EMA, Adam after two steps, an advanced generator and the run state."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for step in range(2):
        loss = net(torch.randn(5, 4, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, net, 0.9, step)
    return net, ema, opt, gen, RunState(step=2, losses=[0.5, 0.25])


def test_a_checkpoint_round_trips_through_the_public_functions(tmp_path):
    path = checkpoint_path(tmp_path / "m.safetensors")
    assert path.name == "m.ckpt.safetensors"
    net, ema, opt, gen, state = _trained(0)
    save_checkpoint(path, {"run": 1}, net, ema, opt, gen, state)
    art = artifacts.load(path, "checkpoint")
    assert art.config == {"identity": {"run": 1}, "step": 2}  # the on-disk format
    assert CheckpointMeta.from_metadata(art.config, path) == CheckpointMeta({"run": 1}, 2)

    net2, ema2, opt2, gen2, _ = _trained(1)
    state2 = RunState()
    assert restore_checkpoint(path, {"run": 1}, net2, ema2, opt2, gen2, state2, torch.device("cpu"))
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, ema2[k]) for k, v in ema.items())
    assert torch.equal(gen.get_state(), gen2.get_state()) and state2 == state
    for p, p2 in zip(net.parameters(), net2.parameters()):
        assert all(torch.equal(opt.state[p][s].reshape(-1), opt2.state[p2][s].reshape(-1)) for s in opt.state[p])
    with pytest.raises(UserError, match="different training run"):
        restore_checkpoint(path, {"run": 2}, net2, ema2, opt2, gen2, RunState(), torch.device("cpu"))


def test_a_run_without_ema_saves_and_restores_with_none(tmp_path):
    path = tmp_path / "c.ckpt.safetensors"
    net, ema, opt, gen, state = _trained(0)
    save_checkpoint(path, {"cas": 1}, net, None, opt, gen, state)
    assert not any(k.startswith("ema.") for k in artifacts.load(path, "checkpoint").tensors)
    net2, _, opt2, gen2, _ = _trained(1)
    assert restore_checkpoint(path, {"cas": 1}, net2, None, opt2, gen2, RunState(), torch.device("cpu"))
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(UserError, match="lacks ema"):  # a run with EMA cannot resume from it
        restore_checkpoint(path, {"cas": 1}, net2, ema, opt2, gen2, RunState(), torch.device("cpu"))


def test_a_checkpoint_without_its_step_is_one_line(tmp_path):
    for config in ({"identity": {}}, {"identity": {}, "step": -1}, {"identity": {}, "step": True}):
        with pytest.raises(UserError, match="without the step"):
            CheckpointMeta.from_metadata(config, tmp_path / "x")
    assert CheckpointMeta({"a": [1]}, 3).to_metadata() == {"identity": {"a": [1]}, "step": 3}


# --- the command line --------------------------------------------------------------------------------------------


def test_train_and_finetune_declare_the_recipe_options_once():
    train = inspect.signature(cli.train.__wrapped__, eval_str=True).parameters
    finetune = inspect.signature(cli.finetune.__wrapped__, eval_str=True).parameters
    shared = ["steps", "batch", "lr", "ema", "grad_clip", "precision", "checkpoint_every", "threads", "compile_",
              "device"]
    for name in shared:
        assert train[name].annotation is finetune[name].annotation, name
    assert train["steps"].default != finetune["steps"].default  # one declaration, each command's default
