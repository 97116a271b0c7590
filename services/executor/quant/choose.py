"""Which weight format a model runs with: `--quantization`, or a per-model default.

Default (quantization None), measured on a 2-core AVX-512 BF16 CPU (docs/benchmarks.md):
a GGUF whose weights are mostly 4-bit (Q4_0, Q4_1, Q4_K) runs its packed weights when the
compute dtype is bfloat16, because torch's int4 kernel is then ~1.7x faster than a dense
bfloat16 matmul for up to 8 rows and slower from 16 rows on; so a dense bfloat16 copy is
kept too and used above 8 rows (prefill, many streams). Everything else stays dense:
float32 activations make the int4/int8 kernels ~10x slower than a dense matmul, and Q8_0,
Q5_K (two int4 calls) or Q6_K (dense) are no faster than dense bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.executor.loader.gguf_weights import packed_weight_types
from shared.config import ConfigError

from .spec import QuantSpec

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
DENSE_ABOVE_ROWS = 8  # measured crossover of int4 vs dense bf16 matmuls: between 8 and 16 rows


def choose_quantization(
    requested: str | None,
    requested_dtype: str,
    gguf_path: Path | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[QuantSpec, str]:
    """(spec, why) for the engine's --quantization, --dtype and model source."""
    if requested == "fp8":
        raise ConfigError(
            "quantization: fp8 weights need a GPU with fp8 matmuls, and folio has no fp8 path yet; "
            "on CPU use int8 or int4"
        )
    if requested in ("gguf", "int8", "int4") and device.type != "cpu":
        raise ConfigError(f"quantization: {requested} runs on torch's CPU kernels only, not on {device.type}")
    if requested == "gguf":
        if gguf_path is None:
            raise ConfigError("quantization: gguf needs a GGUF model (a .gguf file or a bundled name)")
        return QuantSpec("gguf", dtype), f"--quantization gguf: packed {_types(gguf_path)}{_slow(dtype)}"
    if requested in ("int8", "int4"):
        why = f"--quantization {requested}: weight-only, quantized at load{_slow(dtype)}"
        return QuantSpec(requested, dtype), why
    if requested == "none":
        return QuantSpec("none", dtype), "--quantization none: dense weights"
    # Default: per model.
    if gguf_path is None:
        return QuantSpec("none", dtype), "not a GGUF: dense weights (--quantization int8|int4 packs them)"
    if requested_dtype != "auto":
        return QuantSpec("none", dtype), f"--dtype {requested_dtype} on a GGUF: its dequantized dense weights"
    if device.type != "cpu" or dtype != torch.bfloat16:
        return QuantSpec("none", dtype), (
            f"dense {str(dtype).removeprefix('torch.')}: packed kernels are fast only for bfloat16 on CPU"
        )
    sizes = packed_weight_types(gguf_path)
    int4_bytes = sum(n for t, n in sizes.items() if t in INT4_TYPES)
    if int4_bytes * 2 < sum(sizes.values()):
        return QuantSpec("none", dtype), (
            f"dense bfloat16: {_types(gguf_path)} is mostly not 4-bit, no faster packed than dense"
        )
    return QuantSpec("gguf", dtype, keep_dense=True, dense_above=DENSE_ABOVE_ROWS), (
        f"packed {_types(gguf_path)} for matmuls of <= {DENSE_ABOVE_ROWS} rows (int4 kernel, faster "
        f"than dense bfloat16 there), a dense bfloat16 copy above"
    )


def _slow(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return ""
    name = str(dtype).removeprefix("torch.")
    return f"; NOTE {name} activations run torch's int4/int8 kernels ~10x slower than bfloat16"


def _types(gguf_path: Path) -> str:
    sizes = packed_weight_types(gguf_path)
    total = sum(sizes.values()) or 1
    return ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in sorted(sizes.items(), key=lambda kv: -kv[1]))
