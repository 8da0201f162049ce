"""The opt-in faster-than-exact / lower-memory modes, each with its speed-up and its measured output error.

- **int8**: `models.quant.quantize_linears_` (int8 weights per output channel, inputs per row, `torch._int_mm`)
  on the Linear layers (what `StableDiffusion(int8=True)` does) of the U-Net (one CFG step) and of the ViT-L
  text encoder, and torch.ao's `quantize_dynamic` that it replaced; against our float32 model, alternately.
  Error: max |Δ| and relative L2 of the output.
- **compile**: the U-Net compiled as `compile=True` compiles it on the CPU (`Module.compile(dynamic=False)` with
  inductor's `freezing` and `cpp_wrapper`); the first call's time is the warm-up cost; then alternately against
  eager, and against diffusers' U-Net with the same weights, eager and compiled the same way. Error: max |Δ|.
- **bfloat16**: the U-Net with bfloat16 weights and inputs (`StableDiffusion(dtype=torch.bfloat16)`), against
  our float32 model and against diffusers' U-Net cast to bfloat16 the same way, alternately; each also in the
  channels_last memory format (`model.to(memory_format=torch.channels_last)`, inputs likewise), which oneDNN
  convolves without re-laying out activations. Worth it only where the CPU multiplies bfloat16 natively
  (AVX512-BF16, AMX): elsewhere it is slower than float32. Error: max |Δ| and relative L2 against our float32
  output.
- **tiled VAE decode** (`AutoencoderKL.decode_tiled`, `vae_tiling=True`: 64-latent tiles, 16 overlap) of a
  1024² image against the full decode, each in a fresh process for its peak RSS; seam error: max and mean
  |Δ| in 8-bit levels and PSNR of the tiled image against the full one. Random weights (the SD VAE
  configuration): GroupNorm statistics of a random decoder vary more from tile to tile than a trained
  one's, so this error is a pessimistic figure.
- **preview decoder** (`models.preview`, a bundle's optional `preview_decoder.safetensors`): the cost of a
  live preview. Against the SD VAE decoder at 512² (random weights: speed only), and against the shipped
  model's VAE, whose preview decoder is trained (`sfumato train preview`): speed and PSNR of the preview
  against the full decode, on the latents of 64 unseen shapes images.
Weights: those of unet_step.py / vae_clip.py (diffusers-built, converted).

    .venv/bin/python benchmarks/speed_options.py [--quick] [--threads 2] [--repeat 3]
        [--only int8,compile,bf16,tiled,preview]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
import unet_step  # noqa: E402
import vae_clip  # noqa: E402


def unet_case(case: str):
    config, side, tokens = unet_step.CASES[case]
    model = unet_step.ours_from(unet_step.reference(unet_step.shipped_config() if config is None else config))
    x, t, ctx = unet_step.inputs(model.config.in_channels, side, tokens, model.config.context_dim)
    return model, (x, t, ctx)


def quantized(model):
    from sfumato.models.quant import quantize_linears_

    q = copy.deepcopy(model)
    quantize_linears_(q)
    return q


def report(name: str, med: dict, out: dict, fast: str, extra: str = "") -> None:
    a, b = out["exact"].double(), out[fast].double()
    rel = ((a - b).norm() / a.norm()).item()
    print(f"  {name:<34} float32 {med['exact']:8.3f} s  {fast} {med[fast]:8.3f} s  speed-up x{med['exact'] / med[fast]:.2f}"
          f"  max |Δ| {(a - b).abs().max().item():.1e}  rel L2 {rel:.1e}{extra}", flush=True)  # fmt: skip


def timed(fns: dict, repeat: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds and last output of each no-argument callable, run alternately."""
    out = {}
    calls = {k: (lambda k=k, f=f: out.__setitem__(k, f())) for k, f in fns.items()}
    with torch.inference_mode():
        return _bench.alternate(calls, repeat), out


