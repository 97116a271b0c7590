"""Tensor-parallel linear layers and embeddings with packed (GGUF) weights.

Each rank's packed slice must compute that rank's part of the dense layer: columns of
the output for column-parallel layers, a partial sum for row-parallel ones (the all-reduce
is plain addition, done here by hand so no process group is needed).
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from services.executor.models.embedding import ParallelLMHead, VocabParallelEmbedding
from services.executor.models.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from services.executor.models.parallel import TPInfo
from services.executor.quant.ggml_blocks import decode
from services.executor.quant.spec import QuantSpec
from tests.services.executor.quant.blocks import make_raw

F32 = dict(dtype=torch.float32, device=torch.device("cpu"))
SPEC = QuantSpec("gguf", torch.float32)


def packed(qtype: T, rows: int, cols: int, seed: int = 0):
    return decode(make_raw(qtype, rows, cols, seed), qtype, rows, cols)


def x_of(cols: int, rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_column_and_row_parallel(tp_size):
    w = packed(T.Q4_1, 64, 128)
    x = x_of(128)
    ref = x @ w.dequantize().T
    cols, partial = [], torch.zeros_like(ref)
    for rank in range(tp_size):
        tp = TPInfo(rank, tp_size)
        col = ColumnParallelLinear(128, 64, bias=False, tp=tp, **F32)
        col.weight_loader(col.weight, w)
        col.finalize_weights(SPEC)
        assert col.weight is None and col.packed is not None
        cols.append(col(x))
        row = RowParallelLinear(128, 64, bias=False, tp=tp, **F32)
        row.weight_loader(row.weight, w)
        row.finalize_weights(SPEC)
        n = 128 // tp_size
        partial += row.packed(x[:, rank * n : (rank + 1) * n])
    close(torch.cat(cols, dim=-1), ref)
    close(partial, ref)


def test_row_parallel_split_inside_a_group_is_refused():
    # 96 inputs over 2 ranks: 48 each, not a multiple of Q4_1's 32-input blocks.
    row = RowParallelLinear(96, 32, bias=False, tp=TPInfo(1, 2), **F32)
    with pytest.raises(ValueError, match="splits its input dimension only at multiples of 32"):
        row.weight_loader(row.weight, packed(T.Q4_1, 32, 96))


def test_qkv_with_mixed_types_and_merged_gate_up():
    # Like llama.cpp's Q4_K_M: q and k in Q4_K, v in Q6_K (no int4 form: held dense).
    hidden, d = 256, 16
    q, k, v = packed(T.Q4_K, 64, hidden, 1), packed(T.Q4_K, 32, hidden, 2), packed(T.Q6_K, 32, hidden, 3)
    x = x_of(hidden)
    for rank in range(2):
        qkv = QKVParallelLinear(hidden, d, 4, 2, bias=False, tp=TPInfo(rank, 2), **F32)
        for shard, w in (("q", q), ("k", k), ("v", v)):
            qkv.weight_loader(qkv.weight, w, shard)
        qkv.finalize_weights(SPEC)
        assert len(qkv.packed.kernels) == 2  # q|k on int4, v dense
        rows = torch.cat(
            [
                q.dequantize()[rank * 32 : rank * 32 + 32],
                k.dequantize()[rank * 16 : rank * 16 + 16],
                v.dequantize()[rank * 16 : rank * 16 + 16],
            ]
        )
        close(qkv(x), x @ rows.T)
    gate, up = packed(T.Q8_0, 64, hidden, 4), packed(T.Q8_0, 64, hidden, 5)
    merged = MergedColumnParallelLinear(hidden, [64, 64], bias=False, tp=TPInfo(1, 2), **F32)
    merged.weight_loader(merged.weight, gate, 0)
    merged.weight_loader(merged.weight, up, 1)
    merged.finalize_weights(SPEC)
    close(merged(x), x @ torch.cat([gate.dequantize()[32:], up.dequantize()[32:]]).T)


def test_dense_copy_serves_big_batches():
    w = packed(T.Q4_0, 32, 64)
    layer = ColumnParallelLinear(64, 32, bias=False, tp=TPInfo(), **F32)
    layer.weight_loader(layer.weight, w)
    layer.finalize_weights(QuantSpec("gguf", torch.float32, keep_dense=True, dense_above=2))
    assert torch.equal(layer.packed.dense, w.dequantize())
    close(layer(x_of(64, 1)), x_of(64, 1) @ w.dequantize().T)
    assert torch.equal(layer(x_of(64, 3)), x_of(64, 3) @ w.dequantize().T)  # the dense copy


@pytest.mark.parametrize("keep_dense", [False, True])
def test_embedding_and_tied_head(keep_dense):
    vocab, hidden = 100, 64  # 50 rows per rank at tp 2; 100 is no multiple of 16 (padding)
    w = packed(T.Q8_0, vocab, hidden)
    dense = w.dequantize()
    spec = QuantSpec("gguf", torch.float32, keep_dense=keep_dense)
    ids = torch.tensor([0, 99, 42, 42])
    h = x_of(hidden, 2)
    lookups, logits = torch.zeros(4, hidden), []
    for rank in range(2):
        tp = TPInfo(rank, 2)
        emb = VocabParallelEmbedding(vocab, hidden, tp=tp, **F32)
        head = ParallelLMHead(vocab, hidden, tp=tp, **F32)
        head.tie_to(emb)
        emb.weight_loader(emb.weight, w)
        emb.finalize_weights(spec)
        head.finalize_weights(spec)
        local = torch.where((ids >= rank * 50) & (ids < rank * 50 + 50), ids - rank * 50, 0)
        mask = ((ids >= rank * 50) & (ids < rank * 50 + 50)).unsqueeze(-1)
        lookups += emb._lookup(local) * mask
        logits.append(head.packed(h))
    assert torch.equal(lookups, dense[ids])
    close(torch.cat(logits, dim=-1), h @ dense.T)
