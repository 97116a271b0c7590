"""Decode GGUF quantized blocks into GroupAffine (integer codes + per-group scale and min).

Each decoder reproduces the arithmetic of gguf.quants' dequantize_blocks: the scale and
min are the float32 products it forms (fp16 x small integer: exact), so

    scale * code - min

is, code for code, the same float32 expression gguf evaluates, rounded once at the
subtraction. Per type (one block; d, m, dmin are fp16):

    Q4_0  32 x 4 bit    w = d * (q - 8)             scale d,        min 8d,  group 32
    Q4_1  32 x 4 bit    w = d * q + m               scale d,        min -m,  group 32
    Q8_0  32 x int8     w = d * q                   code q + 128,   min 128d, group 32
    Q4_K  256: 8 sub-blocks of 32, 6-bit sc/m        scale d*sc,     min dmin*m, group 32
    Q5_K  as Q4_K with a fifth bit per code         (codes 0..31)
    Q6_K  256: 16 sub-blocks of 16, int8 sc          scale d*sc,     min 32*d*sc, group 16

NOTE Q4_0 and Q8_0 write d*(q-8) and d*q; our scale*c - min gives the same float32 value
because both products are exact and their difference is the exact result, representable.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .group_affine import GroupAffine

QK_K = 256
# type -> (elements per block, bytes per block)
BLOCKS: dict[T, tuple[int, int]] = {
    T.Q4_0: (32, 18),
    T.Q4_1: (32, 20),
    T.Q8_0: (32, 34),
    T.Q4_K: (QK_K, 144),
    T.Q5_K: (QK_K, 176),
    T.Q6_K: (QK_K, 210),
}
PACKED_TYPES = frozenset(BLOCKS)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., n bytes) -> (..., 2n codes): the n low nibbles first, then the n high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit sub-block scales and mins of Q4_K/Q5_K (12 bytes -> 8 + 8)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode(raw: np.ndarray, qtype: T, rows: int, cols: int) -> GroupAffine:
    """raw: the tensor's bytes, (rows, cols / block * block_bytes) or flat."""
    if qtype not in BLOCKS:
        raise ValueError(f"GGUF type {qtype.name} has no packed form")
    size, nbytes = BLOCKS[qtype]
    if cols % size:
        raise ValueError(f"{qtype.name}: {cols} columns are not whole blocks of {size}")
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, nbytes)  # (blocks, bytes)
    codes, scale, mn, bits, group = _DECODERS[qtype](b)
    return GroupAffine(
        torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1)),
        torch.from_numpy(np.ascontiguousarray(mn, dtype=np.float32).reshape(rows, -1)),
        bits,
        group,
        qtype.name,
    )


def _q4_0(b: np.ndarray) -> tuple:
    d = _f16(b[:, 0:2])
    # NOTE for q = 8 gguf's d * 0 is -0.0 when d < 0, ours +0.0: equal values, other sign bit.
    return _nibbles(b[:, 2:]), d, 8 * d, 4, 32


def _q4_1(b: np.ndarray) -> tuple:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:]), d, -m, 4, 32


def _q8_0(b: np.ndarray) -> tuple:
    d = _f16(b[:, 0:2])
    codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, 128 * d, 8, 32


def _q4_k(b: np.ndarray) -> tuple:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    codes = _nibbles(b[:, 16:].reshape(n, 4, 32))  # 4 chunks of 64: 32 low, 32 high
    return codes, d * sc, dmin * m, 4, 32


def _q5_k(b: np.ndarray) -> tuple:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    qh = b[:, 16:48]  # bit j of byte i is the fifth bit of element 32*j + i
    low = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return low | (high << 4), d * sc, dmin * m, 5, 32


def _q6_k(b: np.ndarray) -> tuple:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 2, 4, 32)  # halves of 128, 4 x 32
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    scale = d * sc
    return (low | (high << 4)).reshape(n, QK_K), scale, 32 * scale, 6, 16


_DECODERS = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q8_0: _q8_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}
