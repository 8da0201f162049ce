"""A folder of images with captions, as a `torch.utils.data.Dataset`.

Two layouts are accepted (the first that applies wins):

1. `metadata.jsonl` at the root (the Hugging Face `imagefolder` convention): one JSON object per line,
   `{"file_name": "cats/1.png", "text": "a cat on a sofa"}`, file_name relative to the root ("caption" is
   accepted in place of "text"). When this file exists it is authoritative: images it does not list are
   ignored, and `.txt` files are not read.
2. Otherwise every image under the root (recursively; extensions IMAGE_EXTENSIONS, any case; files and
   folders whose names start with "." are skipped) with its caption in a `.txt` file of the same name
   beside it: `cats/1.png` + `cats/1.txt`.

Items are sorted by path relative to the root, so the order is the same on every machine.

Unreadable images: every image is opened and fully decoded once, at construction (PIL `verify()`, then
the same `load_image` the items use; JPEGs at reduced size through `draft`, which still reads the whole
file). An image that fails is left out with a `CorruptImageWarning` naming it and recorded in `skipped`,
so `len(dataset)` counts only images that load, and index i always means the same image. This costs one
decode per image up front (a progress bar shows for large folders); an image that breaks after that
raises in `__getitem__`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..pipelines.images import image_to_tensor, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # a GIF gives its first frame
METADATA_FILE = "metadata.jsonl"
LAYOUTS = (
    f"either a {METADATA_FILE} at the root with one line per image, "
    '{"file_name": "relative/path.png", "text": "its caption"}, '
    "or images (" + ", ".join(IMAGE_EXTENSIONS) + ") each with a same-name .txt caption beside it"
)
_PROGRESS_FROM = 1000  # show a progress bar while verifying at least this many images
_WARN_AT_MOST = 20  # one warning per skipped file up to this many, then a single summary warning


class CorruptImageWarning(UserWarning):
    """An image in an `ImageCaptionFolder` could not be read and was left out."""


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


_SIDES = re.compile(r"\b(left|right)(?=(?:most|ward|wards|-hand)?\b)", re.IGNORECASE)


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: "left" and "right" swapped as words, also at the start of "leftmost",
    "rightward(s)" and "left-hand", keeping each word's case ("Left" -> "Right", "LEFT" -> "RIGHT")."""

    def swap(m: re.Match) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _SIDES.sub(swap, caption)


