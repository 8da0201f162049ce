"""Best of K (`sfumato.pipelines.ranking`, `StableDiffusion.generate(candidates=K)`).

The error estimate is checked against its closed form for Gaussian data, where the exact denoiser is known
and the error is a monotone function of the data's log density. The pipeline's pick is checked against
errors computed here by hand from the U-Net's raw eps output, with ᾱ from SD's betas computed here too.
"""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_bundle

import sfumato
from sfumato.pipelines.metadata import parse_parameters
from sfumato.pipelines.ranking import (
    RANK_DRAWS,
    RANK_LEVELS,
    candidate_seeds,
    denoising_error,
    pick_best,
    ranking_seed,
)
from sfumato.pipelines.stable_diffusion import StableDiffusion

CAT = "a photo of a cat"
FAST = {"steps": 4, "sampler": "euler", "karras": False, "guidance": 2.0}


def test_candidate_seeds():
    assert candidate_seeds(7, 1) == [7]
    seeds = candidate_seeds(7, 8)
    assert seeds[0] == 7 and len(set(seeds)) == 8
    # none is the seed of a later image of a batch (seed + i), nor the seed of the ranking noise
    assert not set(seeds[1:]) & set(range(7, 7 + 10_000))
    assert ranking_seed(7) not in candidate_seeds(7, 1000)
    assert all(0 <= s < 2**63 for s in [*seeds, ranking_seed(7), ranking_seed(0)])
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        candidate_seeds(7, 0)


def test_error_matches_the_gaussian_closed_form():
    """Data x ~ N(0, s² I): the exact denoiser is D(y, σ) = s² / (s² + σ²) y, and for a clean x the expected
    squared error per element is (σ² / (s² + σ²))² x² + (s² / (s² + σ²))² σ²: a monotone function of |x|,
    so the least error is the most likely sample."""
    s2 = 0.7**2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen) * torch.tensor([0.2, 0.5, 1.0, 1.5, 3.0])[:, None]
    sigmas = [0.3, 1.0, 2.5]
    draws = 2000
    noise = torch.randn(len(sigmas), draws, *x.shape, generator=gen)
    err = denoising_error(lambda y, sigma: s2 / (s2 + sigma**2) * y, x, sigmas, noise, {})
    msq = x.pow(2).mean(1)
    expected = sum((sg**2 / (s2 + sg**2)) ** 2 * msq + (s2 / (s2 + sg**2)) ** 2 * sg**2 for sg in sigmas) / 3
    # the noise term's Monte Carlo error: per element variance 2 c⁴ σ⁴ at most, over 64 * 2000 draws per level
    tol = 4 * max((s2 / (s2 + sg**2)) ** 2 * sg**2 for sg in sigmas) * math.sqrt(2 / (64 * draws))
    assert torch.allclose(err, expected.float(), atol=tol), (err, expected)
    assert err.argsort().tolist() == msq.argsort().tolist()  # least error = highest Gaussian density
    assert pick_best(err, 5).tolist() == [int(msq.argmin())]


def test_pick_best_and_bad_noise():
    errors = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0, 5.0])
    assert pick_best(errors, 3).tolist() == [1, 3]
    assert pick_best(errors, 1).tolist() == list(range(6))
    with pytest.raises(ValueError, match="whole number of groups"):
        pick_best(errors, 4)
    with pytest.raises(ValueError, match="noise must have shape"):
        denoising_error(lambda y, sigma: y, torch.zeros(2, 3), [1.0], torch.zeros(2, 1, 2, 3), {})


@pytest.fixture(scope="module")
def pipe(tiny_bundle_path):
    return sfumato.load(tiny_bundle_path)