def ao_quantized(model):
    """What the int8 mode used before: torch.ao's deprecated dynamic quantisation (per-tensor activations)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def int8_calls(case: str) -> dict:
    if case == "clip-vit-l":
        model = vae_clip.ours_text(vae_clip.reference_text())
        ids, q, ao = vae_clip.inputs(case), quantized(model), ao_quantized(model)
        return {"exact": lambda: model(ids).last_hidden_state, "int8": lambda: q(ids).last_hidden_state,
                "torch.ao-int8": lambda: ao(ids).last_hidden_state}  # fmt: skip
    model, args = unet_case(case)
    q, ao = quantized(model), ao_quantized(model)
    return {"exact": lambda: model(*args), "int8": lambda: q(*args), "torch.ao-int8": lambda: ao(*args)}


def bench_int8(cases: list[str], repeat: int) -> None:
    print("int8 dynamic quantisation of Linear layers (ours, and torch.ao's quantize_dynamic that it replaced):")
    for case in cases:
        med, out = timed(int8_calls(case), repeat)
        report(case, med, out, "int8")
        report(case, med, out, "torch.ao-int8")


def compile_calls(case: str) -> tuple[dict, dict[str, float]]:
    """Ours and diffusers' U-Net (same weights), each eager and compiled as `optimize(compile=True)` compiles on
    the CPU (`Module.compile(dynamic=False)`, called under inductor's `CPU_COMPILE_OPTIONS`: freezing and the
    C++ wrapper); and each first call's time."""
    import torch._inductor.config as inductor_config

    from sfumato.pipelines.stable_diffusion import CPU_COMPILE_OPTIONS

    config, side, tokens = unet_step.CASES[case]
    ref = unet_step.reference(unet_step.shipped_config() if config is None else config).eval()
    model = unet_step.ours_from(ref)
    x, t, ctx = unet_step.inputs(model.config.in_channels, side, tokens, model.config.context_dim)
    ours_c, ref_c = copy.deepcopy(model), copy.deepcopy(ref)
    ours_c.compile(dynamic=False)
    ref_c.compile(dynamic=False)

    def frozen(fn):
        def call():
            with inductor_config.patch(CPU_COMPILE_OPTIONS):
                return fn()

        return call

    fns = {
        "exact": lambda: model(x, t, ctx),
        "compiled": frozen(lambda: ours_c(x, t, ctx)),
        "diffusers": lambda: ref(x, t, ctx).sample,
        "diffusers-compiled": frozen(lambda: ref_c(x, t, ctx).sample),
    }
    warm = {}
    with torch.inference_mode():
        for name in ("compiled", "diffusers-compiled"):
            t0 = time.perf_counter()
            fns[name]()
            warm[name] = time.perf_counter() - t0
    return fns, warm


def bench_compile(cases: list[str], repeat: int) -> None:
    print("torch.compile as optimize(compile=True) does it (inductor, static shapes, freezing, C++ wrapper), "
          "ours and diffusers' U-Net:")  # fmt: skip
    for case in cases:
        fns, warm = compile_calls(case)
        reps = repeat if case.startswith("sd15") else max(repeat, 30)  # 20-50 ms calls: more of them
        med, out = timed(fns, reps)
        report(case, med, out, "compiled", f"  first call (compilation) {warm['compiled']:.1f} s")
        print(f"  {'':<34} compiled / diffusers eager {med['compiled'] / med['diffusers']:.2f}"
              f"  (diffusers {med['diffusers']:.3f} s); compiled / diffusers compiled "
              f"{med['compiled'] / med['diffusers-compiled']:.2f} (diffusers compiled {med['diffusers-compiled']:.3f} s,"
              f" first call {warm['diffusers-compiled']:.1f} s); max |Δ| ours compiled - diffusers compiled "
              f"{_bench.max_diff(out['compiled'], out['diffusers-compiled']):.1e}", flush=True)  # fmt: skip


def bf16_calls(case: str) -> dict:
    config, side, tokens = unet_step.CASES[case]
    ref = unet_step.reference(unet_step.shipped_config() if config is None else config)
    model = unet_step.ours_from(ref)
    x, t, ctx = unet_step.inputs(model.config.in_channels, side, tokens, model.config.context_dim)
    cl = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
    fp32_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_cl = copy.deepcopy(half).to(memory_format=torch.channels_last)
    ref = ref.to(torch.bfloat16).eval()
    xb, cb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
    return {
        "exact": lambda: model(x, t, ctx),
        "channels_last": lambda: fp32_cl(cl(x), t, ctx),
        "bf16": lambda: half(xb, t, cb).float(),
        "bf16+channels_last": lambda: half_cl(cl(xb), t, cb).float(),
        "diffusers-bf16": lambda: ref(xb, t, encoder_hidden_states=cb).sample.float(),
    }


def bench_bf16(cases: list[str], repeat: int) -> None:
    import warnings

    print("bfloat16 weights and activations, and the channels_last memory format (U-Net step), against our "
          "float32 (contiguous NCHW) and diffusers' U-Net cast to bfloat16:")  # fmt: skip
    for case in cases:
        with warnings.catch_warnings():  # diffusers: "modules that should be kept in float32: []"
            warnings.simplefilter("ignore")
            med, out = timed(bf16_calls(case), repeat)
        for mode in ("channels_last", "bf16", "bf16+channels_last"):
            extra = f"  ours/diffusers in bf16 {med['bf16'] / med['diffusers-bf16']:.2f}" if mode == "bf16" else ""
            report(case, med, out, mode, extra)


