"""Shared helpers of the benchmarks: threads, alternating timing, FLOP counting, matmul rate, peak memory.

Method, the same in every script:
- **Time**: after warm-up, the implementations run *alternately* in one process (ours, diffusers, ours, ...),
  so background load on the machine falls on both alike; the median of each is reported.
- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over one call (2 x multiply-adds of matmuls,
  convolutions and attention; norms and activations are not counted). It does not see CPU
  `scaled_dot_product_attention`, so FLOPs are counted on the reference model with its explicit-softmax
  attention (diffusers `AttnProcessor`, transformers "eager"); both implementations compute the same
  products, so the same count is used for both.
- **Matmul rate**: a square float32 matmul timed in the same run, the ceiling to compare GFLOP/s with.
- **Peak memory**: in-process peak RSS cannot separate two models living in one process, so each
  implementation loads its saved weights and runs once in a fresh subprocess (`child_peak`), which reports
  its peak RSS (/proc VmHWM: whole process, imports included) and its RSS just after imports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only, one repeat: a smoke test")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs of each implementation")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    return ap


def set_threads(threads: int | None) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load {load:.1f}, {datetime.datetime.now():%Y-%m-%d %H:%M}")  # fmt: skip


def matmul_gflops(n: int = 4096, repeat: int = 3) -> float:
    """Best-of rate of an (n, n) @ (n, n) float32 matmul, GFLOP/s (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_gflops(fn: Callable) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def alternate(fns: dict[str, Callable], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run in turn `repeat` times after `warmup` calls each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeat):
        # alternate the order too, so neither always runs right after the other's cache footprint
        names = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in names:
            times[name].append(_timed(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# peak memory in a fresh process


def _proc_status_mb(field: str) -> float | None:
    """A "<field>: N kB" line of /proc/self/status in MiB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; NaN elsewhere)."""
    mb = _proc_status_mb("VmRSS")
    return float("nan") if mb is None else mb


def peak_mb() -> float:
    """Peak resident set size of this process in MiB: /proc's VmHWM, which starts afresh at exec (ru_maxrss
    would carry over the parent's peak from before the fork)."""
    mb = _proc_status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if mb is None else mb  # KiB on Linux


def child_argv(n: int) -> list[str] | None:
    """In a `child_peak` subprocess: set its thread count and return the n arguments after --child; in the
    parent (no --child on the command line): None."""
    if "--child" not in sys.argv:
        return None
    set_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    i = sys.argv.index("--child")
    return sys.argv[i + 1 : i + 1 + n]


def child_peak(script: str, args: list[str], threads: int) -> dict:
    """Run `script --child ARGS` in a fresh interpreter; it prints one JSON line with its memory figures."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, script, "--child", *args, "--threads", str(threads)],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"memory child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_report(base_mb: float) -> None:
    """Called at the end of a child: whole-process peak, and peak above the RSS after imports."""
    print(json.dumps({"peak_mb": peak_mb(), "base_mb": base_mb}))


# ---------------------------------------------------------------------------------------------------------
# randomised reference weights


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """diffusers zero-initialises output layers and sets norms to (1, 0); make every weight count, so an
    output difference cannot hide behind a zero layer or an identity norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and p.abs().sum() == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# the table


HEADER = (f"{'benchmark':<34}{'ours s':>9}{'diff. s':>9}{'ratio':>7}{'GFLOP':>8}{'ours GF/s':>10}"
          f"{'diff GF/s':>10}{'mm GF/s':>8}{'ours MB':>9}{'diff MB':>9}{'max diff':>10}")  # fmt: skip


def row(name: str, t_ours: float, t_ref: float, gflop: float | None, mm: float, diff: float,
        mem_ours: float | None = None, mem_ref: float | None = None) -> str:  # fmt: skip
    gf = f"{gflop:8.1f}" if gflop else f"{'-':>8}"
    r_ours = f"{gflop / t_ours:10.1f}" if gflop else f"{'-':>10}"
    r_ref = f"{gflop / t_ref:10.1f}" if gflop else f"{'-':>10}"
    m_ours = f"{mem_ours:9.0f}" if mem_ours is not None else f"{'-':>9}"
    m_ref = f"{mem_ref:9.0f}" if mem_ref is not None else f"{'-':>9}"
    return (f"{name:<34}{t_ours:9.3f}{t_ref:9.3f}{t_ours / t_ref:7.2f}{gf}{r_ours}{r_ref}{mm:8.0f}"
            f"{m_ours}{m_ref}{diff:10.1e}")  # fmt: skip
