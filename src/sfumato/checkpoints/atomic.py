"""Writing a file so that a reader sees the old one or the new one, never half of it: write under a temporary
name in the same folder, then rename over the target (`os.replace`, atomic on POSIX and Windows). Torch-free, so
that PNG metadata and the server's job files use it without importing the models."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process's umask (read from /proc, which
    does not change it; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; on success it gets the usual permissions (umask) and is
    renamed over `path` (`os.replace`); on an exception it is removed. Writers that make private files
    (safetensors' `save_file`, `tempfile.mkstemp`: 0o600) would otherwise leave a bundle that the other
    users who share it cannot read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`Path.write_text` through `replacing`: a reader sees the old file or the new one, never half."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
