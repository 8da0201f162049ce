"""Building blocks of the Stable Diffusion U-Net and KL autoencoder.

Attribute names follow the original CompVis latent-diffusion code (Rombach et al. 2022,
github.com/CompVis/stable-diffusion, `ldm/modules/diffusionmodules/openaimodel.py`,
`ldm/modules/attention.py` and `ldm/modules/diffusionmodules/model.py`), so that the state dict of a
model built from these blocks *is* the state dict of an SD 1.x/2.x checkpoint: `in_layers.2`,
`emb_layers.1`, `transformer_blocks.0.attn1.to_q`, `nin_shortcut`, ... Index-named children
(`in_layers.0`, `out_layers.3`) are `nn.Sequential`s laid out exactly as in ldm, Dropout and SiLU
included, because the position of a layer is part of its checkpoint name.

Nothing here allocates anything but parameters in `__init__`, so every block can be built under
`torch.device("meta")` and filled with `load_state_dict(..., assign=True)`.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# ldm's `normalization()` / `Normalize()`: GroupNorm always has 32 groups in Stable Diffusion.
NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as ldm's `GroupNorm32` does for fp16 inference.

    ldm keeps norm parameters in fp32; we upcast them too, so a model cast whole to fp16/bf16 works.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the common case: no casts, no extra calls
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


# Switches for the inference fast paths below, all on; benchmarks/ablation.py turns each off to measure it.
FAST_CONV = True  # weight-bound and 1x1 convolutions as matrix products (`conv2d`)
FAST_WINOGRAD = True  # 3x3 convolutions of deep, small maps by Winograd F(2x2, 3x3) (`winograd_conv3x3`)
FAST_UPSAMPLE = True  # nearest 2x upsampling + 3x3 conv as one 2x2 convolution of four phases
INPLACE = True  # SiLU and residual sums overwrite fresh intermediates when no autograd graph is recorded


def _inference() -> bool:
    """True where no autograd graph is being recorded, so intermediates may be overwritten in place."""
    return INPLACE and not torch.is_grad_enabled()


# A 3x3 convolution becomes one matrix product (im2col) when its weight has at least this many times more
# output channels than the product has columns (B * H_out * W_out); measured on a 2-core CPU, see Conv2d.
GEMM_CONV_RATIO = 8


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:  # fmt: skip
    """`F.conv2d` without autograd on the CPU, computed as a matrix product where that is faster.

    On the CPU, oneDNN convolution re-lays out the weight on every call; where the weight is large and the
    feature map small (the 1280-channel 4x4 and 8x8 levels of the SD U-Net at 256 px), that dominates, and
    im2col (`F.unfold`) followed by one `addmm` on the weight as stored is 1.3-2.4x faster. 1x1 convolutions
    (no padding, stride 1) are a batched matrix product, which avoids torch's slow im2col path for them.
    Both are the same sums in another order (float32 rounding differs, about 1e-6 relative). Inputs or weights
    in another memory format (`channels_last`) go to `F.conv2d`, which oneDNN runs in that format.
    """
    if not (FAST_CONV and x.is_contiguous() and weight.is_contiguous()):
        return F.conv2d(x, weight, bias, stride, padding)
    B, C, H, W = x.shape
    Co, _, kh, kw = weight.shape
    if (kh, kw, stride, padding) == (1, 1, 1, 0):
        out = torch.matmul(weight.view(Co, C), x.reshape(B, C, H * W))  # (Co, C) @ (B, C, HW) -> (B, Co, HW)
        if bias is not None:
            out += bias[:, None]
        return out.view(B, Co, H, W)
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    n = B * Ho * Wo
    if Co < GEMM_CONV_RATIO * n:
        if FAST_WINOGRAD and _winograd_pays(x, weight, stride, padding):
            return winograd_conv3x3(x, weight, bias)
        return F.conv2d(x, weight, bias, stride, padding)
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (B, C*kh*kw, Ho*Wo)
    cols = cols.transpose(0, 1).reshape(C * kh * kw, n)  # (B, K, L) -> (K, B*L)
    w = weight.view(Co, C * kh * kw)
    out = torch.mm(w, cols) if bias is None else torch.addmm(bias[:, None], w, cols)  # (Co, B*L)
    return out.view(Co, B, Ho, Wo).transpose(0, 1).contiguous()  # (Co, B, Ho, Wo) -> (B, Co, Ho, Wo)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"): each 2x2
# block of outputs is A^T [(G g G^T) * (B^T d B)] A for its 4x4 input tile d and the 3x3 kernel g, i.e. 16
# products per channel pair instead of 36. The 16 products of all tiles are 16 matrix products (C_out x C_in
# by C_in x tiles); the transforms are sums and differences. B^T has rows (1, 0, -1, 0), (0, 1, 1, 0),
# (0, -1, 1, 0), (0, 1, 0, -1), written out as subtractions and additions in `winograd_conv3x3`.
_WINO_G = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINO_AT = torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]])
_WINO_KG = torch.kron(_WINO_G, _WINO_G)  # (16, 9): the kernel transform on a flattened 3x3 kernel
_WINO_KA = torch.kron(_WINO_AT, _WINO_AT)  # (4, 16): the output transform on a flattened 4x4 tile
# Buffers stay within 32 MB (8 Mi floats): glibc serves larger ones as fresh pages, whose first touch (page
# faults) costs as much as the arithmetic saved. The transformed input must fit; the transformed kernel and
# the products are made in pieces of output channels of at most WINOGRAD_CHUNK floats each.
WINOGRAD_MAX_INPUT, WINOGRAD_CHUNK = 8 * 2**20, 6 * 2**20
# Where it pays (2-core CPU, float32, measured against oneDNN's direct convolution): maps of >= 128 tiles
# (B*H*W >= 512) with >= 256 channels in and out, whose transformed input fits. Larger maps with few channels
# are memory-bound in the transforms (the SD VAE at 256 px and above; the U-Net's 64x64 level), smaller ones
# or fewer channels are bound by the per-call overhead (the shipped model).
WINOGRAD_MIN_TILES, WINOGRAD_MIN_CHANNELS = 128, 256


def _winograd_pays(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    B, C, H, W = x.shape
    tiles = B * (H // 2) * (W // 2)
    return (
        weight.shape[2:] == (3, 3) and stride == 1 and padding == 1 and H % 2 == 0 and W % 2 == 0
        and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
        and min(C, weight.shape[0]) >= WINOGRAD_MIN_CHANNELS and tiles >= WINOGRAD_MIN_TILES
        and 16 * C * tiles <= WINOGRAD_MAX_INPUT
    )  # fmt: skip


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for a 3x3 kernel and even H, W by Winograd F(2x2, 3x3), without
    autograd: 2.25x fewer multiplications, spent in 16 large matrix products instead of oneDNN's direct
    kernel. The transforms' coefficients are 0, +-1 and +-1/2, so it differs from the direct sum by float32
    rounding only (about 1e-6 relative). x: (B, C, H, W) contiguous -> (B, Co, H, W)."""
    B, C, H, W = x.shape
    Co = weight.shape[0]
    th, tw = H // 2, W // 2
    n = B * th * tw
    # input transform B^T d B of every 4x4 tile (stride 2) of the zero-padded map: rows, then columns
    xp = F.pad(x, (1, 1, 1, 1))
    r = [xp[:, :, k : k + 2 * th : 2] for k in range(4)]  # the 4 rows of every tile row: (B, C, th, W + 2)
    rows = x.new_empty(4, B, C, th, W + 2)
    torch.sub(r[0], r[2], out=rows[0])
    torch.add(r[1], r[2], out=rows[1])
    torch.sub(r[2], r[1], out=rows[2])
    torch.sub(r[1], r[3], out=rows[3])
    v = x.new_empty(4, 4, C, B, th, tw)  # (tile row i, tile column j, C, tiles)
    for i in range(4):
        c = [rows[i][..., k : k + 2 * tw : 2] for k in range(4)]  # (B, C, th, tw)
        o = v[i].permute(0, 2, 1, 3, 4)  # (4, B, C, th, tw) views of v[i]
        torch.sub(c[0], c[2], out=o[0])
        torch.add(c[1], c[2], out=o[1])
        torch.sub(c[2], c[1], out=o[2])
        torch.sub(c[1], c[3], out=o[3])
    v = v.view(16, C, n)
    kg, ka = _WINO_KG.to(x), _WINO_KA.to(x)
    out = x.new_empty(B, Co, th, 2, tw, 2)
    step = max(16, WINOGRAD_CHUNK // (16 * max(C, n)) // 16 * 16)  # output channels per piece
    for o0 in range(0, Co, step):
        o1 = min(Co, o0 + step)
        u = torch.mm(kg, weight[o0:o1].reshape(-1, 9).t()).view(16, o1 - o0, C)  # G g G^T
        m = torch.bmm(u, v)  # (16, co, tiles): the 16 elementwise products of all tiles, summed over C
        y = torch.mm(ka, m.view(16, -1)).view(2, 2, o1 - o0, B, th, tw)  # A^T m A
        y = y.permute(3, 2, 4, 0, 5, 1)  # (B, co, th, 2, tw, 2): the 2x2 blocks into place
        if bias is None:
            out[:, o0:o1].copy_(y)
        else:
            torch.add(y, bias[o0:o1].view(1, -1, 1, 1, 1, 1), out=out[:, o0:o1])
    return out.view(B, Co, H, W)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same checkpoint keys) that runs `conv2d` above when no gradient is
    recorded on the CPU; everything else is `nn.Conv2d.forward`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not FAST_CONV
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.ndim != 4
            or self.groups != 1
            or self.padding_mode != "zeros"
            or self.dilation != (1, 1)
            or isinstance(self.padding, str)
            or self.stride[0] != self.stride[1]
            or self.padding[0] != self.padding[1]
        ):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0])


