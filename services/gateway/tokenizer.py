"""The gateway's tokenizer: loaded from the same source the executors load, plus a
cache of per-token strings for logprobs (decoding one id is cheap, but it happens for
every top-k candidate of every token)."""

from __future__ import annotations

import logging

from shared.detokenizer import make_decode_fn

log = logging.getLogger(__name__)


def load_gateway_tokenizer(
    model: str, tokenizer: str | None = None, download_dir: str | None = None, load_format: str = "auto"
):
    """The tokenizer for `model` (or the explicit `tokenizer` path / hub id).

    The gateway needs no weights, so the model is resolved with load_format "dummy" (a
    GGUF source is still converted, and that conversion is cached for the executors).
    """
    from services.executor.loader import load_tokenizer, locate_model

    if tokenizer:
        return load_tokenizer(tokenizer)
    fmt = "gguf" if load_format == "gguf" else "dummy"
    return load_tokenizer(locate_model(model, load_format=fmt, download_dir=download_dir).path)


def load_sampling_defaults(settings) -> dict:
    """The model's generation_config.json sampling defaults (per `settings.generation_config`)."""
    from services.executor.loader import locate_model
    from shared.generation_defaults import sampling_defaults

    if settings.generation_config == "vllm":
        return {}
    folder = None
    if settings.generation_config == "auto":
        fmt = "gguf" if settings.load_format == "gguf" else "dummy"
        folder = locate_model(settings.model, load_format=fmt, download_dir=settings.download_dir).path
    return sampling_defaults(folder, settings.generation_config)


class TokenStrings:
    """id → text of that single token, memoized (bounded by the vocabulary)."""

    def __init__(self, tokenizer) -> None:
        self._decode = make_decode_fn(tokenizer)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._decode([token_id], False)
        return s
