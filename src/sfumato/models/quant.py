"""Dynamic int8 quantisation of Linear layers for CPU inference (an opt-in, approximate speed mode).

A Linear layer y = x Wᵀ + b becomes one int8 matrix product with int32 accumulation:

    W ≈ s_w[o] · Q_w[o, :]      Q_w = round(W / s_w) ∈ [-127, 127], s_w[o] = max_k |W[o, k]| / 127
    x ≈ s_x[m] · Q_x[m, :]      the same per row (token) of the input, computed at every call
    y[m, o] ≈ s_x[m] s_w[o] Σ_k Q_x[m, k] Q_w[o, k] + b[o]          (`torch._int_mm`, exact in int32)

Both scales are symmetric (no zero points) and per row, which is at least as fine as the per-tensor
activation scale of `torch.ao.quantization.quantize_dynamic` (what this replaces; that API is deprecated in
favour of torchao, which sfumato does not depend on). The error is that of rounding each factor to 8 bits:
about 2⁻⁸ of each row's largest magnitude, per factor (tests/test_quant.py bounds it). On CPUs with int8 dot
products (AVX512-VNNI, AMX) the product runs several times faster than in float32.
"""

from __future__ import annotations

import torch
from torch import nn


def _absmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row scale max|x| / 127 (rows of zeros get scale 1: any scale reproduces them exactly)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, s) with x ≈ s · Q row by row: Q int8 in [-127, 127] and s (rows, 1) float32."""
    x = x.float()  # a no-op for float32 inputs; converted once otherwise
    s = _absmax_scale(x)
    return torch.round(x / s).clamp_(-127, 127).to(torch.int8), s


class Int8Linear(nn.Module):
    """A `nn.Linear` with int8 weights (per output channel) and inputs quantised per row at each call.

    Built from a float Linear by `Int8Linear.from_linear`; inference only (no gradients flow through the
    rounding). Inputs of any leading shape (..., in_features); the output is float32 (the input's dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # stored transposed, (in, out): the layout torch._int_mm takes as its second operand
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            w_q, w_s = quantize_rows(linear.weight.detach())  # (out, in), (out, 1)
            q.weight_t.copy_(w_q.t())
            q.weight_scale.copy_(w_s[:, 0])
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().float())
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # (..., in) -> (M, in)
        x_q, x_s = quantize_rows(rows)
        acc = torch._int_mm(x_q, self.weight_t)  # (M, in) @ (in, out) -> (M, out) int32, exact
        y = acc.float().mul_(x_s).mul_(self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears_(module: nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by an `Int8Linear`, in place; returns how many.

    CPU and float32 only: refuse anything else by name rather than compute it wrongly or slowly.
    """
    params = list(module.parameters())
    if params and (params[0].device.type != "cpu" or params[0].dtype != torch.float32):
        raise ValueError(
            f"int8 quantisation runs on float32 CPU models, got {params[0].dtype} on {params[0].device}; "
            "load the model with dtype=torch.float32 on the CPU"
        )
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_linear(child))
                n += 1
    return n