def _phase_taps() -> torch.Tensor:
    """(9, 16): column 4p + 2i + j of output phase p = 2a + b sums the 3x3 taps (r, s) (row 3r + s) that land on
    its 2x2 tap (i, j). Row phase 0 reads x rows (i-1, i) with kernel rows (0 | 1 + 2), phase 1 reads (i, i+1)
    with (0 + 1 | 2); columns alike."""
    lands = ({0: 0, 1: 1, 2: 1}, {0: 0, 1: 0, 2: 1})  # phase -> kernel row -> tap row
    taps = torch.zeros(9, 16)
    for a in (0, 1):
        for b in (0, 1):
            for r in range(3):
                for s in range(3):
                    taps[3 * r + s, 4 * (2 * a + b) + 2 * lands[a][r] + lands[b][s]] = 1.0
    return taps


_PHASE_TAPS = _phase_taps()


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Nearest 2x upsampling followed by a 3x3 convolution (padding 1), computed on x without upsampling it.

    Each output phase (row parity a, column parity b) of the upsampled-then-convolved map is a 2x2 convolution
    of x whose taps are sums of the 3x3 taps: even rows 2i read x rows (i-1, i) with row taps (w0, w1 + w2),
    odd rows 2i+1 read (i, i+1) with (w0 + w1, w2); columns alike (`_phase_taps`). 16 instead of 36
    multiply-adds per input pixel and channel pair, and no 4x larger input. The same sums, grouped differently
    (float32 rounding differs, about 1e-6 relative). x: (B, C, H, W) -> (B, Co, 2H, 2W), in x's memory format.
    Without autograd each phase is convolved on its own and written into place (no stacked 4x kernel or
    output); with it, one convolution of the four kernels stacked.
    """
    B, C, H, W = x.shape
    Co = weight.shape[0]
    w9, taps = weight.reshape(Co * C, 9), _PHASE_TAPS.to(weight)
    if not torch.is_grad_enabled() and x.is_contiguous():
        out = x.new_empty(B, Co, H, 2, W, 2)
        for a in (0, 1):
            for b in (0, 1):
                p = 2 * a + b
                k = torch.mm(w9, taps[:, 4 * p : 4 * p + 4]).view(Co, C, 2, 2)
                y = conv2d(x, k, bias, 1, 1)  # (B, Co, H + 1, W + 1); phase (a, b) starts at (a, b)
                out[:, :, :, a, :, b] = y[:, :, a : a + H, b : b + W]
        return out.view(B, Co, 2 * H, 2 * W)
    k = torch.mm(w9, taps).view(Co, C, 4, 2, 2).transpose(1, 2).transpose(0, 1).reshape(4 * Co, C, 2, 2)
    y = conv2d(x, k, None if bias is None else bias.repeat(4), 1, 1)  # (B, 4*Co, H+1, W+1)
    # phase (a, b) is y's block 2a + b at offset (a, b); interleave: (2, 2, B, Co, H, W) -> (B, Co, 2H, 2W)
    phases = torch.stack([y[:, (2 * a + b) * Co : (2 * a + b + 1) * Co, a : a + H, b : b + W]
                          for a in (0, 1) for b in (0, 1)])  # fmt: skip
    out = phases.view(2, 2, B, Co, H, W).permute(2, 3, 4, 0, 5, 1).reshape(B, Co, 2 * H, 2 * W)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)  # keep a channels_last network in its format
    return out


# At inference, upsampling stays nearest 2x + conv where each phase's convolution would have at least this
# many output channels per output position (B (H+1) (W+1)): a small, deep map that reads the weight for few.
UPSAMPLE_WEIGHT_BOUND = 4


def upsample_phases_pay(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `upsample_conv` beats upsampling then `conv2d`, at inference: not on small, deep maps, where each
    phase's convolution reads the whole weight for a few columns, and building the four kernels costs more
    than the multiplications saved. SD U-Net, 2 cores, B = 2: 1280 channels at 4x4 94 against 35 ms, at 8x8
    148 against 79 ms (the plain convolution by Winograd); 640 at 16x16 59 against 77 ms."""
    B, _, H, W = x.shape
    return weight.shape[0] < UPSAMPLE_WEIGHT_BOUND * B * (H + 1) * (W + 1)