def _flip(seed: int, epoch: int, index: int) -> bool:
    """A fair coin from (seed, epoch, index) alone (BLAKE2b), so a resumed run flips the same items."""
    digest = hashlib.blake2b(f"flip:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size`, then cut the central `size` x `size` square.

    Done in one PIL `resize` whose `box` is the central square of the source, which is the same as
    resizing first and cropping after but without rounding the intermediate size. Bicubic: PIL widens the
    kernel when shrinking, so downscaling is antialiased, and bicubic rings less than Lanczos.
    """
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def _check_image(path: Path, size: int) -> None:
    """Raise if `path` is not an image that `load_image` decodes in full."""
    with Image.open(path) as im:
        im.verify()  # structural checks (PNG chunk CRCs, ...); the image cannot be used after this
    with Image.open(path) as im:
        im.draft(im.mode, (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still reading every byte
        load_image(im)  # decodes (raises on truncated data) and converts exactly as __getitem__ will


class ImageCaptionFolder(Dataset):
    """Images with captions from a folder (layouts and error handling: see the module docstring).

    Item i: {"image": (3, image_size, image_size) float32 in [-1, 1], "caption": str (whitespace
    stripped), "index": i, "path": the image's path relative to root (str, "/"-separated)}.

    image_size: the shorter side is resized to it (bicubic), then the centre is cropped square.
    flip: mirror left-right with probability 1/2, decided by (seed, epoch, index) only, and swap "left" and
        "right" in the caption of a mirrored item (`mirror_caption`), so "a dog to the left of a cat" stays
        true. Off by default: other asymmetries (text in the image, "the right answer") do not mirror.
        Call `set_epoch` each epoch.
        (A DataLoader copies the dataset into its workers when an iterator is made, so set the epoch
        before iterating, or use non-persistent workers.)
    allow_empty_captions: a missing or empty caption becomes "" instead of raising `FileNotFoundError`.

    Attributes: `samples` (list of (path, caption)), `skipped` (list of (path, reason) for images left
    out), `root`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 64,
        *,
        flip: bool = False,
        allow_empty_captions: bool = False,
        seed: int = 0,
    ):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"no such folder: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(
                f"{self.root} is a file; ImageCaptionFolder needs a folder holding {LAYOUTS}"
            )
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size, self.flip, self.seed, self.epoch = int(image_size), bool(flip), int(seed), 0
        self.allow_empty_captions = allow_empty_captions
        self.skipped: list[tuple[Path, str]] = []

        metadata = self.root / METADATA_FILE
        candidates = self._from_metadata(metadata) if metadata.is_file() else self._from_text_files()
        if not candidates and not self.skipped:
            raise ValueError(f"no images found in {self.root}; expected {LAYOUTS}")
        self._check_captions(candidates)
        self.samples: list[tuple[Path, str]] = self._verified(candidates)
        if not self.samples:
            raise ValueError(
                f"none of the {len(self.skipped)} images listed in {self.root} could be read; "
                f"the first failure: {self.skipped[0][0]}: {self.skipped[0][1]}"
            )

    # --- discovery -------------------------------------------------------------------------------------

    def _from_text_files(self) -> list[tuple[Path, str | None]]:
        found = []
        for path in self.root.rglob("*"):
            relative = path.relative_to(self.root)
            if path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(relative) and path.is_file():
                found.append((relative.as_posix(), path))
        found.sort()
        return [(path, self._read_caption(path.with_suffix(".txt"))) for _, path in found]

    def _read_caption(self, txt: Path) -> str | None:
        if not txt.is_file():
            return None
        try:
            return txt.read_text(encoding="utf-8-sig").strip()  # utf-8, ignoring a byte-order mark
        except UnicodeDecodeError as e:
            raise ValueError(f"caption file {txt} is not valid UTF-8 ({e}); save it as UTF-8") from e

    def _from_metadata(self, metadata: Path) -> list[tuple[Path, str | None]]:
        found = []
        with open(metadata, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{metadata} line {number} is not valid JSON: {e}") from e
                if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                    raise ValueError(
                        f'{metadata} line {number} has no "file_name" string; each line must look like '
                        '{"file_name": "relative/path.png", "text": "its caption"}'
                    )
                text = record.get("text", record.get("caption"))
                if text is not None and not isinstance(text, str):
                    raise ValueError(f'{metadata} line {number}: "text" must be a string, got {text!r}')
                path = self.root / record["file_name"]
                if not path.is_file():
                    self._skip(path, f"listed in {METADATA_FILE} line {number} but not found")
                    continue
                found.append((path, None if text is None else text.strip()))
        return found

    def _check_captions(self, candidates: list[tuple[Path, str | None]]) -> None:
        missing = [path for path, caption in candidates if not caption]
        if missing and not self.allow_empty_captions:
            txt = missing[0].with_suffix(".txt")
            if (self.root / METADATA_FILE).is_file():
                problem = f'its line in {self.root / METADATA_FILE} has no "text" or an empty one'
            elif txt.is_file():
                problem = f"its caption file {txt} is empty"
            else:
                problem = f"expected a caption file {txt}"
            others = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"no caption for {missing[0]}{others}: {problem}. Add the captions, or pass "
                "allow_empty_captions=True to train on them with an empty caption."
            )

    def _verified(self, candidates: list[tuple[Path, str | None]]) -> list[tuple[Path, str]]:
        kept = []
        quiet = len(candidates) < _PROGRESS_FROM
        for path, caption in tqdm(
            candidates, desc=f"checking {self.root}", unit="img", leave=False, disable=quiet
        ):
            try:
                _check_image(path, self.image_size)
            except Exception as e:  # PIL: OSError, ValueError, SyntaxError, struct.error, ...
                self._skip(path, f"{type(e).__name__}: {e}")
                continue
            kept.append((path, caption or ""))
        if len(self.skipped) > _WARN_AT_MOST:
            warnings.warn(
                f"{len(self.skipped) - _WARN_AT_MOST} more unreadable images left out of {self.root} "
                f"({len(self.skipped)} in all); see the dataset's `skipped` list",
                CorruptImageWarning,
                stacklevel=3,
            )
        return kept

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        if len(self.skipped) <= _WARN_AT_MOST:
            warnings.warn(f"skipping unreadable image {path}: {reason}", CorruptImageWarning, stacklevel=4)

    # --- items -----------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A cheap identity of the data (for caches keyed on it): every image's relative path, byte size and
        modification time, its caption, and the settings that change the pixels."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.image_size}:{self.flip}:{self.seed}".encode())
        for path, caption in self.samples:
            stat = path.stat()
            h.update(
                f"\0{os.path.relpath(path, self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{caption}".encode()
            )
        return "folder:" + h.hexdigest()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips items get (flips depend on (seed, epoch, index) only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, i: int) -> str:
        """Item i's caption, as `self[i]` gives it this epoch, without loading its image."""
        i = int(i) + (len(self.samples) if i < 0 else 0)
        caption = self.samples[i][1]
        return mirror_caption(caption) if self._mirrored(i) else caption

    def _mirrored(self, i: int) -> bool:
        return self.flip and _flip(self.seed, self.epoch, i)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self.samples)
        if not 0 <= i < len(self.samples):
            raise IndexError(f"index {i} out of range for a folder of {len(self.samples)} images")
        path, caption = self.samples[i]
        image = resize_and_crop(load_image(path), self.image_size)
        x = image_to_tensor(image)[0]  # (3, H, W) in [-1, 1]
        if self._mirrored(i):
            x = torch.flip(x, dims=(-1,))  # mirror along W
            caption = mirror_caption(caption)
        relative = Path(os.path.relpath(path, self.root)).as_posix()  # relpath: metadata may say "../x.png"
        return {"image": x, "caption": caption, "index": i, "path": relative}
