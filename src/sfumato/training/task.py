"""What the training loop trains: a `Task` (one per component) and the per-example random numbers it draws.

The loop (`sfumato.training.loop.train`) owns optimisation, EMA, checkpoints, resume, logging and DDP; a task
owns the model and its objective:

    task.trainable()                      -> nn.Module whose parameters are optimised (and EMA'd, DDP-wrapped)
    task.loss(batch, rng, step, model)    -> (scalar loss, {"name": float, ...} metrics)
    task.preview(model, step, folder)     -> PNG paths (sample grids, reconstructions, similarity matrices)
    task.export(model, folder)            -> the files a user loads afterwards (native safetensors / a bundle)

`model` is what the loop passes in place of `task.trainable()`: the DDP wrapper during training, the EMA copy
for previews and export. Frozen parts (a VAE and text encoder for latent diffusion) live on the task.

Randomness inside `loss` comes only from `rng`, a `BatchRandom` whose draws for example i depend on (seed,
step, global index of i) and nothing else. So one process with a global batch of 8 and two processes with 4
each draw the same noise for the same images, and a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import nn


def example_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed from (run seed, step, global example index, stream), well mixed (BLAKE2b)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BatchRandom:
    """Random numbers for a batch, one CPU generator per example, seeded by (seed, step, example index).

    Each call returns a tensor whose leading dimension is the batch: row i is drawn from example i's own
    generator, so it does not depend on which other examples share the batch or the process. Calls must be
    made in the same order in every run (they are: the order is the task's code).
    """

    def __init__(self, seed: int, step: int, indices: torch.Tensor | list[int], stream: int = 0):
        self.indices = [int(i) for i in indices]
        self.generators = [
            torch.Generator().manual_seed(example_seed(seed, step, i, stream)) for i in self.indices
        ]

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) uniform on [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g, dtype=dtype) for g in self.generators])

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """(B, *shape) integers in [0, high)."""
        return torch.stack([torch.randint(high, shape, generator=g) for g in self.generators])


class Task(Protocol):
    """The component-specific half of training (see the module docstring)."""

    name: str  # "vae", "clip", "ldm", "ddpm": used in file names and logs

    def trainable(self) -> nn.Module: ...

    def loss(
        self, batch: dict, rng: BatchRandom, step: int, model: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def preview(self, model: nn.Module, step: int, folder) -> list: ...

    def export(self, model: nn.Module, folder) -> list: ...


def init_seeded(make, seed: int):
    """Build a module with the global RNG seeded by `seed`, leaving the caller's RNG state untouched, so
    every process (and every rerun) starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