def group_norm(channels: int, eps: float) -> GroupNorm32:
    """32-group norm; U-Net ResBlocks use eps 1e-5, transformers and the VAE use 1e-6 (as in ldm)."""
    if channels % NORM_GROUPS != 0:
        raise ValueError(
            f"GroupNorm with {NORM_GROUPS} groups needs channels divisible by {NORM_GROUPS}, got {channels}; "
            f"choose model widths that are multiples of {NORM_GROUPS}"
        )
    return GroupNorm32(NORM_GROUPS, channels, eps=eps)


def zero_init_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters (ldm's `zero_module`): residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first.

    The transformer position encoding of Vaswani et al. 2017 (sec. 3.5) applied to the diffusion step,
    as in Ho et al. 2020 and ldm's `timestep_embedding`: frequencies `max_period ** (-i / half)`,
    output `[cos(t f), sin(t f)]`. t: (B,) -> (B, dim). Computed in float32 whatever the model dtype,
    because t up to 1000 times a frequency near 1 needs more than fp16's 11 bits.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, 1) * (1, half) -> (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, half) x2 -> (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # odd dim: pad one zero column
    return emb


# Below this many query-key pairs, attention that trains in bf16 or fp16 on the CPU takes PyTorch's math path:
# the fused CPU kernel's backward costs a fixed ~10-20 ms per call in bf16 (batch 64, 4 heads of 32, forward +
# backward: 16 x 16 keys 9.7 ms against 2.4 on the math path; 64 x 64: 25.3 against 15.3; 128 x 128: 57.7
# against 37.1), which made a bf16 training step of the shapes U-Net x1.18 slower. From about 32k pairs on the
# fused kernel wins (256 x 256: 92.6 against 187.9 ms), and the math path holds the whole (Tq, Tk) matrix.
# (torch 2.13, AMD EPYC with avx512_bf16, 2 threads; benchmarks/attention_backends.py and its README entry)
MATH_PATH_MAX_PAIRS = 16_384


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal=False
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on (B, nh, T, hd) tensors, with the backend chosen for speed where
    PyTorch's default is slow (see `MATH_PATH_MAX_PAIRS`); the result is the same softmax(q k^T / sqrt(hd)) v."""
    math_path = (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.shape[-2] * k.shape[-2] <= MATH_PATH_MAX_PAIRS
    )
    with sdpa_kernel(SDPBackend.MATH) if math_path else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(hd)) v over token sequences (Vaswani et al. 2017, eq. 1).

    q: (B, Tq, nh*hd), k and v: (B, Tk, nh*hd) -> (B, Tq, nh*hd). mask: None or (B, Tk) bool, True for the
    keys each query may attend to (every row needs at least one).
    """
    B, Tq, C = q.shape
    hd = C // num_heads
    # PyTorch's fused CPU attention (flash, O(T) memory) needs unit stride along hd; the VAE's pixel tokens
    # arrive as a transposed (B, C, H*W) view whose hd stride is H*W, which falls back to the math path that
    # holds the whole (Tq, Tk) matrix: 2.6 GB for a 256 px image of an f=2 VAE, out of memory at 512 px.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q = q.view(B, Tq, num_heads, hd).transpose(1, 2)  # (B, Tq, nh*hd) -> (B, nh, Tq, hd)
    k = k.view(B, k.shape[1], num_heads, hd).transpose(1, 2)  # (B, Tk, nh*hd) -> (B, nh, Tk, hd)
    v = v.view(B, v.shape[1], num_heads, hd).transpose(1, 2)  # (B, Tk, nh*hd) -> (B, nh, Tk, hd)
    if mask is not None:
        mask = mask[:, None, None, :]  # (B, Tk) -> (B, 1, 1, Tk), broadcast over heads and queries
    out = sdpa(q, k, v, attn_mask=mask)  # (B, nh, Tq, hd)
    return out.transpose(1, 2).reshape(B, Tq, C)  # (B, nh, Tq, hd) -> (B, Tq, nh*hd)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv (ldm `Upsample`, same in U-Net and VAE)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``size``: the output (H', W') when it is not exactly 2x, e.g. (2H - 1) to meet a U-Net skip whose
        side was odd before its stride-2 downsampling (diffusers' ``upsample_size``)."""
        exact2x = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if exact2x and FAST_UPSAMPLE and x.device.type == "cpu":  # in training too: autograd sums the taps
            if torch.is_grad_enabled() or upsample_phases_pay(x, self.conv.weight):
                return upsample_conv(x, self.conv.weight, self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, H, W) -> (B, C, H', W')
        return self.conv(x)


