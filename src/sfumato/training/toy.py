"""Training a small MLP denoiser on 2-D data (Ho et al. 2020, Algorithm 1) and sampling it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.toy import toy_data
from ..diffusion.denoisers import DiscreteDenoiser, Prediction
from ..diffusion.schedules import DiscreteSchedule
from ..models.toy import ToyConfig, ToyMLP


@dataclass
class ToyTrainConfig:
    data: str = "swiss-roll"  # one of sfumato.data.toy.TOY_DATASETS
    steps: int = 3000  # optimiser steps
    batch_size: int = 512
    lr: float = 2e-3  # AdamW peak learning rate, cosine-decayed to 0
    # beta schedule (sfumato.diffusion.schedules.make_betas): DDPM's linear one; cosine's last level has
    # σ ≈ 2e4, where an eps-prediction's tiny error becomes a large x0 error
    schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: Prediction = "eps"
    n_train: int = 20_000  # size of the (fixed) training set
    seed: int = 0
    model: ToyConfig = field(default_factory=ToyConfig)


def train_toy(
    cfg: ToyTrainConfig, *, progress: bool = True, callback: Callable[[int, float], None] | None = None
) -> tuple[DiscreteDenoiser, list[float]]:
    """Returns the trained denoiser and the loss of every step."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    data = toy_data(cfg.data, cfg.n_train, seed=cfg.seed)
    schedule = DiscreteSchedule.named(cfg.schedule, cfg.num_timesteps)
    den = DiscreteDenoiser(ToyMLP(cfg.model), schedule, cfg.prediction)
    losses: list[float] = []
    if cfg.steps <= 0:  # an untrained model, e.g. as a baseline
        return den.eval(), losses
    opt = torch.optim.AdamW(den.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.data}", disable=not progress, leave=False)
    for step in bar:
        batch = data[torch.randint(0, len(data), (cfg.batch_size,), generator=g)]
        loss = den.loss(
            batch, generator=g
        ).mean()  # Algorithm 1: ||eps - eps_θ(x_t, t)||², t ~ U, eps ~ N(0, I)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if callback is not None:
            callback(step, losses[-1])
    return den.eval(), losses
