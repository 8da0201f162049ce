"""One training loop for every component: AdamW, warm-up + cosine LR, clipping, accumulation, EMA, mixed
precision, atomic checkpoints, exact resume, NaN skipping, JSONL metrics, previews, and DDP under torchrun.

    result = train(task, dataset, TrainConfig(steps=2000, batch_size=32), "runs/vae")
    result = train(task, dataset, config, "runs/vae", resume=True)   # continues exactly where it stopped

Exactness. Everything random is a function of (seed, step, example index): the data order (one permutation
per epoch, from the seed), augmentation (datasets derive it from (seed, epoch, index)), and the task's noise
(`BatchRandom`). The global batch of step s is the same list of examples whatever the number of processes;
rank r takes its contiguous slice of it, gradients are averaged by DDP. So a run resumed from a checkpoint
repeats bit for bit what the uninterrupted run would have done (on the CPU), and N processes with a global
batch B compute what one process computes with B, up to float summation order.

Checkpoints are folders `checkpoints/step-00001000/` (model, EMA and optimizer state, RNG states, step and
config), written under a temporary name and renamed when complete; `checkpoints/latest` names the newest.
Older ones are pruned only after the new one is complete, so an interrupted write never loses the last good one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sfumato.checkpoints.atomic import write_text_atomic
from sfumato.checkpoints.native import unshare_storage, write_safetensors
from sfumato.data import collate
from sfumato.training.task import BatchRandom, Task, example_seed

CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run (the LR schedule spans them)
    batch_size: int = 32  # global batch: all processes and accumulation micro-steps together
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    lr: float = 1e-4  # peak learning rate, reached after warm-up
    weight_decay: float = 0.01  # AdamW's decoupled weight decay (Loshchilov & Hutter 2019)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float | None = 1.0  # clip the global gradient norm to this (None: no clipping)
    ema_decay: float | None = 0.999  # EMA of the weights (None: no EMA); warmed up as min(d, (1+s)/(10+s))
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + loss scaling, CUDA only)
    seed: int = 0  # data order, augmentation and every noise draw derive from it
    log_every: int = 10  # steps between metrics lines (metrics.jsonl, and stderr when not on a terminal)
    preview_every: int = 500  # steps between previews (sample grids, reconstructions, ...); 0: only at the end
    checkpoint_every: int = 500  # steps between checkpoints; the last step always writes one
    keep_checkpoints: int = 2  # complete checkpoints kept (the newest ones)
    max_bad_steps: int = 10  # consecutive non-finite losses that stop training
    num_workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast has hardware behind it: a CUDA device that supports bf16, or an x86 CPU with
    avx512_bf16 or AMX tiles. Other CPUs (e.g. ARM) are given the benefit of the doubt."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        checks = [c for c in checks if c is not None]
        return not checks or any(c() for c in checks)
    return True


# the settings a resumed run must share with the run it continues, or it cannot repeat it exactly
_MUST_MATCH = ("batch_size", "grad_accum", "seed", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "betas")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int  # the last completed step
    out: Path
    checkpoint: Path | None  # the newest checkpoint folder
    exported: list[Path] = field(default_factory=list)  # what task.export wrote
    bad_steps: int = 0  # steps skipped for a non-finite loss
    seconds: float = 0.0  # wall time of this call
    images_per_s: float = 0.0  # training throughput of this call (global batch images)


# ---------------------------------------------------------------------------------------------------------
# processes


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    initialised_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        initialised_here = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local, initialised_here)


def _device(cfg: TrainConfig, d: _Dist) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.world > 1:
        name = f"cuda:{d.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _all_true(flag: bool, d: _Dist, device: torch.device) -> bool:
    """True when `flag` holds on every process (so all processes skip or take a step together)."""
    if d.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


# ---------------------------------------------------------------------------------------------------------
# data order


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(example_seed(seed, epoch, -1, stream=7)))


def _step_indices(n: int, batch: int, seed: int, step: int) -> tuple[int, list[int]]:
    """(epoch, global example indices) of optimizer step `step` (1-based); incomplete last batches dropped."""
    per_epoch = n // batch
    epoch, j = divmod(step - 1, per_epoch)
    return epoch, _permutation(n, seed, epoch)[j * batch : (j + 1) * batch].tolist()


class _Items(torch.utils.data.Dataset):
    """Serves lists of indices (one micro-batch each) as collated batches, in DataLoader workers if asked."""

    def __init__(self, dataset, batches: list[list[int]]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        return collate([self.dataset[i] for i in self.batches[k]])


# ---------------------------------------------------------------------------------------------------------
# learning rate, EMA


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then a cosine to `min_lr_ratio` at `steps` (Loshchilov &
    Hutter 2017, without restarts). `step` counts optimizer steps taken so far (0 before the first)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 - decay)·model for floating-point parameters and buffers; other buffers copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        if e.dtype.is_floating_point:
            e.lerp_(b, 1 - decay)
        else:
            e.copy_(b)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors as safetensors takes them: own storage (tied weights copied), contiguous, CPU."""
    state = unshare_storage({k: v.detach() for k, v in module.state_dict().items()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def _save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    ema: nn.Module | None,
    opt: torch.optim.Optimizer,
    scaler,
    cfg: TrainConfig,
    task: Task,
    rng_states: list[dict[str, torch.Tensor]],
    extra: dict,
) -> Path:
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"step": str(step), "task": task.name}
    write_safetensors(_state_dict(model), tmp / "model.safetensors", meta)
    if ema is not None:
        write_safetensors(_state_dict(ema), tmp / "ema.safetensors", meta)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors, numbers and tuples: weights_only loads it
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng = {f"rank{r}.{k}": v for r, s in enumerate(rng_states) for k, v in s.items()}
    write_safetensors(rng, tmp / "rng.safetensors", None)
    state = {"step": step, "task": task.name, "config": asdict(cfg), "world_size": len(rng_states), **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")  # written last: marks completeness
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a checkpoint of this step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / "latest", final.name + "\n")
    for old in list_checkpoints(out)[: -cfg.keep_checkpoints]:  # only after the new one is complete
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model, ema, opt, scaler, d: _Dist) -> dict:
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(path / "model.safetensors"))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"{path} has no EMA weights but ema_decay is set; resume with the same settings")
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    opt.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = load_file(path / "rng.safetensors")
    mine = f"rank{d.rank}." if f"rank{d.rank}.torch" in rng else "rank0."
    torch.set_rng_state(rng[mine + "torch"])
    if mine + "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[mine + "cuda"])
    return state


