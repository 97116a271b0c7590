"""Hugging Face config.json and generation_config.json from a llama.cpp GGUF's metadata."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from transformers import GenerationConfig, LlamaConfig

from .errors import ModelSourceError

# Llama 3.x stores its rope scaling only as a per-frequency factor tensor (rope_freqs);
# these are the llama3 rope parameters we try to explain that tensor with.
_LLAMA3_ORIGINAL_CONTEXTS = (8192, 4096, 16384, 32768)
_LLAMA3_LOW_HIGH = ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0))


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, str or list (None/default when absent)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    kind = field.types[0]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if kind == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    return field.parts[field.data[0]][0].item()


def _short_float(x: float) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.999999747378752e-06; write what the model had.
    return float(str(np.float32(x)))


@dataclass(frozen=True)
class GGUFModelShape:
    """What the tensor conversion needs from the metadata."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def model_shape(reader: GGUFReader, source: str) -> GGUFModelShape:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ModelSourceError(
            f"{source}: GGUF architecture {arch!r} is not supported (only 'llama' GGUFs convert)"
        )
    hidden = _required(reader, "llama.embedding_length", source)
    num_heads = _required(reader, "llama.attention.head_count", source)
    num_kv_heads = field_value(reader, "llama.attention.head_count_kv", num_heads)
    head_dim = field_value(reader, "llama.attention.key_length", hidden // num_heads)
    rot = field_value(reader, "llama.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ModelSourceError(f"{source}: partial rotary ({rot} of {head_dim} dims) is not supported")
    return GGUFModelShape(num_heads, num_kv_heads, head_dim)


def _required(reader: GGUFReader, key: str, source: str) -> Any:
    value = field_value(reader, key)
    if value is None:
        raise ModelSourceError(f"{source}: GGUF metadata lacks {key}")
    return value


def build_config(
    reader: GGUFReader,
    source: str,
    *,
    vocab_size: int,
    tie_word_embeddings: bool,
    dtype: str,
    rope_freqs: np.ndarray | None,
) -> LlamaConfig:
    shape = model_shape(reader, source)
    ctx = field_value(reader, "llama.context_length", 2048)
    theta = _short_float(field_value(reader, "llama.rope.freq_base", 10000.0))
    kwargs: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=_required(reader, "llama.embedding_length", source),
        intermediate_size=_required(reader, "llama.feed_forward_length", source),
        num_hidden_layers=_required(reader, "llama.block_count", source),
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=ctx,
        rms_norm_eps=_short_float(field_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, source, shape.head_dim, theta, rope_freqs),
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
    )
    # transformers >= 4.56 names it `dtype`; older releases only know `torch_dtype`.
    dtype_key = "dtype" if "dtype" in inspect.signature(LlamaConfig.__init__).parameters else "torch_dtype"
    kwargs[dtype_key] = dtype
    return LlamaConfig(**kwargs)


def build_generation_config(reader: GGUFReader) -> GenerationConfig:
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    # Chat GGUFs (Llama 3: <|eot_id|>) end a turn with a token other than eos: stop on both.
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in dict.fromkeys([eos, eot]) if i is not None]
    return GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
    )


def _rope_scaling(
    reader: GGUFReader, source: str, head_dim: int, theta: float, rope_freqs: np.ndarray | None
) -> dict[str, Any] | None:
    kind = field_value(reader, "llama.rope.scaling.type", "none")
    factor = field_value(reader, "llama.rope.scaling.factor")
    original = field_value(reader, "llama.rope.scaling.original_context_length")
    if rope_freqs is not None:
        return infer_llama3_scaling(rope_freqs, head_dim, theta, source)
    if kind in ("none", None) or factor in (None, 0.0, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ModelSourceError(f"{source}: rope scaling type {kind!r} is not supported")


def llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs for llama3 rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out)


def infer_llama3_scaling(rope_freqs: np.ndarray, head_dim: int, theta: float, source: str) -> dict[str, Any]:
    factor = float(rope_freqs.max())
    for original in _LLAMA3_ORIGINAL_CONTEXTS:
        for low, high in _LLAMA3_LOW_HIGH:
            expected = llama3_rope_factors(head_dim, theta, factor, low, high, original)
            if expected.shape == rope_freqs.shape and np.allclose(expected, rope_freqs, rtol=1e-4):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise ModelSourceError(f"{source}: rope_freqs tensor does not match any llama3 rope scaling we know")
