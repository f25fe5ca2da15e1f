"""Particle (Feynman-Kac steering) and search (best-of-N, zero-order) samplers with heads as potentials."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny, cli, expect_ok, expect_user_error, shapes_data
from ddguide.core.sampling import Chain
from ddguide.method.particles import (Steering, SteeringConfig, effective_sample_size, particle_seed,
                                      sphere_neighbours, systematic_resample)


@pytest.fixture(scope="module")
def head(tmp_path_factory, tiny_model_path) -> Path:
    root = tmp_path_factory.mktemp("particles")
    data = shapes_data(root / "data")
    expect_ok(cli("extract", data / "images", "--model", tiny_model_path, "--blocks", "mid", "--timesteps", 300,
                  "--labels", data / "attributes.csv", "--label", "has_circle", "--device", "cpu",
                  "--out", root / "f.safetensors"))
    expect_ok(cli("train-head", root / "f.safetensors", "--steps", 20, "--out", root / "h.safetensors"))
    return root / "h.safetensors"


def run(tiny_model_path, out: Path, *options) -> list[dict[str, str]]:
    expect_ok(cli("sample", "--model", tiny_model_path, "-n", 3, "--steps", 6, "--device", "cpu",
                  "--precision", "fp32", "--out", out, *options))
    return list(csv.DictReader(open(out / "index.csv")))


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


# ------------------------------------------------------------------------------------------- Feynman-Kac


def test_one_particle_is_the_plain_sampler(tiny_model_path, head, tmp_path):
    run(tiny_model_path, tmp_path / "plain", "--eta", 1.0)
    rows = run(tiny_model_path, tmp_path / "fk", "--eta", 1.0, "--smc", "fk", "--particles", 1, "--guide", head,
               "--lambda", 0)
    assert np.array_equal(pixels(tmp_path / "fk"), pixels(tmp_path / "plain"))
    assert [r["chosen"] for r in rows] == ["0"] * 3 and [r["resampled"] for r in rows] == ["0"] * 3


def test_image_k_does_not_depend_on_the_batch(tiny_model_path, head, tmp_path):
    common = ("--guide", head, "--lambda", 0, "--particles", 3, "--resample-every", 1, "--potential-scale", 1000)
    a = run(tiny_model_path, tmp_path / "a", *common, "--batch", 1)
    b = run(tiny_model_path, tmp_path / "b", *common, "--batch", 3)
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b")) and a == b
    assert sum(int(r["resampled"]) for r in a) > 0  # a strong potential makes the particles resample
    assert all(1 <= float(r["ess_min"]) <= float(r["ess_mean"]) <= 3 for r in a)


def test_particles_are_scored_and_the_best_is_kept():
    """Steering on a toy reward (the chain's mean value): resampling moves chains towards high reward and the
    kept particle has the highest final reward."""
    k, steps = 4, 3
    cfg = SteeringConfig(particles=k, potential="max", scale=20.0, every=1, adaptive=False)
    steer = Steering(cfg, lambda x0, idx: x0.flatten(1).mean(1), [0] * k, [torch.Generator().manual_seed(0)], steps)
    x = torch.arange(k, dtype=torch.float32).view(k, 1, 1, 1).repeat(1, 1, 2, 2)  # chain j has value j
    chain = Chain(x.clone(), x.clone(), None)
    steer(0, 900, 600, chain)
    assert int(steer.resamples[0]) == 1 and chain.x.flatten(1).mean(1).min() >= 2  # the low chains were dropped
    steer(2, 300, -1, Chain(torch.tensor([0.1, 0.9, 0.3, 0.5]).view(k, 1, 1, 1), None, None))  # the last step
    assert int(steer.chosen()[0]) == 1


def test_potentials_telescope_to_the_final_statistic(monkeypatch):
    """Without resampling, the accumulated log-weight is scale x (max | sum | latest) of the rewards seen."""
    import ddguide.method.particles as particles

    monkeypatch.setattr(particles, "effective_sample_size", lambda logw: torch.full(logw.shape[:-1], 9.0))
    rewards = [[-1.0, -3.0], [-2.0, -0.5], [-4.0, -1.0]]
    expected = {"max": [-1.0, -0.5], "sum": [-7.0, -4.5], "diff": [-4.0, -1.0]}
    for potential, want in expected.items():
        seq = iter(torch.tensor(r) for r in rewards)
        cfg = SteeringConfig(particles=2, potential=potential, scale=2.0, every=1)
        steer = Steering(cfg, lambda x0, idx: next(seq), [0, 0], [torch.Generator()], 4)
        for i, t in enumerate((900, 600, 300)):
            steer(i, t, t - 300, Chain(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), None))
        assert int(steer.resamples[0]) == 0
        assert torch.allclose(steer.logw[0], 2.0 * torch.tensor(want, dtype=torch.float64)), potential


def test_resampling_helpers():
    logw = torch.tensor([0.0, -math.inf, -math.inf, 0.0])
    assert float(effective_sample_size(logw)) == pytest.approx(2.0)
    parents = systematic_resample(logw, torch.Generator().manual_seed(1))
    assert set(parents.tolist()) <= {0, 3} and len(parents) == 4
    assert particle_seed(5, 3, 0) == 8 and len({particle_seed(5, 3, j) for j in range(100)}) == 100
    z = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    moved = sphere_neighbours(z, 0.5, [torch.Generator().manual_seed(i) for i in range(3)])
    assert moved.shape == (3, 3, 4, 4) and torch.allclose(moved.flatten(1).norm(dim=1), z.norm().expand(3))


# ------------------------------------------------------------------------------------------- search


def test_best_of_one_is_the_plain_sampler_and_best_of_n_keeps_the_best(tiny_model_path, head, tmp_path,
                                                                        monkeypatch):
    run(tiny_model_path, tmp_path / "plain", "--sampler", "ddim")  # deterministic: the same noise, the same image
    one = run(tiny_model_path, tmp_path / "one", "--verifier", head, "--search", "best-of-n", "--candidates", 1,
              "--sampler", "ddim")
    assert np.array_equal(pixels(tmp_path / "one"), pixels(tmp_path / "plain")) and one[0]["chosen"] == "0:0"
    from ddguide.stages.sample import Sampling

    monkeypatch.setattr(Sampling, "reward", lambda self, x0, idx: x0.flatten(1).mean(1))  # brightest wins
    rows = run(tiny_model_path, tmp_path / "best", "--verifier", head, "--search", "best-of-n", "--candidates", 4,
               "--sampler", "ddim")
    bright = pixels(tmp_path / "best").reshape(3, -1).mean(1)
    assert np.all(bright >= pixels(tmp_path / "plain").reshape(3, -1).mean(1) - 0.5)
    assert [r["candidates"] for r in rows] == ["4"] * 3


def test_zero_order_search_is_deterministic_per_image(tiny_model_path, head, tmp_path):
    common = ("--verifier", head, "--search", "zero-order", "--candidates", 2, "--rounds", 2)
    a = run(tiny_model_path, tmp_path / "a", *common, "--batch", 1)
    b = run(tiny_model_path, tmp_path / "b", *common, "--batch", 3)
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b")) and a == b
    assert [r["candidates"] for r in a] == ["6"] * 3 and all(r["chosen"][0] in "012" for r in a)


def test_prune_search_keeps_the_best_early_candidate_and_finishes_it(tiny_model_path, head, tmp_path, monkeypatch):
    """--search prune: N candidates run to the pruning step; the verifier's best one on x0_hat there is finished
    exactly as best-of-n would have finished that candidate (DDIM is deterministic given the noise)."""
    from ddguide.stages.sample import Sampling

    calls: list[int] = []

    def brightness(self, x0, idx):  # the brightest x0_hat wins, and we see how many chains each score saw
        calls.append(len(x0))
        return x0.flatten(1).mean(1)

    monkeypatch.setattr(Sampling, "reward", brightness)
    rows = run(tiny_model_path, tmp_path / "pruned", "--verifier", head, "--search", "prune", "--candidates", 4,
               "--prune-at", "600:2", "--sampler", "ddim", "--batch", 3)
    assert calls == [12, 6]  # 3 images x 4 candidates scored at the pruning step, then 3 x 2 final images
    calls.clear()
    rows_default = run(tiny_model_path, tmp_path / "default", "--verifier", head, "--search", "prune",
                       "--candidates", 4, "--sampler", "ddim", "--batch", 3)
    assert calls == [12, 6, 3]  # by default 3/8 go on (2 of 4) after 28 % of the 6 steps, one after 64 %
    assert [r["candidates"] for r in rows] == ["4"] * 3 and all(r["chosen"] in "0123" for r in rows)
    # the kept image is the chosen candidate's own trajectory: best-of-n made to keep that candidate gives it
    chosen = torch.tensor([int(r["chosen"]) for r in rows_default])

    def that_candidate(self, x0, idx):
        position = torch.arange(len(x0))
        return (position % 4 == chosen.repeat_interleave(4)).double()

    monkeypatch.setattr(Sampling, "reward", that_candidate)
    run(tiny_model_path, tmp_path / "same", "--verifier", head, "--search", "best-of-n", "--candidates", 4,
        "--sampler", "ddim", "--batch", 3)
    assert np.abs(pixels(tmp_path / "same").astype(int) - pixels(tmp_path / "default").astype(int)).max() <= 1


def test_prune_search_is_deterministic_per_image_and_one_candidate_is_the_plain_sampler(tiny_model_path, head,
                                                                                        tmp_path):
    common = ("--verifier", head, "--search", "prune", "--candidates", 3, "--prune-at", "800:2", "--prune-at", "400:1")
    a = run(tiny_model_path, tmp_path / "a", *common, "--batch", 1)
    b = run(tiny_model_path, tmp_path / "b", *common, "--batch", 3)
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b")) and a == b
    run(tiny_model_path, tmp_path / "plain", "--sampler", "ddim")
    one = run(tiny_model_path, tmp_path / "one", "--verifier", head, "--search", "prune", "--candidates", 1,
              "--sampler", "ddim")
    assert np.array_equal(pixels(tmp_path / "one"), pixels(tmp_path / "plain")) and one[0]["chosen"] == "0"


def test_prune_search_with_the_eq13_step_is_guided_and_deterministic_per_image(tiny_model_path, head, tmp_path):
    """--search prune --lambda > 0: the candidates follow Eq. 13 (the images differ from the unguided search's),
    and image k is the same whatever the batch."""
    common = ("--guide", head, "--search", "prune", "--candidates", 3, "--guide-grad", "x0", "--sampler", "ddim")
    a = run(tiny_model_path, tmp_path / "a", *common, "--lambda", 3, "--batch", 1)
    b = run(tiny_model_path, tmp_path / "b", *common, "--lambda", 3, "--batch", 3)
    plain = run(tiny_model_path, tmp_path / "plain", *common, "--lambda", 0)
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b")) and a == b
    assert not np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "plain"))
    assert all(r["guidance"] == "heads:lambda=3.0:x0" for r in a) and plain[0]["guidance"] == "heads:lambda=0.0:x0"


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, fragment", [
    (("--particles", 0), "--particles"),
    (("--particles", 2), "a head to score with"),
    (("--smc", "twist", "--guide", "{head}"), "--smc"),
    (("--smc", "tds", "--particles", 2), "--guide HEAD"),
    (("--smc", "tds", "--guide", "{head}", "--sampler", "ddim", "--eta", 0), "stochastic sampler"),
    (("--smc", "tds", "--guide", "{head}", "--verifier", "{head}"), "--verifier"),
    (("--smc", "tds", "--guide", "{head}", "--guide-every", 2), "do not apply"),
    (("--search", "beam", "--guide", "{head}"), "--search"),
    (("--search", "best-of-n", "--candidates", 0, "--guide", "{head}"), "--candidates"),
    (("--search", "best-of-n", "--particles", 2, "--guide", "{head}"), "choose one"),
    (("--search", "prune", "--prune-at", "700:0", "--guide", "{head}"), "--prune-at"),
    (("--search", "prune", "--prune-at", "seven", "--guide", "{head}"), "T:K"),
    (("--search", "prune", "--candidates", 4, "--prune-at", "700:4", "--guide", "{head}"), "fewer"),
    (("--search", "prune", "--candidates", 4, "--prune-at", "0:1", "--guide", "{head}"), "no step left"),
    (("--search", "prune", "--candidates", 4, "--prune-at", "500:2", "700:1", "--guide", "{head}"), "high t"),
    (("--search", "best-of-n", "--prune-at", "700:1", "--guide", "{head}"), "--search prune"),
    (("--verifier", "{head}"), "--verifier scores"),
    (("--particles", 2, "--guide", "{head}", "--resample-window", 5, 2), "--resample-window"),
    (("--guide", "{head}", "--guide-every", 0), "--guide-every"),
])
def test_bad_particle_options_are_one_line(tiny_model_path, head, tmp_path, options, fragment):
    options = [str(o).replace("{head}", str(head)) for o in options]
    r = cli("sample", "--model", tiny_model_path, "-n", 1, "--steps", 3, "--device", "cpu", "--out", tmp_path / "s",
            *options)
    expect_user_error(r, fragment)
    assert not (tmp_path / "s").exists()


def test_a_verifier_of_another_model_is_refused(head, tmp_path):
    from ddguide.core.model import save_model

    other = tmp_path / "other.safetensors"
    save_model(other, build_tiny(seed=5))
    r = cli("sample", "--model", other, "--verifier", head, "--search", "best-of-n", "-n", 1, "--steps", 2,
            "--device", "cpu", "--out", tmp_path / "s")
    expect_user_error(r, str(head))


def test_nan_potentials_stop_with_one_line_and_write_nothing(tiny_model_path, head, tmp_path, monkeypatch):
    from ddguide.stages.sample import Sampling

    monkeypatch.setattr(Sampling, "reward", lambda self, x0, idx: torch.full((len(x0),), float("nan")))
    for options in (("--particles", 2, "--guide", head), ("--search", "best-of-n", "--verifier", head),
                    ("--search", "prune", "--verifier", head)):
        r = cli("sample", "--model", tiny_model_path, "-n", 2, "--steps", 3, "--device", "cpu",
                "--out", tmp_path / "s", *options)
        expect_user_error(r, "NaN")
        assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------- twisted diffusion


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
def test_tds_weights_give_the_exact_conditional_of_a_gaussian(lam):
    """Data N(0, s^2) (its exact denoiser is known), a logistic 'head' p(y | x0) = sigmoid(beta x0): TDS's weighted
    particles estimate E[x0 | y], which quadrature gives, whatever the proposal's step lambda (the weights are
    exact for any); with lambda 0 the proposal is the unconditional model and the weights do all the work."""
    from ddguide.core.diffusion import DiffusionConfig, alphas_cumprod
    from ddguide.core.sampling import DDPM, Prediction, run_chain
    from ddguide.method.particles import Twisting

    s2, beta, n, k = 0.25, 4.0, 4, 500
    abar = alphas_cumprod(DiffusionConfig(1000, "linear"))
    kept = list(range(0, 1000, 20))

    def eps_of(x, t):
        a = abar[t].float().view(-1, 1, 1, 1)
        x0 = a.sqrt() * s2 * x / (a * s2 + 1 - a)  # E[x0 | x_t] for x0 ~ N(0, s^2)
        return (x - a.sqrt() * x0) / (1 - a).sqrt(), x0

    def twist(x, t):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps, x0 = eps_of(x_in, t)
            logp = torch.nn.functional.logsigmoid(beta * x0).flatten(1).sum(1)
            (g,) = torch.autograd.grad(logp.sum(), x_in)
        return Prediction(eps.detach()), logp.detach(), g

    final = lambda x0: torch.nn.functional.logsigmoid(beta * x0).flatten(1).sum(1)  # noqa: E731
    chains = [i for i in range(n) for _ in range(k)]
    gens = [torch.Generator().manual_seed(1000 + j) for j in range(n * k)]
    tds = Twisting(SteeringConfig(k), lam, twist, final, chains, [torch.Generator().manual_seed(i) for i in range(n)])
    x = torch.stack([torch.randn((1, 1, 1), generator=g) for g in gens])
    x = run_chain(tds.denoiser, x, tds.wrap(DDPM(abar, kept)), abar, generators=gens, clip=False)
    w = torch.softmax(tds.logw, dim=1)  # (n, k)
    weighted = float((w * x.view(n, k).double()).sum(1).mean())
    grid = torch.linspace(-4, 4, 20001, dtype=torch.float64)
    density = torch.exp(-grid**2 / (2 * s2)) * torch.sigmoid(beta * grid)
    exact = float((grid * density).sum() / density.sum())  # E[x0 | y], about 0.37
    unweighted = float(x.mean())
    assert abs(weighted - exact) < 0.03, (weighted, exact)
    if lam == 0:  # the particles are the unconditional model's: the weights alone move the estimate
        assert abs(unweighted) < 0.1
    assert 0 <= int(tds.chosen().min()) and int(tds.chosen().max()) < k


def test_tds_samples_do_not_depend_on_the_batch_and_report_their_particles(tiny_model_path, head, tmp_path):
    common = ("--smc", "tds", "--particles", 3, "--guide", head, "--sampler", "ddpm", "--guide-grad", "x0")
    a = run(tiny_model_path, tmp_path / "a", *common, "--batch", 1)
    b = run(tiny_model_path, tmp_path / "b", *common, "--batch", 3)
    assert np.array_equal(pixels(tmp_path / "a"), pixels(tmp_path / "b")) and a == b
    assert all(r["particles"] == "3" and 1 <= float(r["ess_min"]) <= 3 and r["chosen"] in "012" for r in a)
    assert all(r["guidance"] == "tds:lambda=1.0:x0" for r in a)
    full = run(tiny_model_path, tmp_path / "full", "--smc", "tds", "--particles", 2, "--guide", head)  # ddim, eta 1
    assert len(full) == 3 and np.isfinite(pixels(tmp_path / "full")).all()
