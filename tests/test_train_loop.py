"""The training loop: exact resume, DDP equivalence, NaN handling, atomic checkpoints, LR schedule.

A small denoiser on 2-D points stands in for the real tasks; what is tested is the loop around it.
"""

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from sfumato.data.toy import toy_data
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.diffusion.schedules import DiscreteSchedule
from sfumato.models.toy import ToyConfig, ToyMLP
from sfumato.training.loop import (
    TrainConfig,
    TrainingDiverged,
    latest_checkpoint,
    list_checkpoints,
    lr_factor,
    train,
)
from sfumato.training.task import BatchRandom


class Points(torch.utils.data.Dataset):
    """2-D Swiss-roll points as dataset items."""

    def __init__(self, n: int = 256):
        self.x = toy_data("swiss-roll", n, seed=0).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "caption": "", "index": i}


class LossModule(nn.Module):
    """The trainable module; its forward is the loss, so DDP sees every computation."""

    def __init__(self):
        super().__init__()
        self.den = DiscreteDenoiser(ToyMLP(ToyConfig(hidden=64, depth=2)), DiscreteSchedule.named("linear"), "eps")
        self.dropout = nn.Dropout(0.1)  # uses the global torch RNG: resume must restore it

    def forward(self, x0, t, noise):
        return self.den.loss(self.dropout(x0), t=t, noise=noise).mean()


class ToyTask:
    name = "toy"

    def __init__(self, nan_at: tuple[int, ...] = ()):
        torch.manual_seed(0)
        self.module = LossModule()
        self.nan_at = nan_at
        self.previews = []

    def trainable(self):
        return self.module

    def loss(self, batch, rng: BatchRandom, step: int, model):
        x0 = batch["image"]
        t = rng.randint(1000)  # (B,)
        noise = rng.randn(2)  # (B, 2)
        loss = model(x0, t, noise)
        if step in self.nan_at:
            loss = loss * float("nan")
        return loss, {"x_mean": float(x0.mean())}

    def preview(self, model, step, folder):
        self.previews.append(step)
        return []

    def export(self, model, folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "toy.pt")
        return [folder / "toy.pt"]


