"""Dynamic int8 Linear layers (`models.quant`): the integer arithmetic they claim, the rounding error bound
that follows from it, and the in-place replacement inside a model."""

import pytest
import torch
from torch import nn

from sfumato.models.quant import Int8Linear, quantize_linears_, quantize_rows
from sfumato.models.unet import UNET_PRESETS, UNet


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    x = torch.tensor([[0.5, -1.27, 0.01], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]])
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    torch.testing.assert_close(s[:, 0], torch.tensor([0.01, 1.0, 2.0]))  # max|row| / 127; zeros: 1
    assert q.tolist() == [[50, -127, 1], [0, 0, 0], [127, 0, -64]]  # 1/2 and -127/2 round half to even


def test_int8_linear_is_the_integer_product_it_describes():
    """y = s_x s_w (Q_x Q_wᵀ) + b, with the int32 sum computed in float64 here (exact below 2⁵³)."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    x = torch.randn(3, 5, 48) * torch.linspace(0.1, 10, 5)[:, None]  # rows of very different scales
    q = Int8Linear.from_linear(linear)
    qx, sx = quantize_rows(x.reshape(-1, 48))
    qw, sw = quantize_rows(linear.weight.detach())
    expected = (qx.double() @ qw.double().T) * sx.double() * sw.double().T + linear.bias.detach().double()
    got = q(x)
    assert got.shape == (3, 5, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.reshape(3, 5, 24), rtol=1e-6, atol=1e-6)


def test_int8_linear_error_stays_within_the_rounding_bound():
    """Each factor is off by at most half its scale per entry, so |y - y_exact|[m, o] is at most
    (s_x/2) Σ|W[o]| + (s_w/2) Σ|x[m]| + K s_x s_w / 4 (plus float32 rounding)."""
    torch.manual_seed(1)
    K = 320
    linear = nn.Linear(K, 640)
    x = torch.randn(64, K)
    x[:, 7] *= 30  # an outlier channel, as transformer activations have
    with torch.no_grad():
        exact = linear(x)
        got = Int8Linear.from_linear(linear)(x)
    W = linear.weight.detach()
    sx = x.abs().amax(1, keepdim=True) / 127
    sw = W.abs().amax(1) / 127
    bound = sx / 2 * W.abs().sum(1) + sw / 2 * x.abs().sum(1, keepdim=True) + K * sx * sw / 4
    assert ((got - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 6e-2, rel  # rounding happened; the outlier channel sets every row's scale (3.5 %)


def test_quantize_linears_replaces_every_linear_and_stays_close():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny"]).eval()
    for p in unet.parameters():  # no zero-initialised output layers: every path carries signal
        nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 7, unet.config.context_dim)
    n_linear = sum(type(m) is nn.Linear for m in unet.modules())
    with torch.no_grad():
        exact = unet(x, t, ctx)
        assert quantize_linears_(unet) == n_linear > 0
        got = unet(x, t, ctx)
    assert not any(type(m) is nn.Linear for m in unet.modules())
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 0 < rel < 5e-2, rel


def test_quantize_linears_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32 CPU models, got torch.bfloat16"):
        quantize_linears_(nn.Linear(4, 4).to(torch.bfloat16))


def test_int8_reaches_a_linear_projected_transformer():
    """SD 2's SpatialTransformer projects with Linear layers; after quantize_linears_ it runs on the Int8Linear
    replacements (which hold no float `weight`) and stays near float32."""
    from sfumato.models.layers import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(32, num_heads=2, head_dim=16, context_dim=16, use_linear=True).eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)  # zero-initialised: the block would be the identity
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = block(x, ctx)
        assert quantize_linears_(block) > 2
        got = block(x, ctx)
    assert isinstance(block.proj_in, Int8Linear) and isinstance(block.proj_out, Int8Linear)
    rel = (got - expected).norm() / (expected - x).norm()
    assert rel < 0.05, rel
