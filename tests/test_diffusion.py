import math

import numpy as np
import pytest
import torch

from ddguide.core.diffusion import (
    DiffusionConfig,
    alphas_cumprod,
    betas,
    eps_to_x0,
    q_sample,
    respace_betas,
    space_timesteps,
    split_output,
    x0_to_eps,
)
from ddguide.core.errors import UserError


def test_ddim_spacing_matches_guided_diffusion():
    kept = space_timesteps(1000, "ddim50")
    assert kept == list(range(0, 1000, 20))
    assert kept[:3] == [0, 20, 40] and kept[-1] == 980


def test_fractional_spacing_keeps_both_ends():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "10,15,20")[:2] == [0, 37]  # guided-diffusion's docstring example
    assert len(space_timesteps(1000, "10,15,20")) == 45


def test_fractional_spacing_on_4000_steps():
    kept = space_timesteps(4000, "50")
    assert len(kept) == 50 and kept[-1] == 3999


@pytest.mark.parametrize("bad", ["ddim999", "2000", "x"])
def test_bad_spacing_is_a_user_error(bad):
    with pytest.raises(UserError):
        space_timesteps(1000, bad)


def test_linear_schedule_endpoints_in_float64():
    b = betas("linear", 1000)
    assert b.dtype == np.float64 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(2e-2)


def test_cosine_schedule_follows_the_closed_form():
    abar = alphas_cumprod(DiffusionConfig(steps=1000, schedule="cosine")).numpy()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert abar[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert betas("cosine", 1000).max() <= 0.999


def test_respaced_betas_reproduce_the_kept_cumulative_products():
    abar = alphas_cumprod(DiffusionConfig())
    kept = space_timesteps(1000, "ddim10")
    b = respace_betas(abar, kept)
    assert torch.allclose(torch.cumprod(1 - b, 0), abar[kept], rtol=1e-12)


def test_q_sample_and_conversions_are_inverse():
    abar = alphas_cumprod(DiffusionConfig())
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = q_sample(x0, t, eps, abar)
    assert torch.allclose(eps_to_x0(xt, t, eps, abar), x0, atol=1e-3)
    assert torch.allclose(x0_to_eps(xt, t, x0, abar), eps, atol=1e-3)


def test_learned_sigma_output_splits_eps_first():
    out = torch.arange(6.0).view(1, 6, 1, 1)
    eps, var = split_output(out)
    assert eps.flatten().tolist() == [0, 1, 2] and var.flatten().tolist() == [3, 4, 5]
    assert split_output(out[:, :3])[1] is None


def test_model_time_rescaling():
    t = torch.tensor([0, 2000, 3999])
    assert DiffusionConfig(4000, "cosine", True).model_time(t).tolist() == [0.0, 500.0, 999.75]
    assert DiffusionConfig(1000, "linear").model_time(t).tolist() == [0, 2000, 3999]


def test_unknown_schedule_is_refused():
    with pytest.raises(UserError, match="linear, cosine"):
        DiffusionConfig(schedule="sigmoid")
