"""A disk cache of VAE posteriors and text embeddings, so latent-diffusion training encodes each image once.

Latent diffusion trains the U-Net on ``z = scaling_factor · (μ + σ ε)`` (or the per-channel form of
`AutoencoderKL.to_diffusion`), a sample of the frozen VAE's posterior
q(z | x) (Rombach et al. 2022, sec. 3), and on the frozen text encoder's embedding of the caption. Both
encoders are frozen, so their outputs for a given image and caption never change, and re-running them every
epoch is wasted work (most of a step's time for a small U-Net behind the SD VAE).

What is cached per example: the posterior's **mean and std**, not one sample of it. The training loss draws
ε from its own per-example random numbers (`sfumato.training.task.BatchRandom`) every step and forms
μ + σ ε itself, so every epoch still sees a fresh posterior sample, exactly as with encoding on the fly,
and a run with the cache draws the very same latents as a run without it. Caching one sample instead would
freeze that sample for the whole run (a different, slightly less regularised objective) and make cached
and uncached runs disagree.

Layout of a cache folder (one per key, under a root folder):

    <root>/<key[:20]>/manifest.json          written last: its presence marks a complete cache
    <root>/<key[:20]>/shard-00000.safetensors  examples 0 .. shard_size-1: mean, std (N, z, h, w),
                                              context (N, T, D), thumb (N, 3, 4, 4); captions in metadata

The key hashes everything the cached values depend on: the dataset's identity, the VAE's and text encoder's
configs and weights, the tokenizer and the image size. Change any of them (e.g. fine-tune the VAE) and
`build_latent_cache` writes a new folder instead of reusing a stale one. Every file is written under a
temporary name and renamed into place, and shards already written are kept, so an interrupted build
resumes where it stopped.

Limits: the cache maps a dataset *index* to one image and one caption. Random image augmentation (flips,
random crops) cannot be cached; `LatentCache.check_images` compares a 4x4 thumbnail of each batch image with
the cached one and says so. Captions may vary (several captions per image): `LDMTask` encodes on the fly
every caption that differs from the cached one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from sfumato.checkpoints.atomic import write_text_atomic
from sfumato.checkpoints.native import save_tensors

CACHE_VERSION = 1  # bump when the layout or what is stored changes: old caches then stop matching
THUMB = 4  # side of the thumbnail kept per image to detect a dataset that does not match the cache
THUMB_TOLERANCE = 2e-3  # below one uint8 step (2/255 ≈ 0.008) averaged over a thumbnail cell


# --- hashing ------------------------------------------------------------------------------------------


def module_hash(module: torch.nn.Module) -> str:
    """BLAKE2b of a module's class, config (when it has a dataclass `config`) and every state_dict tensor
    (name, dtype, shape and bytes). Reads all weights: about a second for the SD VAE."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update(repr(config).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of what decides the token ids: vocabulary, merges, context length and padding token."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(tokenizer.vocab, sort_keys=True).encode())
    h.update(json.dumps(tokenizer.merges).encode())
    h.update(f"{tokenizer.context_length}:{tokenizer.pad_token}".encode())
    return h.hexdigest()


def dataset_fingerprint(dataset, *, progress: bool = True) -> str:
    """A content hash of every example's image and caption: slow (one pass over the data, no encoding),
    but always right. Prefer passing `dataset_id` to `build_latent_cache`, or give the dataset a
    `fingerprint` attribute or method (e.g. a hash of its file names, sizes and mtimes)."""
    h = hashlib.blake2b(digest_size=16)
    for i in tqdm(range(len(dataset)), desc="fingerprinting dataset", disable=not progress, leave=False):
        ex = dataset[i]
        image = ex["image"].detach().float().cpu().contiguous()
        h.update(f"{i}:{tuple(image.shape)}:{ex.get('caption', '')}".encode())
        h.update(image.numpy().tobytes())
    return h.hexdigest()


def _dataset_id(dataset, dataset_id: str | None, progress: bool) -> str:
    if dataset_id is not None:
        return str(dataset_id)
    fp = getattr(dataset, "fingerprint", None)
    if fp is not None:
        return str(fp() if callable(fp) else fp)
    return "content:" + dataset_fingerprint(dataset, progress=progress)


def cache_key(
    dataset_id: str, vae, text_encoder, tokenizer, image_size: tuple[int, int], **layout: str
) -> dict[str, str]:
    """The identity of a cache: every input its values depend on (and how they are stored, `layout`), and
    their joint hash under "key"."""
    parts = {
        **layout,
        "version": str(CACHE_VERSION),
        "dataset": dataset_id,
        "vae": module_hash(vae),
        "text_encoder": module_hash(text_encoder),
        "tokenizer": tokenizer_hash(tokenizer),
        "image_size": f"{image_size[0]}x{image_size[1]}",
    }
    parts["key"] = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()
    return parts


