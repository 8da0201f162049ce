"""Named training recipes and the functions behind `sfumato train vae|clip|ldm|expert|preview|matcher|ddpm|pipeline`.

A recipe is a plain dataclass: the model config, the `TrainConfig`, the data size and the objective's
settings. `RECIPES[task][name]`; "tiny" recipes are for tests and smoke runs (seconds), "shapes" is the
recipe of the model sfumato ships (trained on the built-in `shapes` dataset on 2 CPU cores).

`train_pipeline` runs VAE → CLIP → latent diffusion → high-noise expert → preview decoder → matcher into one
folder (the expert and the matcher for recipes that have them):

    OUT/vae/     the autoencoder run (final/vae.safetensors)
    OUT/clip/    the CLIP run (final/clip.safetensors, final/text_encoder.safetensors, final/tokenizer/)
    OUT/ldm/     the U-Net run (final/ = the bundle)
    OUT/expert/  the high-noise U-Net run, for recipes that have one (final/ = the bundle with both U-Nets)
    OUT/preview/ the preview decoder run (final/preview_decoder.safetensors: the VAE's decoder, distilled)
    OUT/matcher/ the image-text matcher run (final/matcher.safetensors: a head over the CLIP that picks the
                 best of K candidates, `models.matcher`)
    OUT/model/   the finished bundle, what `sfumato generate --model OUT/model` loads, with its preview
                 decoder and the full CLIP (clip.safetensors, both towers) beside it

A stage whose final export exists is skipped; with `resume=True` an interrupted stage continues from its
newest checkpoint, so an interrupted pipeline loses at most `checkpoint_every` steps.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from sfumato.checkpoints.bundle import ScheduleConfig
from sfumato.checkpoints.native import load_model
from sfumato.data import collate, load_dataset
from sfumato.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from sfumato.models.unet import UNetConfig
from sfumato.models.vae import AutoencoderKL, VAEConfig
from sfumato.text.tokenizer import CLIPTokenizer, train_bpe
from sfumato.training.loop import TrainConfig, TrainResult, latest_checkpoint, train
from sfumato.training.losses import DiscConfig


@dataclass
class VAERecipe:
    model: VAEConfig
    train: TrainConfig
    image_size: int = 32
    data_size: int = 20_000  # items of a built-in dataset (ignored for folders)
    kl_weight: float = 1e-6
    recon: str = "l1"
    disc: DiscConfig | None = None
    disc_start: int = 50_001
    channel_stats: bool = False  # per-channel latents_mean / latents_std in the export (VAETask)
    channel_scale: float = 1.0  # with them, the std of each channel of the diffusion latents
    stats_images: int = 512  # the dataset's first images, to estimate them on


@dataclass
class CLIPRecipe:
    model: CLIPConfig  # text vocab_size / eos_token_id are set from the tokenizer trained on the captions
    train: TrainConfig
    image_size: int = 32
    data_size: int = 20_000
    loss: str = "softmax"
    vocab_size: int = 1000  # BPE vocabulary learned from the training captions
    context_length: int = 32  # token positions (the shapes captions need ~20)
    hard_negatives: bool = False  # NegCLIP-style caption edits as extra negatives (`training.clip.hard_negative`)


@dataclass
class LDMRecipe:
    unet: UNetConfig  # context_dim is set from the text encoder
    train: TrainConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 32
    data_size: int = 20_000
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None
    min_snr_floor: float = 0.0  # x0-space weight clamp(SNR, floor, gamma) (diffusion.denoisers.min_snr_weight)
    high_noise_share: float = 0.0  # share of examples with t drawn from [high_noise_from, T) (LDMTask)
    high_noise_from: int = 750
    layout_steps: int | None = None  # the share and the floor apply to steps < layout_steps only (LDMTask)
    low_noise_until: int | None = None  # t drawn from [0, low_noise_until) only: the low expert's range (LDMTask)
    cache: bool = False  # encode every image and caption once (data.cache) instead of every step
    train_text_encoder: bool = False  # fine-tune (a copy of) the CLIP text tower with the U-Net (LDMTask)
    preview_prompts: tuple[str, ...] = ("a red circle", "a blue square above a green triangle", "")
    # ShapesDataset keyword arguments for this stage (position_prob, relation_prob, repeat_prob, same_color_gap); ignored for folders
    shapes_options: dict[str, float] = field(default_factory=dict)


@dataclass
class ExpertRecipe:
    """A high-noise expert for the model the ldm stage made (`training.ldm.HighNoiseExpertTask`)."""

    train: TrainConfig
    unet: UNetConfig | None = None  # None: the base U-Net's architecture; channels and context_dim follow the base
    position_freqs: int | None = None  # the expert's UNetConfig.position_freqs; None: as `unet` (or the base) has it
    mask_padding: bool = True  # cross-attention reads only the prompt's tokens (UNetConfig.mask_padding)
    context_layers: int = 0  # bidirectional layers over the text context (UNetConfig.context_layers)
    # the expert trains a copy of the base's text encoder with it and keeps it (HighNoiseExpertTask)
    train_text_encoder: bool = False
    init_from_base: bool = False  # start from the base U-Net's weights (eDiff-I), not a fresh initialisation
    boundary: int = 550  # the expert learns and serves t >= boundary; the base U-Net keeps t < boundary
    image_size: int = 32
    data_size: int = 20_000
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    min_snr_floor: float = 1.0
    cache: bool = True
    preview_prompts: tuple[str, ...] = ("a red circle at the top", "a blue square above a green triangle", "")
    shapes_options: dict[str, float] = field(default_factory=dict)
    # each example whose caption relates two objects ("... above ...", "... to the left of ...") is drawn this
    # many times per epoch (`data.Oversampled`, `data.states_relation`); 1: every example once
    relation_repeat: int = 1


@dataclass
class PreviewRecipe:
    widths: tuple[int, ...] | None  # the preview decoder's widths (None: `PreviewDecoderConfig.for_vae`'s)
    train: TrainConfig
    image_size: int = 32
    data_size: int = 20_000


@dataclass
class MatcherRecipe:
    train: TrainConfig
    layers: int = 2  # fusion blocks of the head (MatcherConfig.layers)
    position_freqs: int = 0  # Fourier features of the patches' places in the head (MatcherConfig.position_freqs)
    image_size: int = 32
    data_size: int = 20_000
    # ShapesDataset keyword arguments for this stage; ignored for folders
    shapes_options: dict[str, float] = field(default_factory=dict)


@dataclass
class DDPMRecipe:
    unet: UNetConfig
    train: TrainConfig
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("linear", 1e-4, 0.02, steps_offset=0))
    image_size: int = 32
    data_size: int = 20_000


def _tiny_train(steps: int, batch: int, lr: float) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=2, log_every=5, preview_every=0,
                       checkpoint_every=max(1, steps // 2), ema_decay=0.9)  # fmt: skip


_SHAPES_TEXT = CLIPTextConfig(context_length=32, width=128, layers=4, heads=4, mlp_width=512,
                              projection_dim=128)  # fmt: skip
_TINY_TEXT = CLIPTextConfig(context_length=32, width=32, layers=2, heads=2, mlp_width=64,
                            projection_dim=32)  # fmt: skip

RECIPES: dict[str, dict] = {
    "vae": {
        "tiny": VAERecipe(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1), _tiny_train(6, 8, 1e-3),
                          data_size=64),  # fmt: skip
        # f=2: 32 px shapes -> 16 x 16 x 4 latents
        "shapes": VAERecipe(
            VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
            TrainConfig(steps=1200, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999,
                        preview_every=300, checkpoint_every=200, log_every=25, precision="bf16"),  # fmt: skip
            # session 22: its channels' means drift from run to run (-4 to +4) and one factor left that offset
            # in the diffusion latents, with 0.36-1.07 of content std per channel; centred, each channel gets the
            # 0.5 that the schedule, the expert's boundary and the guidance were tuned on (docs/shapes-model.md,
            # "Centred latents")
            channel_stats=True,
            channel_scale=0.5,
        ),
    },
    "clip": {
        "tiny": CLIPRecipe(
            CLIPConfig(text=_TINY_TEXT, vision=CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=2,
                                                                heads=2, mlp_width=64, projection_dim=32)),
            _tiny_train(6, 16, 1e-3), data_size=64, vocab_size=600,
        ),  # fmt: skip
        "shapes": CLIPRecipe(
            CLIPConfig(text=_SHAPES_TEXT, vision=CLIPVisionConfig(image_size=32, patch_size=4, width=128, layers=4,
                                                                  heads=4, mlp_width=512, projection_dim=128)),
            # bf16 since session 20: 176 -> 262-283 img/s once short attention took the math path (layers.sdpa);
            # before that the fused kernel's bf16 backward made bf16 slower than float32 (187 -> 161)
            TrainConfig(steps=1500, batch_size=64, lr=5e-4, warmup_steps=100, weight_decay=0.1, ema_decay=None,
                        preview_every=500, checkpoint_every=250, log_every=25, precision="bf16"),
            # without them the text features hardly move with position words (5% against 80-130% for a
            # colour or shape word), and a U-Net conditioned on them draws positions and relations at chance
            hard_negatives=True,
        ),  # fmt: skip
    },
    "ldm": {
        "tiny": LDMRecipe(
            UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_heads=2, context_dim=32),
            _tiny_train(6, 8, 1e-3), data_size=64, preview_prompts=("a red circle",),
        ),  # fmt: skip
        # 16 x 16 latents: levels 16, 8, 4 with attention at 8 and 4. One ResNet block per level (6.7M
        # parameters) trains at ~62 img/s on 2 cores against ~36 with two: more steps beat more depth here.
        # shapes-3, the shipped model's U-Net until session 11: one U-Net for every noise level, for a model
        # without an expert (`sfumato train ldm --preset shapes-full`). Tried and not kept (docs/shapes-model.md,
        # "Why positions were ignored"): shapes-5 = this with mask_padding=True, min_snr_floor=1.0, high_noise_share=0.4,
        # high_noise_from=750, shapes_options={"position_prob": 1.0, "relation_prob": 1.0} and 4,000 steps:
        # positions 29 -> 100 %, relations 29 -> 71 % (held out 25 -> 84 %), shapes 90 -> 33 % (crosses,
        # triangles, diamonds blur). shapes-6 = shapes-5's settings for 2,000 steps (layout_steps=2000), then
        # 2,500 of this objective: positions 96 %, relations 41 %, shapes 28 %: the shapes never came back.
        "shapes-full": LDMRecipe(
            UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                       num_heads=4, context_dim=128),
            TrainConfig(steps=3600, batch_size=64, lr=4e-4, warmup_steps=200, ema_decay=0.999,
                        preview_every=500, checkpoint_every=250, log_every=25),
            # guidance: what `sfumato eval shapes` scored best at (shapes-1: 3; SD's 7.5 melts the shapes)
            schedule=ScheduleConfig(prediction="v", timestep_spacing="trailing", steps_offset=0,
                                    rescale_betas_zero_snr=True, guidance=3.0),
            data_size=30_000, min_snr_gamma=5.0, cache=True,
            # the contrastive text tower hardly separates "a above b" from "b above a" in its token states;
            # trained with the U-Net, it learns what the U-Net must read (shapes-1, frozen: relations at chance)
            train_text_encoder=True,
        ),  # fmt: skip
    },
    # a second U-Net for the noisiest steps (eDiff-I's split, models.experts), trained after the ldm stage on its
    # latents; it reads the ldm stage's text encoder frozen, or (train_text_encoder) a copy trained with it
    "expert": {
        "tiny": ExpertRecipe(_tiny_train(6, 8, 1e-3), data_size=64, preview_prompts=("a red circle",)),
        # The shipped model's layout expert: the ldm stage's U-Net never learnt places (positions and relations at
        # chance), and the single-U-Net recipes that did (shapes-5, -6) lost shapes. This one reads only the
        # prompt's tokens (mask_padding) and sees only t >= 550, with every place and relation stated, through a
        # text encoder of its own. Reading the base's frozen encoder it reached positions 29 -> 69 %, relations
        # 29 -> 40 %: that encoder hardly tells "a above b" from "b above a". With its own: 100 % and 100 %
        # (held out 97 %), shapes 90 -> 96 % (docs/shapes-model.md "Both: a second U-Net").
        # Session 19: with every relation caption drawn 3 times per epoch (21 % -> 45 % of the examples), an
        # expert started from the base U-Net put the objects of relation prompts in order 96.9 % of the time
        # against 60.4 % for the same run (seed, base) without (docs/shapes-model.md, "Relation order").
        # Session 23: position_freqs=4 (Fourier features of each pixel's place, added to the tokens of the
        # transformer blocks) and same_color_gap=0.125 (4 px of background between two objects of one colour, so no
        # training image shows them touching, as one region). On pipeline22's centred U-Net this expert drew 59 of
        # 72 seen counts on the eval's seeds against 53, but on 288 images of fresh seeds 217 against 225: no gain
        # in seen counts; held-out counts 40 of 48 against 33, seen colour and shape 2 points up on the eval. A
        # whole run with it (pipeline23) ships (docs/shapes-model.md, "Counts in the recipe").
        "shapes": ExpertRecipe(  # the base's architecture (shapes-3's: 6.7 M parameters), masked
            TrainConfig(steps=3000, batch_size=64, lr=4e-4, warmup_steps=100, ema_decay=0.998,
                        preview_every=500, checkpoint_every=250, log_every=25, precision="bf16"),
            boundary=550, data_size=30_000,
            shapes_options={"position_prob": 1.0, "relation_prob": 1.0, "same_color_gap": 0.125},
            train_text_encoder=True, relation_repeat=3, position_freqs=4,
        ),  # fmt: skip
    },
    # distils the VAE's decoder into a tiny one for live previews (models.preview); minutes on 2 cores
    "preview": {
        "tiny": PreviewRecipe(None, _tiny_train(6, 8, 2e-3), data_size=64),
        "shapes": PreviewRecipe(
            None,  # f=2: widths (64, 32)
            TrainConfig(steps=600, batch_size=64, lr=2e-3, warmup_steps=50, ema_decay=None, preview_every=200,
                        checkpoint_every=200, log_every=25, precision="bf16"),
        ),  # fmt: skip
        # for SD's f=8 VAE (--vae an SD checkpoint, --data your image folder): hours on a CPU, minutes on a GPU
        "sd": PreviewRecipe(
            (64, 32, 16, 8),
            TrainConfig(steps=4000, batch_size=8, lr=1e-3, warmup_steps=100, ema_decay=None, preview_every=500,
                        checkpoint_every=500, log_every=50),
            image_size=256,
        ),  # fmt: skip
    },
    # an image-text matching head over the CLIP, which picks the best of K candidates (models.matcher)
    "matcher": {
        "tiny": MatcherRecipe(_tiny_train(6, 8, 1e-3), layers=1, data_size=64),
        # four objects at most and repeated kinds common (repeat_prob 0.3), so that it sees three and four of a
        # kind, what a miscounted "two X" or "two X and a Y" looks like
        "shapes": MatcherRecipe(
            TrainConfig(steps=1800, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=None, preview_every=0,
                        checkpoint_every=300, log_every=25),
            data_size=60_000, shapes_options={"max_objects": 4, "repeat_prob": 0.3},
        ),  # fmt: skip
    },
    "ddpm": {
        "tiny": DDPMRecipe(
            UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(2,), num_heads=2, context_dim=32),
            _tiny_train(6, 8, 1e-3), data_size=64,
        ),  # fmt: skip
        "shapes": DDPMRecipe(
            UNetConfig(in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                       num_res_blocks=2, attention_resolutions=(4,), num_heads=4, context_dim=128),
            TrainConfig(steps=20_000, batch_size=64, lr=2e-4, warmup_steps=500, preview_every=1000,
                        checkpoint_every=500, log_every=50),
        ),  # fmt: skip
    },
}

# The shipped model's low-noise U-Net: shapes-full trained on t < 550 only, the range the shapes expert leaves
# to it (train_pipeline checks that the two meet). 2,000 steps draw as many examples below 550 as shapes-full's
# 3,600 did, in 56 % of the time. Under the same expert, against shapes-3 (shipped float16 files): seen colour
# 98.2 -> 98.0 %, shape 95.7 -> 95.0 %, relation 100 -> 100 %, count 70.8 -> 69.4 % (docs/shapes-model.md,
# "The time budget").
# Its bundles generate best of 4 by default (pipelines.ranking): on seeds other than the eval's, seen count
# prompts 50 -> 61 of 72, as many as best of 8 or 16 drew, at half the cost (docs/shapes-model.md, "Best of K").
RECIPES["ldm"]["shapes"] = replace(
    RECIPES["ldm"]["shapes-full"], low_noise_until=550,
    train=replace(RECIPES["ldm"]["shapes-full"].train, steps=2000, precision="bf16"),
    schedule=replace(RECIPES["ldm"]["shapes-full"].schedule, candidates=4),
)  # fmt: skip

# bf16 autocast (weights, optimizer and losses stay float32) in every shapes stage but CLIP: on an AMD EPYC with
# avx512_bf16 (session 17, back-to-back 40-step runs) U-Net 60 -> 79 img/s, expert 56 -> 75, VAE 85 -> 114,
# preview 162 -> 230, but CLIP 187 -> 161. The whole pipeline took 104 min in bf16 against ~134 at those
# ratios in fp32, and scored within the spread of fp32 runs (docs/shapes-model.md, "bf16"). On an x86 CPU
# without bf16 instructions autocast is slower; `train pipeline --precision fp32` (the loop warns).


def recipe(task: str, name: str):
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(RECIPES)}")
    if name not in RECIPES[task]:
        raise ValueError(f"no {task} recipe named {name!r}; choose one of {', '.join(RECIPES[task])}")
    return RECIPES[task][name]


def dataset_for(data: str, image_size: int, size: int, *, holdout: bool = True, **shapes_kw):
    """`shapes` (built-in; the default held-out combinations excluded; `shapes_kw` go to `ShapesDataset`) or an
    image-caption folder."""
    if data == "shapes" or data.startswith("shapes:"):
        from sfumato.data.shapes import DEFAULT_HOLDOUT

        holdout_ = DEFAULT_HOLDOUT if holdout else None
        return load_dataset(data, image_size=image_size, size=size, holdout=holdout_, **shapes_kw)
    return load_dataset(data, image_size=image_size)


def _preview_batch(dataset, n: int = 8) -> dict:
    return collate([dataset[i] for i in range(min(n, len(dataset)))])


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bar(progress: bool | None) -> bool:
    """Whether to draw a progress bar: as asked, or (None) when stderr is a terminal, as the training loop does;
    a log file gets no carriage-return frames."""
    return sys.stderr.isatty() if progress is None else progress


def _finished(out: Path) -> bool:
    return (out / "final").is_dir() and any((out / "final").iterdir())


# ---------------------------------------------------------------------------------------------------------
# one component each


def train_vae(data: str, out: Path, r: VAERecipe, *, resume=False, until=None, progress=None) -> TrainResult:
    from sfumato.training.vae import VAETask

    ds = dataset_for(data, r.image_size, r.data_size)
    task = VAETask(r.model, kl_weight=r.kl_weight, recon=r.recon, disc=r.disc, disc_start=r.disc_start,
                   seed=r.train.seed, preview_batch=_preview_batch(ds), channel_stats=r.channel_stats,
                   channel_scale=r.channel_scale,
                   stats_batch=_preview_batch(ds, r.stats_images) if r.channel_stats else None)  # fmt: skip
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


def train_clip(data: str, out: Path, r: CLIPRecipe, *, resume=False, until=None, progress=None) -> TrainResult:
    from sfumato.training.clip import CLIPTask

    ds = dataset_for(data, r.image_size, r.data_size)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if resume and tok_dir.is_dir():  # the vocabulary the checkpoints were trained with
        tok = CLIPTokenizer.from_pretrained(tok_dir)
    else:
        captions = [ds[i]["caption"] for i in range(min(len(ds), 5000))]
        tok = train_bpe(captions, r.vocab_size, context_length=r.context_length)
        tok.save(tok_dir)
    text = replace(r.model.text, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                   context_length=tok.context_length)  # fmt: skip
    config = replace(r.model, text=text)
    task = CLIPTask(config, tok, loss=r.loss, seed=r.train.seed, preview_batch=_preview_batch(ds, 32),
                    hard_negatives=r.hard_negatives)  # fmt: skip
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


def train_ldm(
    data: str,
    out: Path,
    r: LDMRecipe,
    *,
    vae: str | Path,
    text_encoder: str | Path,
    tokenizer: str | Path,
    resume=False,
    until=None,
    progress=None,
) -> TrainResult:
    import torch

    from sfumato.training.ldm import LDMTask

    ds = dataset_for(data, r.image_size, r.data_size, **r.shapes_options)
    vae_m = load_model(vae, dtype=torch.float32)  # a float16 file (the shipped model's) trains in float32
    text_m = load_model(text_encoder, dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(tokenizer)
    unet = replace(r.unet, context_dim=text_m.config.width, in_channels=vae_m.config.z_channels,
                   out_channels=vae_m.config.z_channels)  # fmt: skip
    schedule = replace(r.schedule, image_size=r.image_size)
    cache = None
    if r.cache:
        from sfumato.data.cache import build_latent_cache

        _say(f"[ldm] caching the latents and contexts of {len(ds)} examples in {out / 'cache'}")
        cache = build_latent_cache(ds, vae_m, text_m, tok, out / "cache", progress=_bar(progress))
    task = LDMTask(unet, vae_m, text_m, tok, schedule, caption_dropout=r.caption_dropout, cache=cache,
                   min_snr_gamma=r.min_snr_gamma, min_snr_floor=r.min_snr_floor, seed=r.train.seed,
                   high_noise_share=r.high_noise_share, high_noise_from=r.high_noise_from,
                   layout_steps=r.layout_steps, low_noise_until=r.low_noise_until,
                   preview_prompts=r.preview_prompts, train_text_encoder=r.train_text_encoder)  # fmt: skip
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


def train_expert(
    data: str, out: Path, r: ExpertRecipe, *, base: str | Path, resume=False, until=None, progress=None
) -> TrainResult:
    """Train a high-noise expert for the bundle `base` (e.g. OUT/ldm/final); OUT/final is the pair
    (`models.experts.NoiseLevelExperts`), a bundle that `sfumato generate --model` loads."""
    import torch

    from sfumato.checkpoints.bundle import is_bundle, load_bundle
    from sfumato.models.experts import NoiseLevelExperts
    from sfumato.training.ldm import HighNoiseExpertTask

    if not is_bundle(base):
        raise ValueError(f"--base {base} is not a text-to-image bundle folder (e.g. a `sfumato train ldm` run's final/)")
    b = load_bundle(base, dtype=torch.float32)  # the shipped model stores float16; training computes in float32
    if isinstance(b.unet, NoiseLevelExperts):
        raise ValueError(f"{base} already has a high-noise expert ({b.unet.boundary:g}); give a model with one U-Net")
    ds = dataset_for(data, r.image_size, r.data_size, **r.shapes_options)
    c = b.unet.config
    unet = replace(r.unet or c, context_dim=c.context_dim, in_channels=c.in_channels, out_channels=c.out_channels,
                   mask_padding=r.mask_padding, context_layers=r.context_layers)  # fmt: skip
    if r.position_freqs is not None:
        unet = replace(unet, position_freqs=r.position_freqs)
    cache = None
    if r.cache:
        from sfumato.data.cache import build_latent_cache

        _say(f"[expert] caching the latents and contexts of {len(ds)} examples in {out / 'cache'}")
        cache = build_latent_cache(ds, b.vae, b.text_encoder, b.tokenizer, out / "cache", progress=_bar(progress))
    if r.relation_repeat != 1:
        from sfumato.data import Oversampled, states_relation

        ds = Oversampled(ds, states_relation, r.relation_repeat)  # the cache above holds each example once
        _say(f"[expert] {len(ds.kept)} of {len(ds.dataset)} captions state a relation; each is drawn "
             f"{r.relation_repeat} times per epoch of {len(ds)}")  # fmt: skip
    task = HighNoiseExpertTask(b, unet, boundary=r.boundary, caption_dropout=r.caption_dropout, cache=cache,
                               min_snr_gamma=r.min_snr_gamma, min_snr_floor=r.min_snr_floor, seed=r.train.seed,
                               preview_prompts=r.preview_prompts, train_text_encoder=r.train_text_encoder,
                               init_from_base=r.init_from_base)  # fmt: skip
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


def train_preview(
    data: str, out: Path, r: PreviewRecipe, *, vae: str | Path | AutoencoderKL, resume=False, until=None,
    progress=None,
) -> TrainResult:  # fmt: skip
    """Distil `vae` (an AutoencoderKL, or a path that `sfumato.load` reads: vae.safetensors, a bundle, a
    diffusers folder, an SD single file) into a preview decoder; OUT/final/preview_decoder.safetensors."""
    from sfumato.checkpoints.bundle import Bundle
    from sfumato.checkpoints.single_file import load_any
    from sfumato.models.preview import PreviewDecoderConfig
    from sfumato.training.preview import PreviewTask

    if not isinstance(vae, AutoencoderKL):
        loaded = load_any(vae)
        loaded = loaded.vae if isinstance(loaded, Bundle) else loaded
        if not isinstance(loaded, AutoencoderKL):
            raise ValueError(f"--vae {vae} holds a {type(loaded).__name__}; give a VAE or a text-to-image model")
        vae = loaded.float()  # files may store float16 (the shipped model's); training computes in float32
    ds = dataset_for(data, r.image_size, r.data_size)
    config = PreviewDecoderConfig.for_vae(vae.config, r.widths)
    task = PreviewTask(vae, config, seed=r.train.seed, preview_batch=_preview_batch(ds))
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


def train_matcher(
    data: str, out: Path, r: MatcherRecipe, *, clip: str | Path, tokenizer: str | Path, resume=False, until=None,
    progress=None,
) -> TrainResult:  # fmt: skip
    """Train an image-text matching head over the CLIP in `clip` (a native clip.safetensors, frozen);
    OUT/final/matcher.safetensors, which a bundle with that CLIP beside it uses to pick the best of K."""
    import torch

    from sfumato.models.clip import CLIP
    from sfumato.models.matcher import MatcherConfig
    from sfumato.training.matcher import MatcherTask

    clip_m = load_model(clip, dtype=torch.float32)
    if not isinstance(clip_m, CLIP):
        raise ValueError(f"--clip {clip} holds a {type(clip_m).__name__}; the matcher needs a joint CLIP (both towers)")
    ds = dataset_for(data, r.image_size, r.data_size, **r.shapes_options)
    holdout = getattr(ds, "holdout", None)
    config = MatcherConfig.for_clip(clip_m.config, layers=r.layers, position_freqs=r.position_freqs)
    task = MatcherTask(clip_m, CLIPTokenizer.from_pretrained(tokenizer), config, seed=r.train.seed, holdout=holdout)
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


def train_ddpm(data: str, out: Path, r: DDPMRecipe, *, resume=False, until=None, progress=None) -> TrainResult:
    from sfumato.training.ddpm import DDPMTask

    ds = dataset_for(data, r.image_size, r.data_size)
    task = DDPMTask(r.unet, r.schedule, image_size=r.image_size, seed=r.train.seed)
    return train(task, ds, r.train, out, resume=resume, until=until, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# the whole text-to-image model


def train_pipeline(data: str, out: str | Path, name: str = "shapes", *, resume: bool = False,
                   progress: bool | None = None, steps: dict[str, int] | None = None,
                   precision: str | None = None) -> Path:  # fmt: skip
    """VAE → CLIP → latent diffusion → high-noise expert (when `RECIPES["expert"]` has `name`) → preview
    decoder → matcher (when `RECIPES["matcher"]` has `name`) with the recipes called `name`; returns the
    finished bundle folder.

    steps: optional {"vae": n, "clip": n, "ldm": n, "expert": n, "preview": n, "matcher": n} overriding the
        recipes' step counts.
    precision: "fp32", "bf16" or "fp16" for every stage, instead of each recipe's own (e.g. "fp32" on a CPU
        without bf16 instructions, where the shapes recipe's bf16 stages run slower than fp32).
    """
    out = Path(out)
    steps = steps or {}
    recipes = {task: recipe(task, name) for task in ("vae", "clip", "ldm", "preview")}
    for optional in ("expert", "matcher"):
        if name in RECIPES[optional]:
            recipes[optional] = recipe(optional, name)
    low = recipes["ldm"].low_noise_until
    if low is not None and recipes.get("expert") is None:
        raise ValueError(f"the {name!r} ldm recipe trains t < {low} only and needs a high-noise expert for the rest, "
                         f"but RECIPES['expert'] has no {name!r}")  # fmt: skip
    if low is not None and low != recipes["expert"].boundary:
        raise ValueError(f"the {name!r} ldm recipe trains t < {low} but its expert takes over at t >= "
                         f"{recipes['expert'].boundary}; the two must meet (set both to one boundary)")  # fmt: skip
    for task, n in steps.items():
        recipes[task] = replace(recipes[task], train=replace(recipes[task].train, steps=n))
    if precision is not None:
        recipes = {task: replace(r, train=replace(r.train, precision=precision)) for task, r in recipes.items()}
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue this pipeline, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": name, "data": data, "steps": steps, "precision": precision}
    (out / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")

    def stage(task: str, fn, **kw) -> None:
        folder = out / task
        if _finished(folder):
            _say(f"[{task}] done before: {folder / 'final'}")
            return
        again = latest_checkpoint(folder) is not None
        _say(f"[{task}] {'resuming' if again else 'training'} ({recipes[task].train.steps} steps) in {folder}")
        fn(data, folder, recipes[task], resume=again, progress=progress, **kw)

    stage("vae", train_vae)
    stage("clip", train_clip)
    stage("ldm", train_ldm, vae=out / "vae/final/vae.safetensors",
          text_encoder=out / "clip/final/text_encoder.safetensors", tokenizer=out / "clip/final/tokenizer")  # fmt: skip
    if "expert" in recipes:
        stage("expert", train_expert, base=out / "ldm/final")
    stage("preview", train_preview, vae=out / "vae/final/vae.safetensors")
    if "matcher" in recipes:
        stage("matcher", train_matcher, clip=out / "clip/final/clip.safetensors",
              tokenizer=out / "clip/final/tokenizer")  # fmt: skip
    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(out / ("expert/final" if "expert" in recipes else "ldm/final"), model)
    # the full CLIP (both towers) beside the bundle: `sfumato classify` and `sfumato eval shapes` use it
    shutil.copy2(out / "clip/final/clip.safetensors", model / "clip.safetensors")
    shutil.copy2(out / "preview/final/preview_decoder.safetensors", model / "preview_decoder.safetensors")
    if "matcher" in recipes:  # reads the CLIP above: the two go together
        shutil.copy2(out / "matcher/final/matcher.safetensors", model / "matcher.safetensors")
    _say(f"model: {model}  (sfumato generate --model {model} \"a red circle\")")
    return model


def export_model(src: str | Path, dst: str | Path, *, dtype=None) -> Path:
    """Copy the bundle folder `src` (e.g. OUT/model) to `dst`, with the weights stored in `dtype`.

    This is how the shipped model is made: `export_model("runs/shapes/model", "src/sfumato/assets/shapes",
    dtype=torch.float16)` halves the files (the pipelines compute in float32 whatever the files hold).
    """
    from sfumato.checkpoints.bundle import load_bundle, save_bundle
    from sfumato.checkpoints.native import save_model

    src, dst = Path(src), Path(dst)
    bundle = load_bundle(src)
    if dst.exists():
        shutil.rmtree(dst)
    save_bundle(bundle, dst, dtype=dtype)
    if bundle.clip is None and (src / "clip.safetensors").is_file():  # a CLIP beside the bundle, not read by it
        save_model(load_model(src / "clip.safetensors"), dst / "clip.safetensors", dtype=dtype)
    return dst
