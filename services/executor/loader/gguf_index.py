"""Where each tensor of a GGUF file lies, without parsing its metadata values.

gguf.GGUFReader builds numpy views of every metadata field, the tokenizer's 49k strings
included: ~5 s for SmolLM2 on 2 cores, at every start. Loading packed weights needs only
the tensor table, so this walks the metadata by its lengths (skipping values) and reads
the table. GGUF v2/v3 layout, little-endian:

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (key: u64 len + bytes | u32 type | value)          value: scalar, string or array
    n_tensors x (name | u32 n_dims | u64 dims[n_dims], innermost first | u32 type | u64 offset)
    padding to general.alignment (default 32) | tensor data (offsets relative to here)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

from .errors import ModelSourceError

_SCALAR = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip


@dataclass(frozen=True)
class IndexedTensor:
    """The attributes of gguf's ReaderTensor that the loader uses."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # innermost dimension first, as GGUF lists them
    n_elements: int
    n_bytes: int
    data: np.ndarray  # the raw bytes (uint8), memory-mapped


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def skip_value(self, kind: int) -> None:
        if kind == GGUFValueType.STRING:
            n = self.take("Q")  # not `self.pos += self.take(...)`: that reads pos first
            self.pos += n
        elif kind == GGUFValueType.ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALAR:
                self.pos += _SCALAR[GGUFValueType(item)] * count
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            self.pos += _SCALAR[GGUFValueType(kind)]


def gguf_tensors(path: Path) -> list[IndexedTensor]:
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return _read(mm, path)
    except (struct.error, ValueError, KeyError) as e:
        raise ModelSourceError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from e


def _read(mm: np.ndarray, path: Path) -> list[IndexedTensor]:
    c = _Cursor(memoryview(mm))
    if bytes(c.buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    c.pos = 4
    version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, kind = c.string(), c.take("I")
        if key == b"general.alignment" and kind == GGUFValueType.UINT32:
            alignment = c.take("I")
        else:
            c.skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        name = c.string().decode("utf-8")
        dims = [c.take("Q") for _ in range(c.take("I"))]
        infos.append((name, GGMLQuantizationType(c.take("I")), dims, c.take("Q")))
    start = -(-c.pos // alignment) * alignment
    out = []
    for name, kind, dims, offset in infos:
        n = int(np.prod(dims))
        block, block_bytes = GGML_QUANT_SIZES[kind]
        nbytes = n // block * block_bytes
        data = mm[start + offset : start + offset + nbytes]
        if data.size != nbytes:
            raise ValueError(f"tensor {name} runs past the end of the file")
        rows = n // dims[0]
        out.append(IndexedTensor(name, kind, np.array(dims), n, nbytes, data.reshape(rows, -1)))
    return out