def child(mode: str, weights: str, side: str, tile: str, out_path: str) -> None:
    from sfumato.checkpoints.native import load_model

    base = _bench.rss_mb()
    vae = load_model(weights)
    z = torch.randn(1, 4, int(side) // 8, int(side) // 8, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = vae.decode(z) if mode == "full" else vae.decode_tiled(z, int(tile), int(tile) // 4)
    seconds = time.perf_counter() - t0
    torch.save(x, out_path)
    print(f'{{"seconds": {seconds}, "peak_mb": {_bench.peak_mb()}, "base_mb": {base}}}')


def bench_tiled(side: int, tile: int, threads: int) -> None:
    from sfumato.checkpoints.native import save_model

    print(
        f"tiled VAE decode, {side}² image ({side // 8}² latents), {tile}-latent tiles, {tile // 4} overlap:"
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "vae.safetensors")
        save_model(vae_clip.ours_vae(vae_clip.reference_vae()), weights)
        res, img = {}, {}
        for mode in ("full", "tiled"):
            out_path = str(Path(tmp) / f"{mode}.pt")
            res[mode] = _bench.child_peak(__file__, [mode, weights, str(side), str(tile), out_path], threads)
            img[mode] = torch.load(out_path).double().clamp(-1, 1)
    for mode in ("full", "tiled"):
        print(f"  {mode:<6} {res[mode]['seconds']:8.1f} s   peak RSS {res[mode]['peak_mb']:7.0f} MB "
              f"(after imports {res[mode]['base_mb']:.0f} MB)")  # fmt: skip
    d = (img["tiled"] - img["full"]).abs() * 127.5  # [-1, 1] -> 8-bit levels
    psnr = 10 * torch.log10(255**2 / (d**2).mean()).item()
    print(f"  seam error vs full decode: max |Δ| {d.max().item():.1f}/255, mean |Δ| {d.mean().item():.2f}/255, "
          f"PSNR {psnr:.1f} dB")  # fmt: skip


def bench_preview(side: int, repeat: int) -> None:
    from sfumato.checkpoints.bundle import load_bundle
    from sfumato.data import load_dataset
    from sfumato.models.preview import PreviewDecoder, PreviewDecoderConfig
    from sfumato.pipelines import default_model
    from sfumato.training.vae import psnr

    print("preview decoder against the VAE decoder:")
    vae = vae_clip.ours_vae(vae_clip.reference_vae())
    preview = PreviewDecoder(PreviewDecoderConfig.for_vae(vae.config)).eval()
    z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(1))
    med, _ = timed({"exact": lambda: vae.decode(z), "preview": lambda: preview(z)}, repeat)
    gflop = [_bench.count_gflops(lambda m=m: m(z)) for m in (vae.decode, preview)]
    print(f"  {f'SD VAE {side}² (random weights)':<34} VAE {med['exact']:8.3f} s  preview {med['preview']:8.4f} s  "
          f"speed-up x{med['exact'] / med['preview']:.0f}  ({gflop[0]:.0f} vs {gflop[1]:.1f} GFLOP)")  # fmt: skip

    bundle = load_bundle(default_model(), dtype=torch.float32)
    if bundle.preview_decoder is None:
        print("  the shipped model has no preview decoder")
        return
    held = load_dataset("shapes:7", image_size=32, size=64)
    x = torch.stack([held[i]["image"] for i in range(64)])
    with torch.inference_mode():
        z = bundle.vae.encode(x).mode()
    med, out = timed({"exact": lambda: bundle.vae.decode(z), "preview": lambda: bundle.preview_decoder(z)}, repeat)
    quality = psnr(out["exact"].clamp(-1, 1), out["preview"]).mean().item()
    print(f"  {'shipped model, 64 x 32²':<34} VAE {med['exact']:8.3f} s  preview {med['preview']:8.4f} s  "
          f"speed-up x{med['exact'] / med['preview']:.1f}  PSNR of the preview vs the VAE's decode "
          f"{quality:.1f} dB")  # fmt: skip


def main() -> None:
    if (argv := _bench.child_argv(5)) is not None:
        return child(*argv)
    ap = _bench.parser(__doc__)
    ap.add_argument("--only", default="int8,compile,bf16,tiled,preview")
    ap.add_argument("--bf16-cases", default="sd15-512,sd15-256,shipped-32px")
    ap.add_argument("--int8-cases", default="sd15-256,shipped-32px,clip-vit-l")
    ap.add_argument("--compile-cases", default="shipped-32px,sd15-256")
    args = ap.parse_args()
    threads = _bench.set_threads(args.threads)
    repeat = args.repeat or (1 if args.quick else 3)
    print(_bench.machine())
    print(f"medians of {repeat} alternating runs")
    only = args.only.split(",")
    if "int8" in only:
        bench_int8(["shipped-32px"] if args.quick else args.int8_cases.split(","), repeat)
    if "compile" in only:
        bench_compile(["shipped-32px"] if args.quick else args.compile_cases.split(","), repeat)
    if "bf16" in only:
        bench_bf16(["shipped-32px"] if args.quick else args.bf16_cases.split(","), repeat)
    if "tiled" in only:
        bench_tiled(256 if args.quick else 1024, 16 if args.quick else 64, threads)
    if "preview" in only:
        bench_preview(256 if args.quick else 512, repeat)


if __name__ == "__main__":
    main()