# ---------------------------------------------------------------------------------------------------------
# the loop


class _Log:
    """metrics.jsonl on the main process, a tqdm bar on terminals, plain lines otherwise."""

    def __init__(self, out: Path, total: int, start: int, main: bool, progress: bool | None):
        self.main = main
        self.file = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115 - closed in close()
        if progress is None:
            progress = sys.stderr.isatty()
        self.bar = None
        if main and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        self.plain = main and not progress

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.1f}")
        elif self.plain:
            extras = " ".join(
                f"{k} {v:.4g}" for k, v in record.items()
                if k not in ("step", "loss", "lr", "time", "images_per_s") and isinstance(v, float)
            )  # fmt: skip
            print(
                f"step {record['step']}: loss {record['loss']:.4g} lr {record['lr']:.3g} "
                f"{record['images_per_s']:.1f} img/s {extras}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loss_curve(out: Path) -> Path | None:
    from sfumato.eval.plots import line_plot

    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]
    losses = [v for v in losses if math.isfinite(v)]
    return line_plot(losses, out / "loss.png", title="training loss (per logged step)") if losses else None


def train(
    task: Task,
    dataset,
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool | None = None,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `task.trainable()` on `dataset` for `cfg.steps` optimizer steps, writing to the folder `out`.

    resume: continue from the newest complete checkpoint in `out` (an error if there is none).
    until: stop after this step (with a checkpoint), e.g. to split a run over sessions; the LR schedule
    still spans cfg.steps. callback(record) receives every logged metrics record.
    Under torchrun the process group is joined from the environment; only rank 0 writes files.
    """
    out = Path(out)
    d = _init_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    device = _device(cfg, d)
    if cfg.batch_size % (d.world * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide into {d.world} processes x {cfg.grad_accum} micro-steps; "
            f"use a multiple of {d.world * cfg.grad_accum}"
        )
    micro = cfg.batch_size // (d.world * cfg.grad_accum)
    n = len(dataset)
    if n < cfg.batch_size:
        raise ValueError(f"the dataset has {n} items, fewer than one global batch of {cfg.batch_size}")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on the CPU")
    if cfg.precision == "bf16" and d.main and not bf16_is_fast(device):
        print(f"warning: precision bf16 on {device}, which has no bf16 instructions (x86: avx512_bf16 or AMX): "
              "autocast emulates it and runs slower than fp32; pass --precision fp32", file=sys.stderr)

    trainable = task.trainable().to(device)
    ema = copy.deepcopy(trainable).eval().requires_grad_(False) if cfg.ema_decay is not None else None
    params = [p for p in trainable.parameters() if p.requires_grad]
    # no weight decay on biases and norm gains (1-D tensors), as is usual for AdamW
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    start = 0
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint in {out / CHECKPOINTS}; start without --resume to train anew"
            )
        saved = json.loads((checkpoint / "state.json").read_text())
        before = TrainConfig.from_dict(saved["config"])
        diff = {k: (getattr(before, k), getattr(cfg, k)) for k in _MUST_MATCH if getattr(before, k) != getattr(cfg, k)}
        if diff:
            raise ValueError(
                f"cannot resume {checkpoint} exactly: settings changed {diff} (saved, now); use the saved values"
            )
        if saved["task"] != task.name:
            raise ValueError(f"{checkpoint} is a {saved['task']} run, not {task.name}")
        state = _load_checkpoint(checkpoint, trainable, ema, opt, scaler, d)
        start = state["step"]
    elif d.main and latest_checkpoint(out) is not None:
        raise FileExistsError(
            f"{out} already holds checkpoints; pass --resume to continue it, or choose another --out"
        )

    model: nn.Module = trainable
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
        if cfg.precision != "fp32"
        else contextlib.nullcontext()
    )
    last = min(cfg.steps, until) if until is not None else cfg.steps
    log = _Log(out, cfg.steps, start, d.main, progress)
    bad_streak, bad_total = 0, int(state.get("bad_steps", 0)) if resume else 0
    window: dict[str, list[float]] = {}
    t_start, t_window, done_in_window = time.perf_counter(), time.perf_counter(), 0
    steps_run = 0
    if d.main:
        (out / "config.json").write_text(json.dumps({"task": task.name, "train": asdict(cfg)}, indent=2) + "\n")

    def checkpoint_now(step: int) -> Path | None:
        states = [_rng_state()]
        if d.world > 1:
            import torch.distributed as dist

            gathered: list = [None] * d.world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        path = None
        if d.main:
            path = _save_checkpoint(out, step, trainable, ema, opt, scaler, cfg, task, states,
                                    {"bad_steps": bad_total})  # fmt: skip
        if d.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return path

    step = start
    try:
        while step < last:
            # one epoch's worth of remaining steps per DataLoader, so datasets see their epoch
            epoch, _ = _step_indices(n, cfg.batch_size, cfg.seed, step + 1)
            per_epoch = n // cfg.batch_size
            epoch_last = min(last, (epoch + 1) * per_epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            plan = []
            for s in range(step + 1, epoch_last + 1):
                _, idx = _step_indices(n, cfg.batch_size, cfg.seed, s)
                mine = idx[d.rank * micro * cfg.grad_accum : (d.rank + 1) * micro * cfg.grad_accum]
                plan += [mine[k * micro : (k + 1) * micro] for k in range(cfg.grad_accum)]
            loader = torch.utils.data.DataLoader(
                _Items(dataset, plan), batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                # its own generator: a DataLoader otherwise draws its worker seed from the global RNG,
                # which a resumed run (new loader mid-epoch) would then replay differently (e.g. dropout)
                generator=torch.Generator().manual_seed(example_seed(cfg.seed, epoch, -1, stream=11)),
            )  # fmt: skip
            it = iter(loader)
            for s in range(step + 1, epoch_last + 1):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(s - 1, cfg)
                model.train()
                opt.zero_grad(set_to_none=True)
                metrics: dict[str, float] = {}
                finite = True
                for k in range(cfg.grad_accum):
                    batch = _to_device(next(it), device)
                    rng = BatchRandom(cfg.seed, s, batch["index"].tolist())
                    sync = contextlib.nullcontext()
                    if d.world > 1 and k < cfg.grad_accum - 1:
                        sync = model.no_sync()
                    with sync:
                        with autocast:
                            loss, m = task.loss(batch, rng, s, model)
                        loss = loss.float()
                        finite = finite and bool(torch.isfinite(loss))
                        scaled = loss / cfg.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    for key, v in {"loss": loss.item(), **m}.items():
                        metrics[key] = metrics.get(key, 0.0) + float(v) / cfg.grad_accum
                if scaler is not None:
                    scaler.unscale_(opt)
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if cfg.grad_clip is not None
                    else torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params if p.grad is not None])
                    )
                )
                finite = finite and bool(torch.isfinite(grad_norm))
                if _all_true(finite, d, device):
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    if ema is not None:
                        ema_update(ema, trainable, min(cfg.ema_decay, (1 + s) / (10 + s)))
                    bad_streak = 0
                else:  # skip the update; every process agrees (all-reduced flag)
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.update()
                    bad_streak += 1
                    bad_total += 1
                    if bad_streak >= cfg.max_bad_steps:
                        good = latest_checkpoint(out)
                        raise TrainingDiverged(
                            f"{bad_streak} non-finite losses in a row at step {s} (loss {metrics.get('loss')}); "
                            f"stopped. The last good checkpoint is {good}; lower the learning rate or use fp32"
                        )
                step = s
                steps_run += 1
                done_in_window += 1
                log.step()
                metrics["grad_norm"] = float(grad_norm)
                for key, v in metrics.items():
                    window.setdefault(key, []).append(v)
                if s % cfg.log_every == 0 or s == last:
                    now = time.perf_counter()
                    record = {"step": s, "lr": opt.param_groups[0]["lr"], "time": now - t_start}
                    record |= {k: sum(v) / len(v) for k, v in window.items() if v}
                    record["images_per_s"] = done_in_window * cfg.batch_size / max(now - t_window, 1e-9)
                    record["bad_steps"] = bad_total
                    log.write(record)
                    if callback is not None and d.main:
                        callback(record)
                    window, t_window, done_in_window = {}, now, 0
                if s % cfg.checkpoint_every == 0 or s == last:
                    checkpoint = checkpoint_now(s)
                if d.main and ((cfg.preview_every and s % cfg.preview_every == 0) or s == cfg.steps):
                    task.preview(ema if ema is not None else trainable, s, out / "samples")
                    _loss_curve(out)
    except KeyboardInterrupt:
        if step > start and (checkpoint is None or not checkpoint.name.endswith(f"{step:08d}")):
            checkpoint = checkpoint_now(step)
            if d.main:
                print(f"\ninterrupted: checkpoint at step {step} in {checkpoint}; continue with --resume",
                      file=sys.stderr)  # fmt: skip
        raise
    finally:
        log.close()

    exported: list[Path] = []
    if d.main and step == cfg.steps:
        exported = list(task.export(ema if ema is not None else trainable, out / "final") or [])
        _loss_curve(out)
    seconds = time.perf_counter() - t_start
    if d.initialised_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return TrainResult(
        step=step,
        out=out,
        checkpoint=checkpoint,
        exported=exported,
        bad_steps=bad_total,
        seconds=seconds,
        images_per_s=steps_run * cfg.batch_size / max(seconds, 1e-9),
    )