# ---------------------------------------------------------------------------------------------------
# U-Net blocks (ldm openaimodel.py and attention.py)
# ---------------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """U-Net downsampling: a stride-2 3x3 conv with symmetric padding, named `op` as in ldm."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class ResBlock(nn.Module):
    """U-Net residual block with the timestep embedding added between its two convs.

    Ho et al. 2020 (appendix B) after the Wide ResNet; ldm `ResBlock` without scale-shift norm:
    h = conv(SiLU(GN(x))); h += Linear(SiLU(emb)); h = conv(Dropout(SiLU(GN(h)))); return skip(x) + h.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels, eps=1e-5), nn.SiLU(), Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init_(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # a 1x1 conv only where the width changes, as in ldm (no parameters otherwise)
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The Sequentials' layers called one by one (they exist for their checkpoint names): without
        # autograd, SiLU and the additions overwrite fresh intermediates instead of allocating new ones.
        ip = _inference()
        norm1, _, conv1 = self.in_layers
        norm2, _, dropout, conv2 = self.out_layers
        h = conv1(F.silu(norm1(x), inplace=ip))
        e = self.emb_layers[1](F.silu(emb)).type(h.dtype)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = h.add_(e) if ip else h + e
        h = conv2(dropout(F.silu(norm2(h), inplace=ip)))
        skip = self.skip_connection(x)
        return h.add_(skip) if ip else skip + h


class CrossAttention(nn.Module):
    """Multi-head attention of `x` on `context` (self-attention when context is None); ldm naming.

    q, k, v projections have no bias; the output projection does (`to_out.0`; `to_out.1` is Dropout).
    """

    def __init__(self, query_dim: int, num_heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mask: None or (B, T_context) bool, True for the context tokens to attend to."""
        context = x if context is None else context
        h = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.num_heads, mask)
        return self.to_out(h)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5): a * GELU(b)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, 2*D) -> 2 x (B, T, D); value half first as in ldm
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with GEGLU and 4x width: `net.0` GEGLU, `net.1` Dropout, `net.2` Linear (ldm)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on the text, GEGLU MLP (ldm)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, num_heads, head_dim)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, num_heads, head_dim, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


