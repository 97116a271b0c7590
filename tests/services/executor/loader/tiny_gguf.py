"""Write a tiny random Llama GGUF the way llama.cpp's converter does, for conversion tests.

The weights are made in Hugging Face layout, then q/k rows are permuted for llama.cpp's
rope (written here by index arithmetic, independently of the loader's reshape-based
inverse) and stored with the requested GGML type.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
MERGES = ["h e", "l l", "he ll", "hell o", "w o", "r l", "wo rl", "worl d"]
SPECIAL = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def tokens() -> list[str]:
    b2u = bytes_to_unicode()
    return SPECIAL + [b2u[i] for i in range(256)] + ["he", "ll", "hell", "hello", "wo", "rl", "worl", "world"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row h*d + t*d/2 + j goes to row h*d + 2*j + t (head h, half t, pair j)."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for t in range(2):
            for j in range(d // 2):
                out[h * d + 2 * j + t] = w[h * d + t * (d // 2) + j]
    return out


def hf_weights(seed: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = len(tokens())

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rand(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
    return w


def _gguf_name(hf: str) -> str:
    table = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in table:
        return table[hf]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    part = {
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }[rest]
    return f"blk.{layer}.{part}.weight"


def write_tiny_llama_gguf(
    path: Path,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    tied: bool = True,
    arch: str = "llama",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the GGUF; returns the Hugging Face layout float32 weights it was made from."""
    weights = hf_weights(seed, tied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    toks = tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(toks)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(toks) - 3)
    )
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # llama.cpp keeps norms in F32
            writer.add_tensor(_gguf_name(name), w)
        else:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
