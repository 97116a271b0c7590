"""The few facts of a Hugging Face config the Llama-family models need, read once.

Accepts configs from transformers 4.x (`rope_theta` + `rope_scaling`, `torch_dtype`) and
5.x (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
# CPU flags of native bfloat16 matmul (AVX-512 BF16 dot products, AMX tiles).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    sliding_window: int | None

    @classmethod
    def from_hf(cls, hf_config: Any, architecture: str) -> ModelArgs:
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{architecture}: unsupported hidden_act {act!r} (only silu)")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        theta, scaling = rope_parameters(hf_config)
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o_proj; Llama/Qwen3's
            # attention_bias covers all four projections.
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=_sliding_window(hf_config, architecture),
        )


def rope_parameters(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None for plain RoPE)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type layout; these models have one type
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = getattr(hf_config, "rope_theta", None) or 10000.0
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def _sliding_window(hf_config: Any, architecture: str) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if architecture.startswith("Qwen") and not getattr(hf_config, "use_sliding_window", False):
        return None
    return int(window) if window else None


def config_dtype(hf_config: Any) -> torch.dtype | None:
    """The checkpoint dtype a config declares (`dtype` in transformers 5, `torch_dtype` before)."""
    for attr in ("dtype", "torch_dtype"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
            return _DTYPES[value.removeprefix("torch.")]
    return None


def cpu_flags() -> set[str]:
    """The flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def resolve_dtype(
    requested: str, hf_config: Any, device: torch.device, flags: set[str] | None = None
) -> torch.dtype:
    """An explicit dtype as given. `auto`: on GPU the config's dtype (bfloat16 if it says
    none); on CPU bfloat16 where the CPU multiplies bfloat16 natively (AVX-512 BF16 or
    AMX), float32 otherwise, whatever the config says. Measured on a 2-core AVX-512 BF16
    CPU, SmolLM2 through `folio serve`: bfloat16 185-193 out tok/s at 64 streams against
    float32's 136-143, and 15.5 against 14 at one; on an AVX2-only CPU bfloat16 matmuls ran
    5-10x slower than float32 (docs/benchmarks.md). Logs the choice and why (`flags`:
    /proc/cpuinfo's unless given, for tests)."""
    if requested != "auto":
        return _DTYPES[requested]
    declared = config_dtype(hf_config)
    if device.type != "cpu":
        return declared or torch.bfloat16
    native = sorted(set(_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if native:
        log.info("dtype auto: bfloat16 (the CPU multiplies bfloat16 natively: %s)", ", ".join(native))
        return torch.bfloat16
    log.info("dtype auto: float32 (no avx512_bf16/amx_bf16 flag: bfloat16 matmuls would be emulated, slower)")
    return torch.float32
