"""sfumato's own checkpoint file: one `.safetensors` file per model, its config in the metadata.

The metadata of every file holds three strings (safetensors metadata is str -> str):

    {"sfumato": "0.1.0", "kind": "unet", "config": "{...json of dataclasses.asdict(config)...}"}

so the file alone rebuilds its model, as nanoGPT keeps its config inside the checkpoint. Loading builds
the model on the `meta` device (no memory, no random init) and hands it the file's tensors with
`load_state_dict(assign=True)`, as flux does: a full-size model never holds two copies of its weights.
Saving writes a temporary file in the same folder and renames it over the target (`os.replace`), so an
interrupted save never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from sfumato import __version__
from sfumato.checkpoints.atomic import replacing
from sfumato.models.clip import (
    CLIP,
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from sfumato.models.matcher import ImageTextMatcher, MatcherConfig
from sfumato.models.preview import PreviewDecoder, PreviewDecoderConfig
from sfumato.models.unet import UNet, UNetConfig
from sfumato.models.vae import AutoencoderKL, VAEConfig

# kind -> (model class, config class). A plain table: the kind string in a file picks the constructor.
KINDS: dict[str, tuple[type[nn.Module], type]] = {
    "unet": (UNet, UNetConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "clip_text": (CLIPTextModel, CLIPTextConfig),
    "clip_vision": (CLIPVisionModel, CLIPVisionConfig),
    "clip": (CLIP, CLIPConfig),
    "preview_decoder": (PreviewDecoder, PreviewDecoderConfig),
    "matcher": (ImageTextMatcher, MatcherConfig),
}


def kind_of(model: nn.Module) -> str:
    """The `kind` string a model is saved under."""
    for kind, (cls, _) in KINDS.items():
        if type(model) is cls:
            return kind
    raise TypeError(
        f"cannot save a {type(model).__name__}: the native format knows {sorted(KINDS)} "
        f"({', '.join(c.__name__ for c, _ in KINDS.values())})"
    )


def save_model(
    model: nn.Module, path: str | Path, *, extra: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write `model`'s weights and config to `path` (a `.safetensors` file), atomically.

    extra: more metadata strings to store beside sfumato/kind/config (e.g. a training step).
    dtype: store floating-point weights in this dtype (e.g. torch.float16 halves the file); loading casts
        them back to whatever dtype the caller asks for.
    """
    path = Path(path)
    kind = kind_of(model)
    metadata = {"sfumato": __version__, "kind": kind, "config": json.dumps(asdict(model.config))}
    metadata |= extra or {}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = unshare_storage(state)
    save_tensors(state, path, metadata)
    return path


def save_tensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None) -> None:
    """`write_safetensors` through `replacing`."""
    with replacing(path) as tmp:
        write_safetensors(state, tmp, metadata)


def write_safetensors(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None
) -> None:
    """`safetensors.torch.save_file`, then the header's metadata keys put in sorted order.

    safetensors serialises the metadata from a hash map with a random seed, so the same tensors and metadata
    would give files whose bytes, and so whose model hash, differ from save to save. The header is rewritten
    in place: the same JSON with the keys reordered has the same length, and the tensors' offsets count from
    the end of the header, so no tensor byte moves.
    """
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # keeps its place: first
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # not with serde_json's compact output; if it did, keep safetensors' valid header
            return
        f.seek(8)
        f.write(text.ljust(n, b" "))  # safetensors pads its header with spaces too


def unshare_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; give every repeat its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.device.type != "meta" else (id(v), 0)
        out[k] = v.clone() if key in seen and v.numel() else v
        seen.add(key)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a `.safetensors` file ({} when it has none); a clear error when it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated or not a "
            "safetensors file at all: download or save it again"
        ) from e


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file; a damaged file is a ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated or not a "
            "safetensors file at all: download or save it again"
        ) from e


def config_from_metadata(metadata: dict[str, str], path: str | Path):
    """(kind, config) from a native file's metadata."""
    if "sfumato" not in metadata or "kind" not in metadata or "config" not in metadata:
        raise ValueError(
            f"{path} is a safetensors file but not a sfumato checkpoint (its metadata has no sfumato/kind/"
            f"config entries: {sorted(metadata)}); import it with sfumato.checkpoints.load_any or "
            "`sfumato convert`"
        )
    kind = metadata["kind"]
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown model kind {kind!r}; this sfumato knows {sorted(KINDS)}")
    _, config_cls = KINDS[kind]
    try:
        config = config_cls(**json.loads(metadata["config"]))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: the {kind} config in the metadata does not build a {config_cls.__name__}: "
            f"{e}; was it written by a newer sfumato?"
        ) from e
    return kind, config


class _SkipRandomInit(TorchFunctionMode):
    """Turns the in-place random fills of weight initialisers on meta tensors into no-ops. Meta tensors hold no
    values, and on `meta` torch runs `normal_` through its Python reference, whose first call imports
    torch._dynamo: 1.5 s of the 2.5 s it took to load the shipped model in a fresh process."""

    # the initialisers dispatch themselves to a mode first (inside it, their own fills no longer reach it)
    SKIPPED = {
        torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_,
        nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
    }  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor  # filled in place: the tensor itself, unchanged
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Build modules on the `meta` device (parameters take no memory) without running their random inits."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def build_on_meta(kind: str, config) -> nn.Module:
    """An uninitialised model of `kind` whose parameters take no memory (to be filled with assign=True)."""
    model_cls, _ = KINDS[kind]
    with on_meta():
        return model_cls(config)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Strict `load_state_dict(assign=True)` with errors naming the key and the source file.

    With `assign=True` the model's parameters become the given tensors (no copy), which is what fills a
    model built on `meta`.
    """
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected:
        raise ValueError(
            f"{source}: key {unexpected[0]!r} is not a parameter of {type(model).__name__}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; the file belongs to another model or config: check its kind/config, or re-export it"
        )
    if missing:
        raise ValueError(
            f"{source}: key {missing[0]!r} of {type(model).__name__} is missing"
            + (f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else "")
            + "; the file is incomplete or was saved from a different config: save it again"
        )
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise ValueError(
                f"{source}: key {k!r} has shape {tuple(state[k].shape)}, {type(model).__name__} with this "
                f"config expects {tuple(v.shape)}; the config does not describe these weights"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild the model saved in a native `.safetensors` file (built on meta, filled with the file's tensors).

    dtype: cast floating-point weights to this dtype (e.g. torch.float16); None keeps the file's dtypes.
    Returns the model in eval mode.
    """
    kind, config = config_from_metadata(read_metadata(path), path)
    state = read_safetensors(path, device)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return load_weights(build_on_meta(kind, config), state, str(path)).eval()


def is_native(path: str | Path) -> bool:
    """Whether `path` is a `.safetensors` file written by `save_model`."""
    p = Path(path)
    return p.is_file() and p.suffix == ".safetensors" and "sfumato" in read_metadata(p)
