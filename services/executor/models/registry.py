"""Architectures folio runs, by the `architectures` name in a Hugging Face config.json."""

from __future__ import annotations

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def get_model_class(architecture: str) -> type:
    """The model class for a config's architecture name; ValueError if unsupported."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # Imported here so that reading SUPPORTED_ARCHITECTURES does not import torch.
    from services.executor.models import llama

    return getattr(llama, architecture)
