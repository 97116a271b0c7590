"""Convert each GGUF once into the cache and reuse the folder afterwards.

    <cache>/gguf/<stem>-<key>/          finished conversion (has folio_gguf.json)
    <cache>/gguf/.tmp-<stem>-<key>-*/   conversion in progress, or left by a crash
    <cache>/gguf/.<stem>-<key>.lock     held while converting

The key hashes the file's size and its first and last MiB (not the whole file: a
multi-GB GGUF would take seconds to hash on every start) plus the converter version, so
a different file or a newer converter gets a new folder. Tensor-parallel ranks resolve
the same model at once: the lock makes one convert and the others wait and reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import ModelSourceError

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock; the atomic rename still keeps folders whole
    fcntl = None  # type: ignore[assignment]

_SAMPLE_BYTES = 1 << 20
# Bump when the output of the conversion (gguf_convert.py) changes, so cached folders are rebuilt.
CONVERTER_VERSION = 1
MARKER_FILE = "folio_gguf.json"  # written last: a folder without it is not a finished conversion


def gguf_cache_key(gguf_path: Path) -> str:
    """A short key that changes when the file's content or the converter changes."""
    size = gguf_path.stat().st_size
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{size}:".encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        f.seek(max(size - _SAMPLE_BYTES, 0))
        h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:12]


def cached_folder_path(gguf_path: Path, cache_root: Path) -> Path:
    """Where the conversion of gguf_path lives (whether or not it exists yet)."""
    return cache_root / "gguf" / f"{gguf_path.stem}-{gguf_cache_key(gguf_path)}"


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


def cached_gguf_folder(gguf_path: Path, cache_root: Path, progress: bool = True) -> Path:
    """The Hugging Face folder converted from gguf_path, converting it on first use."""
    if not gguf_path.is_file():
        raise ModelSourceError(f"GGUF file {gguf_path} does not exist")
    out = cached_folder_path(gguf_path, cache_root)
    if is_complete(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelSourceError(f"cannot create the conversion cache {out.parent}: {e}") from e
    with _locked(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process finished it while we waited
            return out
        # We hold the lock, so nothing else is writing these: they are leftovers.
        if out.exists():
            shutil.rmtree(out)
        for stale in out.parent.glob(f".tmp-{out.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Imported here: finding a finished conversion must not import torch and transformers
        # (`folio serve` resolves the model before it starts anything).
        from .gguf_convert import convert_gguf

        convert_gguf(gguf_path, out, progress=progress)
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
