"""A GGUF's tensors under Hugging Face names, quantized ones kept packed.

The converted cache folder (gguf_convert.py) holds dequantized weights for the dense
path; the packed path reads the GGUF itself (memory-mapped, through gguf_index.py's
tensor table) at every start: decoding SmolLM2's blocks takes ~0.3 s on 2 cores.

    Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K  ->  GroupAffine (ggml_blocks.decode, exact)
    F32 F16 BF16 and other types    ->  float32 tensor (gguf's dequantize, as converted)

q/k rows get the same un-permutation as in the conversion (a row permutation, which
commutes with row-wise blocks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from services.executor.quant.ggml_blocks import PACKED_TYPES, decode
from services.executor.quant.group_affine import GroupAffine

from .errors import ModelSourceError
from .gguf_convert import _ROPE_FREQS, _to_torch, hf_tensor_name, unpermute_rope_rows
from .gguf_index import gguf_tensors


def iter_gguf_weights(
    gguf_path: Path, num_heads: int, num_kv_heads: int
) -> Iterator[tuple[str, torch.Tensor | GroupAffine]]:
    """Head counts: the model's (its converted config's), for the q/k row un-permutation."""
    source = str(gguf_path)
    for t in gguf_tensors(gguf_path):
        if t.name == _ROPE_FREQS:
            continue
        name = hf_tensor_name(t.name, source)
        w: torch.Tensor | GroupAffine
        if t.tensor_type in PACKED_TYPES:
            rows, cols = (int(d) for d in reversed(t.shape.tolist()))
            try:
                w = decode(t.data, t.tensor_type, rows, cols)
            except ValueError as e:
                raise ModelSourceError(f"{source}: tensor {t.name}: {e}") from e
        else:
            w = _to_torch(t, "float32", source)
        heads = (
            num_heads
            if ".self_attn.q_proj." in name
            else num_kv_heads
            if ".self_attn.k_proj." in name
            else None
        )
        if heads is not None:
            w = (
                w.map_rows(lambda x, h=heads: unpermute_rope_rows(x, h).contiguous())
                if isinstance(w, GroupAffine)
                else unpermute_rope_rows(w, heads).contiguous()
            )
        yield name, w


def packed_weight_types(gguf_path: Path) -> dict[str, int]:
    """Bytes of weights per GGUF type name (for choosing and logging the weight format)."""
    out: dict[str, int] = {}
    for t in gguf_tensors(gguf_path):
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return out
