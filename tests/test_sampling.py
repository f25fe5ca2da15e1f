"""Samplers checked against Gaussian data, whose optimal epsilon is known in closed form."""

import torch

from ddguide.core.diffusion import DiffusionConfig, alphas_cumprod, space_timesteps
from ddguide.core.sampling import image_generators, per_image_randn, sample_ddim, sample_ddpm

MU, STD = 0.3, 0.2
SHAPE = (3, 4, 4)


def gaussian_denoiser(abar):
    """E[eps | x_t] for x0 ~ N(MU, STD^2) per pixel: sqrt(1-a) (x_t - sqrt(a) MU) / (a STD^2 + 1 - a)."""
    def denoise(x, t):
        a = abar[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)
    return denoise


def _draw(sampler, n, steps="ddim50", seed=0, batch=None, **kw):
    abar = alphas_cumprod(DiffusionConfig(schedule="cosine"))
    kept = space_timesteps(1000, steps)
    batch = batch or n
    out = []
    for first in range(0, n, batch):
        gens = image_generators(seed, range(first, min(first + batch, n)))
        x = per_image_randn(SHAPE, gens, "cpu")
        out.append(sampler(gaussian_denoiser(abar), x, kept, abar, generators=gens, clip=False, **kw))
    return torch.cat(out)


def test_ddim_reproduces_mean_and_variance():
    x = _draw(sample_ddim, 2000, steps="ddim250")
    assert abs(x.mean().item() - MU) < 0.005
    assert abs(x.std().item() - STD) < 0.005
    # the ODE discretisation error shrinks with more steps
    coarse = _draw(sample_ddim, 2000, steps="ddim50")
    assert abs(coarse.std().item() - STD) > abs(x.std().item() - STD)


def test_ddpm_reproduces_mean_and_variance():
    x = _draw(sample_ddpm, 2000, steps="100")
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() - STD) < 0.015


def test_ddim_eta0_is_deterministic():
    assert torch.equal(_draw(sample_ddim, 8), _draw(sample_ddim, 8))


def test_image_k_does_not_depend_on_batch_size():
    for kw in ({"eta": 0.0}, {"eta": 1.0}):
        a = _draw(sample_ddim, 8, batch=1, **kw)
        b = _draw(sample_ddim, 8, batch=4, **kw)
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(_draw(sample_ddpm, 8, steps="20", batch=1), _draw(sample_ddpm, 8, steps="20", batch=4),
                          atol=1e-6)


def test_seeds_give_different_images():
    assert not torch.allclose(_draw(sample_ddim, 4, seed=0), _draw(sample_ddim, 4, seed=100))


def test_a_step_hook_can_move_chains_with_their_generators():
    """The hook a particle sampler uses: swapping two chains (state and noise generator) after the first step
    gives the same two images, swapped — so resampling between steps needs no second loop."""
    abar = alphas_cumprod(DiffusionConfig(schedule="cosine"))
    kept = space_timesteps(1000, "20")

    def run(hook=None):
        gens = image_generators(0, [0, 1])
        x = per_image_randn(SHAPE, gens, "cpu")
        return sample_ddpm(gaussian_denoiser(abar), x, kept, abar, generators=gens, clip=False, after_step=hook)

    def swap(i, t, t_prev, chain):
        if i == 0:
            chain.x, chain.generators = chain.x.flip(0), chain.generators[::-1]

    plain, swapped = run(), run(swap)
    assert torch.allclose(swapped, plain.flip(0), atol=1e-6) and not torch.allclose(plain[0], plain[1])


def test_segments_of_a_schedule_continue_one_chain():
    """--search prune runs a schedule in segments and drops chains between them: steps 0..6 then 7..19 of DDPM
    equal the 20 steps run at once, and a chain dropped after the first segment leaves the others unchanged."""
    from ddguide.core.sampling import DDPM, Segment, run_chain

    abar = alphas_cumprod(DiffusionConfig(schedule="cosine"))
    kept = space_timesteps(1000, "20")
    den = gaussian_denoiser(abar)

    def start(indices):
        gens = image_generators(0, indices)
        return per_image_randn(SHAPE, gens, "cpu"), gens

    x, gens = start([0, 1, 2])
    whole = run_chain(den, x, DDPM(abar, kept), abar, generators=gens, clip=False)
    x, gens = start([0, 1, 2])
    half = run_chain(den, x, Segment(DDPM(abar, kept), 0, 7), abar, generators=gens, clip=False)
    rest = run_chain(den, half[[0, 2]], Segment(DDPM(abar, kept), 7, 20), abar, generators=[gens[0], gens[2]],
                     clip=False)
    assert len(Segment(DDPM(abar, kept), 7, 20).steps) == 13
    assert torch.allclose(rest, whole[[0, 2]], atol=1e-6)


def test_a_denoiser_may_return_a_prediction_or_the_raw_output():
    from ddguide.core.sampling import Prediction

    abar = alphas_cumprod(DiffusionConfig(schedule="cosine"))
    kept = space_timesteps(1000, "ddim10")
    raw = gaussian_denoiser(abar)
    x = per_image_randn(SHAPE, image_generators(0, [0, 1]), "cpu")
    a = sample_ddim(raw, x, kept, abar, clip=False)
    b = sample_ddim(lambda x_, t_: Prediction(raw(x_, t_)), x, kept, abar, clip=False)
    assert torch.equal(a, b)
