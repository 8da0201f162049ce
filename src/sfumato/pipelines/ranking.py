"""Best of K: rank a model's own samples by how well its conditional denoiser explains them.

A diffusion model's variational bound on -log p(x | c) is a weighted sum over noise levels of the denoising
error E_ε ||D(x + σ ε, σ; c) - x||² (Ho et al. 2020, §3.2; Kingma et al. 2021 write it as an integral over
σ). `denoising_error` estimates a few of those terms by Monte Carlo, so among candidates drawn for one prompt,
the one with the least error is the one the conditional model finds most likely: a reranker that needs no
second model, where DALL·E reranked with CLIP. Li et al. 2023 ("Your diffusion model is secretly a zero-shot
classifier") compare the same errors across prompts; here they are compared across images for one prompt.

Every candidate of one image is scored with the same noise draws (common random numbers), so their
difference is not swamped by the noise of the estimate. The levels are fractions of the training timesteps,
the middle of the schedule. They and the shipped model's K = 4 were chosen on seeds other than its eval's
(`benchmarks/counts/denoiser_rerank.py`: any level from 0.2 T to 0.6 T alone picked about as well; docs/
shapes-model.md, "Best of K"). Likelihood favours simple images: the picks draw too many objects less often
and too few more often.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RANK_LEVELS = (0.3, 0.4, 0.5)  # timesteps of the error terms, as fractions of the training timesteps T
RANK_DRAWS = 4  # noise draws per level
_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads candidate c of a seed far from seed + 1, ...


def candidate_seeds(seed: int, k: int) -> list[int]:
    """The seeds of an image's k candidates: its own seed first (so k = 1 is plain generation), then k - 1
    seeds derived from it, none of them seed + 1, seed + 2, ... (the seeds of the next images of a batch)."""
    if k < 1:
        raise ValueError(f"candidates must be >= 1 images drawn per image kept, got {k}")
    return [seed] + [(seed + c * _GOLDEN) % (2**63) for c in range(1, k)]


def ranking_seed(seed: int) -> int:
    """The seed of the noise that scores an image's candidates: none of `candidate_seeds(seed, k)` for any k."""
    return (seed - _GOLDEN) % (2**63)


@torch.no_grad()
def denoising_error(
    denoiser: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    sigmas: Sequence[float],
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor],
    *,
    on_level: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Mean squared denoising error of each clean sample, averaged over levels and draws: shape (N,).

    denoiser(x, sigma, **cond) -> x0, on VE samples x = x0 + σ ε (`DiscreteDenoiser`); latents (N, ...)
    clean; sigmas the levels; noise (len(sigmas), M, N, ...) the M draws per level (rows may repeat a draw,
    for common random numbers); cond the denoiser's conditioning for all N rows. on_level runs after each
    denoiser call (progress)."""
    if noise.shape[0] != len(sigmas) or tuple(noise.shape[2:]) != tuple(latents.shape):
        raise ValueError(
            f"noise must have shape (levels={len(sigmas)}, draws, *latents.shape={tuple(latents.shape)}), "
            f"got {tuple(noise.shape)}"
        )
    total = torch.zeros(latents.shape[0], dtype=torch.float64)
    for sigma, draws in zip(sigmas, noise):
        for eps in draws:
            x = latents + float(sigma) * eps.to(latents)
            x0 = denoiser(x, float(sigma), **cond)
            total += (x0.float() - latents.float()).pow(2).flatten(1).mean(1).double().cpu()
            if on_level is not None:
                on_level()
    return (total / (noise.shape[0] * noise.shape[1])).float()


# Weight of the denoising error against an image-text matcher's logit (`matched_score`), chosen on seeds other than
# the eval's (docs/shapes-model.md, "Best of K by an image-text matcher"): 5 of 5, 10, 20, 40, 80.
MATCH_ERROR_WEIGHT = 5.0


def matched_score(logits: torch.Tensor, errors: torch.Tensor, k: int, weight: float | None = None) -> torch.Tensor:
    """The score by which best of K keeps a candidate when the model has an image-text matcher (higher is better):
    the matcher's logit minus `weight` times the candidate's denoising error relative to its image's K
    candidates' mean, ``logit - weight * (error / mean - 1)``. The matcher reads counts (and little of places or
    relations); the error, a likelihood under the prompt, keeps the shapes and places the model draws well.
    Relative errors carry no unit, so one weight serves any model. logits, errors: (N * K,), image-major;
    weight None: `MATCH_ERROR_WEIGHT`."""
    weight = MATCH_ERROR_WEIGHT if weight is None else weight
    if logits.shape != errors.shape or errors.numel() % k:
        raise ValueError(f"logits {tuple(logits.shape)} and errors {tuple(errors.shape)} must be N * {k} alike")
    e = errors.view(-1, k)
    return (logits.view(-1, k) - weight * (e / e.mean(1, keepdim=True) - 1)).flatten()


def pick_best(errors: torch.Tensor, k: int) -> torch.Tensor:
    """Indices into N * k candidates (image i's at i * k ... i * k + k - 1) of each image's least error."""
    if errors.numel() % k:
        raise ValueError(f"{errors.numel()} errors are not a whole number of groups of {k} candidates")
    return errors.view(-1, k).argmin(1) + torch.arange(0, errors.numel(), k)
