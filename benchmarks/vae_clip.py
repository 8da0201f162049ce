"""VAE decode and encode at 256² and 512², and the CLIP ViT-L/14 text encoder, against diffusers / transformers.

The SD VAE (kl-f8: the published vae/config.json of SD 1.5, random weights, every norm randomised) is built by
diffusers and converted by our keymaps; batch 1. The text encoder is transformers' CLIPTextModel at the
openai/clip-vit-large-patch14 configuration (random weights) on a CFG batch of 2 x 77 tokens. Both run under
`torch.inference_mode()`, alternately after warm-up. Peak memory: each loads the saved folder in a fresh
process and runs once (see _bench.py).

    .venv/bin/python benchmarks/vae_clip.py [--quick] [--threads 2] [--repeat 3] [--cases decode-512,...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402

# stable-diffusion-v1-5 vae/config.json (the entries that differ from diffusers' defaults)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)
# openai/clip-vit-large-patch14 text_config
VIT_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
CASES = ["decode-256", "decode-512", "encode-256", "encode-512", "clip-vit-l"]


def reference_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return _bench.randomize_(AutoencoderKL(**SD_VAE))


def ours_vae(ref):
    from sfumato.checkpoints.keymaps import vae_config_from_diffusers, vae_from_diffusers
    from sfumato.models.vae import AutoencoderKL

    config = vae_config_from_diffusers(dict(ref.config))
    model = AutoencoderKL(config).eval()
    model.load_state_dict(vae_from_diffusers(ref.state_dict(), config), strict=True)
    return model


def reference_text():
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**VIT_L_TEXT)
    return _bench.randomize_(transformers.CLIPTextModel(config))


def ours_text(ref):
    from sfumato.checkpoints.clip_keys import from_transformers
    from sfumato.checkpoints.diffusers_folder import text_config_from_transformers
    from sfumato.models.clip import CLIPTextModel

    cfg = {k: v for k, v in ref.config.to_dict().items() if v is not None}
    model = CLIPTextModel(text_config_from_transformers(cfg)).eval()
    model.load_state_dict(from_transformers(ref.state_dict()), strict=True)
    return model


def inputs(case: str):
    g = torch.Generator().manual_seed(1)
    kind, size = case.split("-", 1)
    if kind == "decode":
        return torch.randn(1, 4, int(size) // 8, int(size) // 8, generator=g)
    if kind == "encode":
        return torch.rand(1, 3, int(size), int(size), generator=g) * 2 - 1
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 20:] = 49406, 49407  # start token, 19 words, end token and padding
    return ids


def calls(case: str, ours, ref):
    """(ours, reference) callables of one case, each returning the output tensor."""
    x = inputs(case)
    if case.startswith("decode"):
        return (lambda: ours.decode(x)), (lambda: ref.decode(x).sample)
    if case.startswith("encode"):
        return (lambda: ours.encode(x).mean), (lambda: ref.encode(x).latent_dist.mean)
    return (lambda: ours(x).last_hidden_state), (lambda: ref(x).last_hidden_state)


def child(impl: str, folder: str, case: str) -> None:
    base = _bench.rss_mb()
    is_text = case.startswith("clip")
    if impl == "ours":
        from sfumato.checkpoints.diffusers_folder import load_diffusers_vae, load_transformers_text_encoder

        model = load_transformers_text_encoder(folder) if is_text else load_diffusers_vae(folder)
        fn = calls(case, model, None)[0]
    else:
        if is_text:
            import transformers

            model = transformers.CLIPTextModel.from_pretrained(folder).eval()
        else:
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_pretrained(folder).eval()
        fn = calls(case, None, model)[1]
    with torch.inference_mode():
        fn()
    _bench.child_report(base)


def measure(case: str, ours, ref, repeat: int) -> tuple[float, dict[str, float], float]:
    """GFLOP of one call, median seconds of each implementation, max output difference."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    run_ours, run_ref = calls(case, ours, ref)
    with torch.inference_mode():
        if case.startswith("clip"):
            ref.set_attn_implementation("eager")  # explicit softmax, which the FLOP counter sees
            gflop = _bench.count_gflops(run_ref)
            ref.set_attn_implementation("sdpa")
        else:
            ref.set_attn_processor(AttnProcessor())
            gflop = _bench.count_gflops(run_ref)
            ref.set_attn_processor(AttnProcessor2_0())
        out = {}
        med = _bench.alternate({"ours": lambda: out.__setitem__("ours", run_ours()),
                                "ref": lambda: out.__setitem__("ref", run_ref())}, repeat)  # fmt: skip
    return gflop, med, _bench.max_diff(out["ours"], out["ref"])


def main() -> None:
    if (argv := _bench.child_argv(3)) is not None:
        return child(*argv)

    ap = _bench.parser(__doc__)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    threads = _bench.set_threads(args.threads)
    cases = ["decode-64", "encode-64", "clip-vit-l"] if args.quick else args.cases.split(",")
    repeat = args.repeat or (1 if args.quick else 3)

    print(_bench.machine())
    mm = _bench.matmul_gflops(2048 if args.quick else 4096)
    print(f"float32 matmul rate: {mm:.0f} GFLOP/s; times are medians of {repeat} alternating runs")
    print(_bench.HEADER)
    vae = text = None
    for case in cases:
        is_text = case.startswith("clip")
        if is_text:
            vae = None
            text = text or (lambda r: (r, ours_text(r)))(reference_text())
            ref, ours = text
        else:
            vae = vae or (lambda r: (r, ours_vae(r)))(reference_vae())
            ref, ours = vae
        gflop, med, diff = measure(case, ours, ref, repeat)
        mem = (None, None)
        if not args.no_memory:
            with tempfile.TemporaryDirectory() as tmp:
                ref.save_pretrained(tmp)
                mem = tuple(_bench.child_peak(__file__, [impl, tmp, case], threads)["peak_mb"]
                            for impl in ("ours", "reference"))  # fmt: skip
        label = "text encoder ViT-L (2 x 77 tokens)" if is_text else f"vae {case.replace('-', ' ')}² (B=1)"
        print(_bench.row(label, med["ours"], med["ref"], gflop, mm, diff, *mem), flush=True)


if __name__ == "__main__":
    main()
