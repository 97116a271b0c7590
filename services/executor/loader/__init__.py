"""Model sources: local Hugging Face folders, GGUF files, the bundled SmolLM2, hub ids.

Everything resolves to a Hugging Face folder (config.json, *.safetensors, tokenizer) that
the model code and the tokenizer load from; bad sources raise ModelSourceError.

The names are imported on first use (PEP 562): `folio serve` and the gateway only locate
the model, and importing the converter or the weight readers would import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ModelSourceError": "errors",
    "LocatedModel": "resolve",
    "ResolvedModel": "resolve",
    "bundled_gguf_path": "bundled",
    "convert_gguf": "gguf_convert",
    "default_cache_dir": "cache_dir",
    "iter_weights": "hf_folder",
    "load_tokenizer": "hf_folder",
    "locate_model": "resolve",
    "resolve_model": "resolve",
}

__all__ = [
    "LocatedModel",
    "ModelSourceError",
    "ResolvedModel",
    "bundled_gguf_path",
    "convert_gguf",
    "default_cache_dir",
    "iter_weights",
    "load_tokenizer",
    "locate_model",
    "resolve_model",
]

if TYPE_CHECKING:
    from .bundled import bundled_gguf_path
    from .cache_dir import default_cache_dir
    from .errors import ModelSourceError
    from .gguf_convert import convert_gguf
    from .hf_folder import iter_weights, load_tokenizer
    from .resolve import LocatedModel, ResolvedModel, locate_model, resolve_model


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