def hand_errors(pipe, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """The ranking error of each row of `latents` (candidates of the image with this seed), from the U-Net's
    eps output at integer timesteps: x_t = √ᾱ z + √(1-ᾱ) ε, x̂0 = (x_t - √(1-ᾱ) ε̂) / √ᾱ."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    L, M = len(RANK_LEVELS), RANK_DRAWS
    eps_all = torch.randn((L * M, *latents.shape[1:]), generator=torch.Generator().manual_seed(ranking_seed(seed)))
    context = pipe.encode_prompts([CAT]).expand(latents.shape[0], -1, -1)
    total = torch.zeros(latents.shape[0], dtype=torch.float64)
    for li, f in enumerate(RANK_LEVELS):
        t = round(f * 1000)
        a, s = alphas_cumprod[t].sqrt().item(), (1 - alphas_cumprod[t]).sqrt().item()
        for m in range(M):
            eps = eps_all[li * M + m].expand_as(latents)
            x_t = a * latents + s * eps
            eps_hat = pipe.unet(x_t, torch.full((latents.shape[0],), float(t)), context)
            x0 = (x_t - s * eps_hat) / a
            total += (x0 - latents).pow(2).flatten(1).mean(1).double()
    return total / (L * M)


def test_best_of_k_keeps_the_candidate_its_denoiser_explains_best(pipe):
    k, seed = 4, 11
    best = pipe.generate(CAT, seed=seed, candidates=k, output="latent", **FAST)
    cands = pipe.generate(CAT, seed=candidate_seeds(seed, k), batch=k, candidates=1, output="latent", **FAST)
    with torch.no_grad():
        errs = hand_errors(pipe, cands, seed)
    order = errs.argsort()
    assert errs[order[1]] - errs[order[0]] > 1e-4 * errs[order[0]], errs  # a clear winner, else the test is moot
    assert torch.allclose(best[0], cands[order[0]], atol=1e-4)
    # a batch: each image ranks its own candidates; image 1 is the image of seed 12 drawn alone
    pair = pipe.generate(CAT, seed=seed, batch=2, candidates=k, output="latent", **FAST)
    assert torch.allclose(pair[0], best[0], atol=1e-4)
    alone = pipe.generate(CAT, seed=seed + 1, candidates=k, output="latent", **FAST)
    assert torch.allclose(pair[1], alone[0], atol=1e-4)


def test_candidates_default_metadata_and_errors(tiny_bundle_path, pipe):
    from dataclasses import replace

    plain = pipe.generate(CAT, seed=3, **FAST)[0]
    assert pipe.default_candidates == 1 and "Candidates" not in plain.info["parameters"]
    own = sfumato.load(tiny_bundle_path)
    own.schedule = replace(own.schedule, candidates=3)
    assert own.default_candidates == 3
    im = own.generate(CAT, seed=3, **FAST)[0]
    assert parse_parameters(im.info["parameters"])["extra"] == {"Candidates": "3"}
    again = pipe.generate(CAT, seed=3, candidates=3, **FAST)[0]
    assert np.array_equal(np.asarray(im), np.asarray(again))  # the model's default is the explicit value
    one = own.generate(CAT, seed=3, candidates=1, **FAST)[0]
    assert np.array_equal(np.asarray(one), np.asarray(plain))  # an explicit 1 turns ranking off
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="candidates must be an int >= 1"):
            pipe.generate(CAT, candidates=bad, **FAST)
    with pytest.raises(ValueError, match="latents fix each image's starting noise"):
        pipe.generate(CAT, candidates=2, latents=torch.zeros(1, 4, 16, 16), **FAST)
    # given latents (sfumato invert's noise) override the model's default best of K: one draw, no error
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    fixed = own.generate(CAT, latents=noise, output="latent", **FAST)
    assert torch.equal(fixed, pipe.generate(CAT, latents=noise, output="latent", **FAST))
    with pytest.raises(ValueError, match="candidates must be None or an int >= 1"):
        replace(own.schedule, candidates=0)


def test_best_of_k_with_v_prediction_and_a_saved_default(tmp_path):
    """A bundle's schedule.json carries the default; a v-prediction model ranks through the same denoiser."""
    from dataclasses import replace

    from sfumato.checkpoints.bundle import save_bundle

    bundle = tiny_bundle(prediction="v")
    bundle.schedule = replace(bundle.schedule, candidates=2)
    save_bundle(bundle, tmp_path / "m")
    sd = StableDiffusion.from_pretrained(tmp_path / "m")
    assert sd.default_candidates == 2
    latents = sd.generate(CAT, seed=5, output="latent", **FAST)
    cands = sd.generate(CAT, seed=candidate_seeds(5, 2), batch=2, candidates=1, output="latent", **FAST)
    assert any(torch.allclose(latents[0], c, atol=1e-4) for c in cands)


def test_the_callback_is_told_how_many_draws_each_image_has(pipe):
    seen = []
    pipe.generate(CAT, seed=2, batch=2, candidates=3,
                  callback=lambda info: seen.append((info.get("candidates"), info["denoised"].shape[0])), **FAST)  # fmt: skip
    assert seen == [(3, 6)] * FAST["steps"]
    seen.clear()
    pipe.generate(CAT, seed=2, batch=2, callback=lambda info: seen.append((info.get("candidates"), info["denoised"].shape[0])),
                  **FAST)  # fmt: skip
    assert seen == [(None, 2)] * FAST["steps"]