def config(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=16, lr=3e-3, warmup_steps=3, log_every=2, checkpoint_every=4,
                preview_every=6, ema_decay=0.9, keep_checkpoints=2, device="cpu")  # fmt: skip
    return TrainConfig(**(base | kw))


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_resume_is_bitwise_exact(tmp_path):
    """12 steps straight == 6 steps, a fresh process state, then resume for 6 (model, EMA, optimizer, LR,
    data position, dropout RNG): identical weights, bit for bit. Also across an epoch boundary
    (256 items / 16 = 16 steps per epoch, so use 20 steps)."""
    cfg = config(steps=20, checkpoint_every=3)
    straight = train(ToyTask(), Points(), cfg, tmp_path / "a", progress=False)
    first = train(ToyTask(), Points(), cfg, tmp_path / "b", until=7, progress=False)
    assert first.step == 7 and first.checkpoint.name == "step-00000007" and not first.exported
    torch.manual_seed(12345)  # a different global RNG state in the "new process"
    second = train(ToyTask(), Points(), cfg, tmp_path / "b", resume=True, progress=False)
    assert second.step == 20 and second.exported
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(straight.checkpoint / name)
        b = weights(second.checkpoint / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # the losses logged after the resume are the same numbers (log_every=2, so the windows align again)
    rec_a = {r["step"]: r for r in map(json.loads, (tmp_path / "a/metrics.jsonl").read_text().splitlines())}
    rec_b = {r["step"]: r for r in map(json.loads, (tmp_path / "b/metrics.jsonl").read_text().splitlines())}
    assert all(rec_a[s]["loss"] == rec_b[s]["loss"] for s in range(10, 21, 2))


def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(ToyTask(), Points(), config(), tmp_path / "none", resume=True, progress=False)
    train(ToyTask(), Points(), config(), tmp_path / "run", until=4, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(ToyTask(), Points(), config(), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(ToyTask(), Points(), config(batch_size=32), tmp_path / "run", resume=True, progress=False)
    # a longer run may continue a shorter one
    res = train(ToyTask(), Points(), config(steps=16), tmp_path / "run", resume=True, progress=False)
    assert res.step == 16


def test_checkpoints_are_complete_and_pruned(tmp_path):
    res = train(ToyTask(), Points(), config(), tmp_path, progress=False)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000008", "step-00000012"]  # keep_checkpoints=2
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-00000012"
    assert res.checkpoint == latest_checkpoint(tmp_path)
    # a half-written checkpoint (no state.json) is never taken for a complete one
    (tmp_path / "checkpoints/step-00000099").mkdir()
    (tmp_path / "checkpoints/.tmp-step-00000100-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000012"
    state = json.loads((res.checkpoint / "state.json").read_text())
    assert state["step"] == 12 and state["config"]["batch_size"] == 16
    # optimizer state loads with weights_only (no code in our checkpoints)
    torch.load(res.checkpoint / "optimizer.pt", weights_only=True)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6, 8, 10, 12]
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "final/toy.pt").is_file()


def test_non_finite_losses_are_skipped_then_stop(tmp_path):
    task = ToyTask(nan_at=(3, 5))
    res = train(task, Points(), config(), tmp_path / "skip", progress=False)
    assert res.bad_steps == 2 and res.step == 12
    for v in weights(res.checkpoint / "model.safetensors").values():
        assert torch.isfinite(v).all()
    # too many in a row: stop with a message; the last good checkpoint (step 4) stays
    task = ToyTask(nan_at=tuple(range(6, 13)))
    with pytest.raises(TrainingDiverged, match="step-00000004"):
        train(task, Points(), config(max_bad_steps=3), tmp_path / "stop", progress=False)
    assert latest_checkpoint(tmp_path / "stop").name == "step-00000004"


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, monkeypatch, capsys):
    """Autocast emulates bf16 on x86 CPUs without avx512_bf16 or AMX, slower than fp32: say so, with the fix."""
    import platform

    from sfumato.training import loop

    cpu = torch.device("cpu")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not loop.bf16_is_fast(cpu)
    res = train(ToyTask(), Points(), config(steps=2, precision="bf16"), tmp_path / "slow", progress=False)
    assert res.step == 2 and "--precision fp32" in capsys.readouterr().err
    train(ToyTask(), Points(), config(steps=2), tmp_path / "fp32", progress=False)
    assert "--precision fp32" not in capsys.readouterr().err  # fp32 runs say nothing
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert loop.bf16_is_fast(cpu)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")  # not checked off x86: no warning
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert loop.bf16_is_fast(cpu)


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_batch_size_must_divide(tmp_path):
    with pytest.raises(ValueError, match="multiple of 3"):
        train(ToyTask(), Points(), config(batch_size=16, grad_accum=3), tmp_path, progress=False)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(ToyTask(), Points(8), config(), tmp_path, progress=False)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """4 micro-steps of 4 = one step of 16 (the loss is a per-example mean), up to float rounding."""
    cfg = config(ema_decay=None, steps=6, checkpoint_every=6)
    a = train(ToyTask(), Points(), cfg, tmp_path / "a", progress=False)
    b = train(ToyTask(), Points(), config(ema_decay=None, steps=6, checkpoint_every=6, grad_accum=4),
              tmp_path / "b", progress=False)  # fmt: skip
    wa, wb = weights(a.checkpoint / "model.safetensors"), weights(b.checkpoint / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo) against one with the same global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    # no dropout: it draws from each process's own global RNG, which no process count can make equal
    task = ToyTask()
    task.module.dropout.p = 0.0
    train(task, Points(), config(ema_decay=None, steps=6, checkpoint_every=6), out, progress=False)


def test_ddp_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    task = ToyTask()
    task.module.dropout.p = 0.0
    one = train(task, Points(), config(ema_decay=None, steps=6, checkpoint_every=6), tmp_path / "one",
                progress=False)  # fmt: skip
    w1 = weights(one.checkpoint / "model.safetensors")
    w2 = weights(latest_checkpoint(tmp_path / "ddp") / "model.safetensors")
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"\nDDP (2 processes x 8) vs 1 process x 16 after 6 steps: max |Δw| = {worst:.1e}")
    assert worst <= 1e-5
    assert math.isfinite(worst)
