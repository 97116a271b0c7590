"""Model sources: local Hugging Face folders, GGUF files, the bundled SmolLM2, hub ids.

Everything resolves to a Hugging Face folder (config.json, *.safetensors, tokenizer) that
the model code and the tokenizer load from; bad sources raise ModelSourceError.
"""

from .bundled import bundled_gguf_path
from .cache_dir import default_cache_dir
from .errors import ModelSourceError
from .gguf_convert import convert_gguf
from .hf_folder import iter_weights, load_tokenizer
from .resolve import ResolvedModel, resolve_model

__all__ = [
    "ModelSourceError",
    "ResolvedModel",
    "bundled_gguf_path",
    "convert_gguf",
    "default_cache_dir",
    "iter_weights",
    "load_tokenizer",
    "resolve_model",
]