def position_fourier_features(
    height: int, width: int, freqs: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """(height * width, 4 * freqs) features of each pixel's centre (u, v) in [0, 1]^2, rows first:
    [sin(pi 2^k u), cos(pi 2^k u), sin(pi 2^k v), cos(pi 2^k v)] for k < freqs. Relative coordinates, so
    "the top" is the same features at every resolution of one image (a pixel grid twice as fine
    interleaves new values between the coarse one's)."""
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width  # (W,)
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height  # (H,)
    scale = torch.pi * 2.0 ** torch.arange(freqs, device=device, dtype=torch.float32)  # (F,)
    fu, fv = u[:, None] * scale, v[:, None] * scale  # (W, F), (H, F)
    fu = torch.cat([fu.sin(), fu.cos()], dim=1)[None].expand(height, -1, -1)  # (H, W, 2F)
    fv = torch.cat([fv.sin(), fv.cos()], dim=1)[:, None].expand(-1, width, -1)  # (H, W, 2F)
    return torch.cat([fu, fv], dim=2).reshape(height * width, 4 * freqs).to(dtype)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` (Rombach et al. 2022, sec. 3.3).

    GroupNorm, a projection to `num_heads * head_dim` channels, `depth` transformer blocks, a projection
    back and a residual connection. SD 1.x projects with 1x1 convs, SD 2.x with Linear layers
    (`use_linear`); the two are the same map, only the checkpoint shapes differ, so we keep each one's.

    position_freqs > 0 (not in SD): `pos_embed`, a Linear of `position_fourier_features` of each pixel's relative
    place, is added to the tokens after `proj_in`, so attention queries know where they are. Zero-initialised:
    the block starts as the one without it.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        use_linear: bool = False,
        dropout: float = 0.0,
        position_freqs: int = 0,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.use_linear = use_linear
        self.position_freqs = position_freqs
        if position_freqs:
            self.pos_embed = zero_init_(nn.Linear(4 * position_freqs, inner))
        self.norm = group_norm(channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = zero_init_(nn.Linear(inner, channels))
        else:
            self.proj_in = Conv2d(channels, inner, 1)
            self.proj_out = zero_init_(nn.Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_heads, head_dim, context_dim, dropout) for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C), a view
        # A product on the transposed view gives contiguous tokens. Transposing the output of the 1x1
        # convolution instead left every token tensor of the blocks transposed, and each LayerNorm copied it
        # (0.4 s of the SD 1.5 U-Net's 11.8 s at 512 px). The Linear (SD 2) is called as a module: int8 mode
        # replaces it.
        if self.use_linear:
            h = self.proj_in(h)  # (B, H*W, inner)
        else:
            h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # the 1x1 conv's (inner, C)
        if self.position_freqs:
            pos = position_fourier_features(H, W, self.position_freqs, x.device, h.dtype)  # (H*W, 4F)
            h = h + self.pos_embed(pos)  # (B, H*W, inner) + (H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
        else:  # the 1x1 conv as W @ tokens^T, (C, inner) @ (B, inner, H*W): channels first, contiguous
            h = torch.matmul(self.proj_out.weight.flatten(1), h.transpose(1, 2)) + self.proj_out.bias[:, None]
        return x + h.view(B, C, H, W)


class TimestepEmbedSequential(nn.Sequential):
    """A U-Net stage (ldm's class of that name): passes `emb` to ResBlocks, `context` to transformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------
# KL-autoencoder blocks (ldm diffusionmodules/model.py)
# ---------------------------------------------------------------------------------------------------


class VAEDownsample(nn.Module):
    """Autoencoder downsampling: pad right/bottom by one, then a stride-2 3x3 conv without padding (ldm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H, W) -> (B, C, H+1, W+1), zeros on the right and bottom
        return self.conv(x)  # -> (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """Autoencoder residual block (ldm `ResnetBlock` without timestep): two GN-SiLU-conv layers + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, eps=1e-6)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Identity() if in_channels == out_channels else Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ip = _inference()  # without autograd, SiLU and the sum overwrite fresh intermediates in place
        h = self.conv1(F.silu(self.norm1(x), inplace=ip))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=ip)))
        skip = self.nin_shortcut(x)
        return h.add_(skip) if ip else skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections (ldm `AttnBlock`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # -> (B, H*W, C)
        h = attention(q, k, v, num_heads=1)  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
        return x + self.proj_out(h)
