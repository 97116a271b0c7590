"""Convert a llama.cpp GGUF (Llama architecture) into a Hugging Face model folder.

    model.gguf ──GGUFReader──▶ dequantize ──rename + undo Q/K permutation──▶ *.safetensors
               ├─ metadata ──▶ config.json, generation_config.json
               └─ tokenizer ─▶ tokenizer.json, tokenizer_config.json, chat template

NOTE: llama.cpp's converter reorders the rows of q_proj/k_proj inside each head from
Hugging Face's "rotate half" layout (first half, second half) to interleaved pairs, for its
own rope kernel. Our model code (like transformers) uses rotate-half, so the conversion
must undo it; get this wrong and the model still runs but produces garbage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import ModelSourceError
from .gguf_cache import CONVERTER_VERSION, MARKER_FILE
from .gguf_config import GGUFModelShape, build_config, build_generation_config, model_shape

MAX_SHARD_BYTES = 2 << 30

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors, not a model weight
_HALF_TYPES = {GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}


def hf_tensor_name(gguf_name: str, source: str) -> str:
    """The Hugging Face Llama name of a llama.cpp tensor name."""
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ModelSourceError(
        f"{source}: unexpected tensor {gguf_name!r} for a Llama GGUF (MoE or other variant?)"
    )


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of q/k rows (see the module note).

    llama.cpp stores row h*d + 2*j + t for HF row h*d + t*d/2 + j (head h, pair j, half t).
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _output_dtype(tensors: list[ReaderTensor]) -> str:
    """float16/bfloat16 when every non-F32 tensor is that type (lossless), else float32."""
    kinds = {t.tensor_type for t in tensors if t.tensor_type != GGMLQuantizationType.F32}
    if len(kinds) == 1 and (kind := next(iter(kinds))) in _HALF_TYPES:
        return _HALF_TYPES[kind]
    return "float32"


def _to_torch(t: ReaderTensor, out_dtype: str, source: str) -> torch.Tensor:
    shape = [int(d) for d in reversed(t.shape.tolist())]  # GGUF lists dims innermost first
    try:
        if t.tensor_type == GGMLQuantizationType.BF16 and out_dtype == "bfloat16":
            raw = np.asarray(t.data).view(np.int16).reshape(shape)
            return torch.from_numpy(raw.copy()).view(torch.bfloat16)
        if t.tensor_type == GGMLQuantizationType.F16 and out_dtype == "float16":
            return torch.from_numpy(np.asarray(t.data).view(np.float16).reshape(shape).copy())
        values = dequantize(t.data, t.tensor_type).reshape(shape)
    except (ValueError, NotImplementedError, IndexError) as e:
        raise ModelSourceError(f"{source}: cannot read tensor {t.name} ({t.tensor_type.name}): {e}") from e
    return torch.from_numpy(np.array(values, dtype=np.float32))  # copies out of the mmap


def open_gguf(path: Path) -> GGUFReader:
    """A reader over the file; a truncated or corrupt file raises ModelSourceError naming it."""
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        size = path.stat().st_size
        raise ModelSourceError(
            f"corrupt or truncated GGUF file {path} ({size} bytes): {type(e).__name__}: {e}"
        ) from e


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write a Hugging Face folder for a Llama GGUF at out_dir (which must not exist yet).

    The folder is built beside out_dir under a temporary name and renamed into place at the
    end, so an interrupted conversion never leaves a folder at out_dir.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelSourceError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelSourceError(f"cannot convert {gguf_path.name}: output folder {out_dir} is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        _convert_into(gguf_path, tmp, progress)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must be readable by all
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _convert_into(gguf_path: Path, out: Path, progress: bool) -> None:
    source = str(gguf_path)
    reader = open_gguf(gguf_path)
    shape = model_shape(reader, source)
    tensors = [t for t in reader.tensors if t.name != _ROPE_FREQS]
    names = {t.name: hf_tensor_name(t.name, source) for t in tensors}
    out_dtype = _output_dtype(tensors)
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ModelSourceError(f"{source}: GGUF has no token_embd.weight tensor")

    bar = tqdm(
        total=len(tensors) + 1, desc=f"converting {gguf_path.name}", unit="tensor", disable=not progress
    )
    with bar:
        _write_weights(tensors, names, shape, out_dtype, out, source, bar)
        rope = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
        config = build_config(
            reader,
            source,
            vocab_size=int(embed.shape[1]),
            tie_word_embeddings="output.weight" not in names,
            dtype=out_dtype,
            rope_freqs=None if rope is None else dequantize(rope.data, rope.tensor_type).reshape(-1),
        )
        config.save_pretrained(out)
        build_generation_config(reader).save_pretrained(out)
        bar.set_postfix_str("tokenizer")
        _write_tokenizer(gguf_path, out)
        bar.update(1)
    marker = {"source": str(gguf_path.resolve()), "converter_version": CONVERTER_VERSION, "dtype": out_dtype}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _write_weights(
    tensors: list[ReaderTensor],
    names: dict[str, str],
    shape: GGUFModelShape,
    out_dtype: str,
    out: Path,
    source: str,
    bar: tqdm,
) -> None:
    # Plan shards up front from element counts so file names can carry the shard count.
    itemsize = 2 if out_dtype != "float32" else 4
    shards: list[list[ReaderTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(t.n_elements) * (4 if t.tensor_type == GGMLQuantizationType.F32 else itemsize)
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(files, shards, strict=True):
        state: dict[str, torch.Tensor] = {}
        for t in shard:
            name = names[t.name]
            w = _to_torch(t, out_dtype, source)
            if ".self_attn.q_proj." in name:
                w = unpermute_rope_rows(w, shape.num_heads)
            elif ".self_attn.k_proj." in name:
                w = unpermute_rope_rows(w, shape.num_kv_heads)
            state[name] = w.contiguous()
            weight_map[name] = file
            total += w.numel() * w.element_size()
            bar.update(1)
        save_file(state, str(out / file), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    # transformers rebuilds a fast tokenizer (vocab, merges, special tokens, chat template)
    # from the GGUF's tokenizer.* metadata; saving it gives the usual tokenizer files.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise ModelSourceError(f"{gguf_path}: cannot build a tokenizer from the GGUF metadata: {e}") from e
    tok.save_pretrained(str(out))
