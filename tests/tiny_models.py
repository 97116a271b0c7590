"""Tiny random Hugging Face models of each supported architecture, for exact-match tests.

`make_tiny_model("qwen3", tmp_path)` writes config.json, generation_config.json and
model.safetensors (no tokenizer: runners and transformers' generate need only ids).
Weights are re-drawn at a larger scale than transformers' init (std 0.02), so logits
have clear winners and greedy comparisons are not decided by float rounding; norm
weights and biases are random too, so a mis-loaded one changes the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
EOS_TOKEN_IDS = [2, 7]

_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

_PER_ARCH: dict[str, dict[str, Any]] = {
    "llama": dict(num_hidden_layers=3, rope_theta=10000.0),
    # head_dim 16: with these settings low frequencies are scaled, the middle band blended.
    "llama3": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(rope_theta=10000.0, sliding_window=None),
    "qwen2": dict(rope_theta=1000000.0),
    "qwen3": dict(rope_theta=1000000.0, head_dim=32),  # head_dim != hidden / heads
}


def _config_class(arch: str):
    import transformers as tf

    return {
        "llama": tf.LlamaConfig,
        "llama3": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
    }[arch]


def make_tiny_model(arch: str, out_dir: Path, *, seed: int = 0, init_std: float = 0.15, **overrides) -> Path:
    """Build, randomize and save a tiny float32 model; returns out_dir.

    `overrides` go into the config (e.g. tie_word_embeddings=True, num_key_value_heads=1
    or 4, rope_scaling={...}, num_hidden_layers=2).
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {ARCHS}")
    kwargs = {**_BASE, **_PER_ARCH[arch], **overrides}
    config = _config_class(arch)(**kwargs)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    model.generation_config.eos_token_id = list(EOS_TOKEN_IDS)
    model.generation_config.pad_token_id = 0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def write_generation_config(model_dir: Path, **fields) -> Path:
    """Merge `fields` (e.g. temperature=0.0, max_new_tokens=4) into model_dir's
    generation_config.json (created if absent); returns model_dir."""
    import json

    path = Path(model_dir) / "generation_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return Path(model_dir)
