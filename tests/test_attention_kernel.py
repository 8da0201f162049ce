"""The VAE's pixel attention must reach PyTorch's fused CPU attention (O(T) memory), not the math path; short
attention that trains in bf16 on the CPU takes the math path, whose backward is faster there (`layers.sdpa`)."""

import torch
from torch.profiler import ProfilerActivity, profile

from sfumato.models import layers
from sfumato.models.layers import AttnBlock, attention, sdpa

FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _ops(fn, grad=False) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.set_grad_enabled(grad):
        fn()
    return {e.key for e in prof.key_averages()}


def test_pixel_attention_uses_the_fused_kernel_and_matches_the_math():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(1, 32, 16, 16)
    ops = _ops(lambda: block(x))
    # the math fallback materialises softmax(q k^T) (T x T): 9 GB per image at 512 px with an f=2 VAE
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(o for o in ops if "attention" in o)
    assert "aten::_softmax" not in ops

    h = block.norm(x)
    q, k, v = (p(h).flatten(2).transpose(1, 2) for p in (block.q, block.k, block.v))  # (B, H*W, C)
    w = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1)  # (B, T, T), by hand
    assert torch.allclose(attention(q, k, v, 1), w @ v, atol=1e-5)


def _qkv(Tq, Tk, dtype, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, T, 16, generator=g).to(dtype).requires_grad_(grad) for T in (Tq, Tk, Tk)]


def test_sdpa_picks_the_math_path_only_for_short_low_precision_training():
    short, long = (16, 32), (256, 128)  # 512 and 32,768 query-key pairs, either side of MATH_PATH_MAX_PAIRS
    assert short[0] * short[1] <= layers.MATH_PATH_MAX_PAIRS < long[0] * long[1]
    cases = [  # (sizes, dtype, grad, fused kernel expected)
        (short, torch.bfloat16, True, False),
        (short, torch.float16, True, False),
        (short, torch.float32, True, True),  # float32: the fused kernel is the faster one
        (short, torch.bfloat16, False, True),  # inference: its forward is as fast
        (long, torch.bfloat16, True, True),  # the math path holds (Tq, Tk) and is slower there
    ]
    for (Tq, Tk), dtype, grad, fused in cases:
        q, k, v = _qkv(Tq, Tk, dtype, grad)
        ops = _ops(lambda q=q, k=k, v=v: sdpa(q, k, v), grad=grad)
        assert (FUSED in ops) == fused, (Tq, Tk, dtype, grad, sorted(o for o in ops if "attention" in o))


def test_sdpa_math_path_matches_float64_in_values_and_gradients():
    for mask in (None, torch.tensor([[True] * 20 + [False] * 12, [True] * 7 + [False] * 25])[:, None, None, :]):
        q, k, v = _qkv(16, 32, torch.bfloat16)
        out = sdpa(q, k, v, attn_mask=mask)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.float().mul(dout).sum().backward()
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        w = q64 @ k64.transpose(-1, -2) / 16**0.5  # (B, nh, Tq, Tk), by hand
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        ref = torch.softmax(w, dim=-1) @ v64
        ref.mul(dout.double()).sum().backward()
        assert (out.double() - ref).abs().max() < 3e-2  # bf16 rounding of a (B, nh, 16, 16) output
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert (got.double() - want).abs().max() / want.abs().max() < 3e-2