# --- the cache ----------------------------------------------------------------------------------------


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, 4, 4) float32 cell averages: a cheap fingerprint of each image."""
    return F.adaptive_avg_pool2d(images.detach().float(), THUMB)


@dataclass
class CachedBatch:
    mean: torch.Tensor  # (B, z, h, w) posterior mean of the *unscaled* latent
    std: torch.Tensor  # (B, z, h, w) posterior std; a latent sample is vae.to_diffusion(mean + std * eps)
    context: torch.Tensor  # (B, T, D) text_encoder(tokenizer(caption)).last_hidden_state
    captions: list[str]  # the captions the contexts were computed from
    thumb: torch.Tensor  # (B, 3, 4, 4) thumbnails of the images the posteriors were computed from


class LatentCache:
    """A complete cache folder, read lazily: each shard is memory-mapped and only the rows asked for are
    copied, so a cache larger than memory works."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a complete latent cache (no manifest.json); build it with "
                "sfumato.data.cache.build_latent_cache"
            )
        self.manifest = json.loads(manifest.read_text())
        self.size = int(self.manifest["size"])
        self.shard_size = int(self.manifest["shard_size"])
        self._shards: dict[int, tuple[object, list[str]]] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def key(self) -> str:
        return self.manifest["key"]["key"]

    def _shard(self, k: int):
        if k not in self._shards:
            f = safe_open(str(self.folder / _shard_name(k)), framework="pt", device="cpu")
            self._shards[k] = (f, json.loads(f.metadata()["captions"]))
        return self._shards[k]

    def get(self, indices: torch.Tensor | list[int], device: str | torch.device = "cpu") -> CachedBatch:
        """The cached rows of dataset indices `indices`, in that order, as float32 on `device`."""
        rows: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "context": [], "thumb": []}
        captions = []
        for i in (int(i) for i in indices):
            if not 0 <= i < self.size:
                raise IndexError(f"index {i} is outside the cache of {self.size} examples ({self.folder})")
            f, caps = self._shard(i // self.shard_size)
            r = i % self.shard_size
            for name in rows:
                rows[name].append(f.get_slice(name)[r : r + 1])
            captions.append(caps[r])
        out = {k: torch.cat(v).to(device, torch.float32) for k, v in rows.items()}  # B x (1, ...) -> (B, ...)
        return CachedBatch(captions=captions, **out)

    def check_images(self, indices, images: torch.Tensor, thumb: torch.Tensor | None = None) -> None:
        """Raise unless `images` (B, 3, H, W) are the images the cache holds for `indices`."""
        if thumb is None:
            thumb = self.get(indices).thumb
        diff = (thumbnails(images).cpu() - thumb.cpu()).abs().flatten(1).amax(1)  # (B,)
        bad = [int(i) for i, d in zip(indices, diff) if d > THUMB_TOLERANCE]
        if bad:
            raise ValueError(
                f"the batch images of dataset indices {bad[:8]} differ from the ones in the latent cache "
                f"{self.folder} (largest thumbnail difference {float(diff.max()):.3g}); the dataset changed, "
                "its order differs, or it applies random augmentation, which a cache cannot hold. Rebuild "
                "the cache, or train without it"
            )


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@torch.no_grad()
def build_latent_cache(
    dataset,
    vae,
    text_encoder,
    tokenizer,
    root: str | Path,
    *,
    dataset_id: str | None = None,
    batch_size: int = 16,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LatentCache:
    """Encode every example of `dataset` once (or reuse a complete cache with the same key) and return it.

    dataset: `dataset[i]` is a dict with "image" (3, H, W) in [-1, 1] and "caption" (str), all one size.
    dataset_id: a string that changes whenever the dataset's content does (e.g. its folder and a hash of
        file names and mtimes); None: the dataset's `fingerprint` attribute/method, else a content hash.
    dtype: how posteriors and contexts are stored (float16 halves the disk; values come back as float32).
    device: where the encoders run (default: where the VAE's weights are).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; there is nothing to cache")
    first = dataset[0]["image"]
    image_size = (int(first.shape[-2]), int(first.shape[-1]))
    key = cache_key(_dataset_id(dataset, dataset_id, progress), vae, text_encoder, tokenizer, image_size,
                    dtype=str(dtype), shard_size=str(shard_size))  # fmt: skip
    folder = Path(root) / key["key"][:20]
    if (folder / "manifest.json").is_file():
        cache = LatentCache(folder)
        if cache.manifest["key"] == key:
            return cache
    folder.mkdir(parents=True, exist_ok=True)

    device = torch.device(device) if device is not None else next(vae.parameters()).device
    was_training = vae.training, text_encoder.training
    vae.eval(), text_encoder.eval()
    try:
        bar = tqdm(total=n, desc="caching latents", disable=not progress, leave=False)
        for k in range(-(-n // shard_size)):
            lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
            if (folder / _shard_name(k)).is_file():  # written by an interrupted build with the same key
                bar.update(hi - lo)
                continue
            parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "context": [], "thumb": []}
            captions: list[str] = []
            for start in range(lo, hi, batch_size):
                examples = [dataset[i] for i in range(start, min(hi, start + batch_size))]
                images = torch.stack([ex["image"] for ex in examples]).to(device, torch.float32)
                if tuple(images.shape[-2:]) != image_size:
                    raise ValueError(
                        f"dataset images must all have one size to be cached; example 0 is {image_size}, "
                        f"a batch from {start} is {tuple(images.shape[-2:])}"
                    )
                caps = [str(ex["caption"]) for ex in examples]
                post = vae.encode(images)
                context = text_encoder(tokenizer(caps).to(device)).last_hidden_state  # (B, T, D)
                for name, value in (("mean", post.mean), ("std", post.std), ("context", context),
                                    ("thumb", thumbnails(images))):  # fmt: skip
                    parts[name].append(value.to("cpu", torch.float32 if name == "thumb" else dtype))
                captions += caps
                bar.update(len(examples))
            tensors = {name: torch.cat(v) for name, v in parts.items()}  # batches -> (N_shard, ...)
            save_tensors(tensors, folder / _shard_name(k), {"captions": json.dumps(captions)})
        bar.close()
    finally:
        vae.train(was_training[0]), text_encoder.train(was_training[1])
    # no latent scale: the shards hold unscaled posteriors, which any scale of these VAE weights uses as they are
    # (`AutoencoderKL.to_diffusion`); manifests written before session 22 carry a scaling_factor, unread
    manifest = {"key": key, "size": n, "shard_size": shard_size, "dtype": str(dtype)}
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=2))
    return LatentCache(folder)
