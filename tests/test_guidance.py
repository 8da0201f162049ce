"""Guidance wrappers (a denoiser in, a denoiser out): classifier-free guidance and x0 thresholding."""

import pytest
import torch

from sfumato.diffusion.guidance import classifier_free_guidance, dynamic_thresholding, static_thresholding


class Affine:
    """A denoiser whose output depends on the condition: x * a + c.mean(), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, *, context):
        self.calls += 1
        return 0.5 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.1 * sigma.view(-1, 1, 1, 1)


def test_cfg_is_the_extrapolation_in_one_batched_call():
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(3, 4, 5, 5, generator=g), torch.rand(3, generator=g) + 0.5
    cond, uncond = {"context": torch.randn(3, 7, 8, generator=g)}, {"context": torch.randn(3, 7, 8, generator=g)}
    d = Affine()
    guided = classifier_free_guidance(d, 4.0, cond, uncond)(x, sigma)
    assert d.calls == 1  # both halves in one batch
    expected = d(x, sigma, **uncond) + 4.0 * (d(x, sigma, **cond) - d(x, sigma, **uncond))
    torch.testing.assert_close(guided, expected)
    d.calls = 0
    torch.testing.assert_close(classifier_free_guidance(d, 1.0, cond, uncond)(x, sigma), d(x, sigma, **cond))
    assert d.calls == 2  # scale 1: the conditional pass only (plus the reference call)
    with pytest.raises(ValueError, match="different arguments"):
        classifier_free_guidance(d, 2.0, cond, {"y": torch.zeros(3)})


def _constant(x0):
    return lambda x, sigma, **cond: x0


def test_dynamic_thresholding_rescales_each_image_by_its_percentile():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    x0[0] *= 0.2  # inside [-1, 1]: plain clamping leaves it as it is
    x0[1] *= 3.0  # mostly beyond 1: shrunk by its own percentile
    x = torch.zeros_like(x0)
    sigma = torch.ones(3, dtype=torch.float64)
    out = dynamic_thresholding(_constant(x0), 0.9)(x, sigma)
    assert out.abs().max() <= 1
    torch.testing.assert_close(out[0], x0[0])
    s = x0[1].abs().flatten().quantile(0.9)
    assert s > 1
    torch.testing.assert_close(out[1], x0[1].clamp(-s, s) / s)
    # each image on its own: the others' values do not change its threshold
    alone = dynamic_thresholding(_constant(x0[2:]), 0.9)(x[2:], sigma[2:])
    torch.testing.assert_close(out[2:], alone)
    # percentile 1: s is the largest |x0|, so nothing is clamped, only divided
    top = dynamic_thresholding(_constant(x0), 1.0)(x, sigma)
    torch.testing.assert_close(top[1], x0[1] / x0[1].abs().max())
    # max_value bounds s: with s <= 1 it is static thresholding
    torch.testing.assert_close(
        dynamic_thresholding(_constant(x0), 0.9, max_value=1.0)(x, sigma), static_thresholding(_constant(x0))(x, sigma)
    )
    for bad in ({"percentile": 0.0}, {"percentile": 1.5}, {"max_value": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dynamic_thresholding(_constant(x0), **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dynamic_thresholding_matches_diffusers(dtype):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=2.5)
    g = torch.Generator().manual_seed(2)
    x0 = (torch.randn(4, 3, 16, 16, generator=g) * torch.tensor([0.3, 1.0, 2.0, 6.0]).view(4, 1, 1, 1)).to(dtype)
    ours = dynamic_thresholding(_constant(x0), 0.995, max_value=2.5)(torch.zeros_like(x0), torch.ones(4))
    theirs = sched._threshold_sample(x0.clone())
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
