"""The few collective operations the objectives need, all harmless without `torch.distributed`.

Gradient of a loss on gathered features (CLIP, SigLIP). Say W ranks each hold a local batch, encode it to
features f_r, gather all of them with `all_gather_with_grad` into F = [f_1; ...; f_W] and compute the *same*
global loss L(F) (every rank computes it in full). In backward, `all_gather`'s gradient sums, over the
ranks, what each rank's copy of L sends to rank r's slice:

    dL_local/df_r  (on rank r)  =  sum_s dL(F on rank s)/df_r  =  W * dL/df_r

so rank r's parameter gradient is W * dL/df_r * df_r/dθ. DDP then averages over the ranks:

    (1/W) * sum_r W * dL/df_r * df_r/dθ  =  sum_r dL/df_r * df_r/dθ  =  dL/dθ

which is exactly one process's gradient of L on the concatenated global batch. Parameters that enter L
directly (the logit scale) get dL/dt on every rank and the average leaves it unchanged.
(`tests/test_train_vae_clip.py` checks this with two gloo processes.) It needs equal local batch sizes,
as `all_gather` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not available or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this is rank 0 (or the only process): the one that writes files and logs."""
    return world()[0] == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and keeps this rank's slice.

    This is what `torch.distributed.nn.functional.all_gather` computes (its backward is a reduce-scatter
    with SUM), written out because that function is deprecated from torch 2.8 on, in favour of a private
    module. The backward uses all_reduce, which every backend has (gloo has no reduce-scatter); for
    feature vectors the extra traffic is negligible.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous())
        ctx.rows = (rank * t.shape[0], (rank + 1) * t.shape[0])
        return torch.cat(parts, dim=0)  # size x (B, ...) -> (W*B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # sum_s dL_s/dF, on every rank
        start, stop = ctx.rows
        return grad[start:stop]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (B, ...) from every rank along dim 0 -> (W*B, ...), rank order, differentiable.

    The gradient flowing back to this rank's `t` is the sum over ranks of the gradients of their copies of
    the result at this rank's slice (see the module docstring for why that, after DDP's average, is the
    global-batch gradient). Every rank must pass the same shape. Identity for one process.
    """
    if world()[1] == 1:
        return t
    return _GatherWithGrad.apply(t)


@torch.no_grad()
def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (B, ...) from every rank along dim 0, without gradient (labels, ids, metrics)."""
    _, size = world()
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (a new tensor, no gradient); `t` itself for one process."""
    _, size = world()
    if size == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / size
