"""TorchAttentionBackend against naive per-sequence attention on random paged data."""

from __future__ import annotations

import os

import pytest
import torch

from services.executor.attention import AttentionMetadata, get_attention_backend, torch_backend
from services.executor.attention.torch_backend import TorchAttentionBackend

DEVICE = torch.device(os.environ.get("FOLIO_TEST_DEVICE", "cpu"))
HEAD_DIM = 8
NUM_KV_HEADS = 2


def make_batch(specs, block_size: int, num_heads: int, dtype=torch.float32, seed: int = 0):
    """specs: [(context_len, query_len)] per sequence. Returns the inputs, the metadata and
    each sequence's full K/V (context from the cache, then the new tokens)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-(c + q) // block_size) for c, q in specs]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    # Blocks in shuffled order, so a sequence's blocks are not contiguous.
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, full_k, full_v = [], [], [], []
    num_tokens = sum(q for _, q in specs)
    q = torch.randn(num_tokens, num_heads, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    start = 0
    for (ctx, ql), nb in zip(specs, blocks_per_seq, strict=True):
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        pos = torch.arange(ctx + ql)
        seq_slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        slots.append(seq_slots[ctx:])
        ctx_k = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[seq_slots[:ctx]]
        ctx_v = v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[seq_slots[:ctx]]
        full_k.append(torch.cat([ctx_k, k[start : start + ql]]))
        full_v.append(torch.cat([ctx_v, v[start : start + ql]]))
        start += ql
    width = max(blocks_per_seq)
    block_tables = torch.zeros(len(specs), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    q_lens = [ql for _, ql in specs]
    seq_lens = [c + ql for c, ql in specs]
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        num_seqs=len(specs),
        slot_mapping=torch.cat(slots).to(torch.int64),
        block_tables=block_tables,
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
    if DEVICE.type != "cpu":
        q, k, v, k_cache, v_cache = (t.to(DEVICE) for t in (q, k, v, k_cache, v_cache))
        for name in ("slot_mapping", "block_tables", "query_start_loc", "seq_lens"):
            setattr(meta, name, getattr(meta, name).to(DEVICE))
    return q, k, v, k_cache, v_cache, meta, full_k, full_v


def naive_attention(q, meta, full_k, full_v, scale):
    q = q.cpu()
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // NUM_KV_HEADS
    start = 0
    for ql, sl, fk, fv in zip(meta.query_lens_cpu, meta.seq_lens_cpu, full_k, full_v, strict=True):
        ctx = sl - ql
        fk, fv = fk.cpu(), fv.cpu()
        kk = fk.float().repeat_interleave(group, dim=1)  # (sl, H, d)
        vv = fv.float().repeat_interleave(group, dim=1)
        for i in range(ql):
            qi = q[start + i].float()  # (H, d)
            scores = torch.einsum("hd,thd->ht", qi, kk[: ctx + i + 1]) * scale
            out[start + i] = torch.einsum("ht,thd->hd", scores.softmax(-1), vv[: ctx + i + 1])
        start += ql
    return out


MIXED = [(15, 1), (16, 1), (0, 7), (9, 5), (31, 1), (0, 1), (32, 16), (3, 2)]
DECODE_ONLY = [(15, 1), (16, 1), (0, 1), (47, 1)]
PREFILL_ONLY = [(0, 5), (0, 17), (0, 33), (0, 2)]
CHUNKS = [(16, 16), (5, 11), (1, 3)]  # contexts ending on and off block boundaries


@pytest.mark.parametrize(
    "specs", [MIXED, DECODE_ONLY, PREFILL_ONLY, CHUNKS], ids=["mixed", "decode", "prefill", "chunks"]
)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 16, 5])
def test_matches_naive_attention(specs, group, block_size):
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(specs, block_size, NUM_KV_HEADS * group)
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    scale = HEAD_DIM**-0.5
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(
        out.cpu(), naive_attention(q, meta, full_k, full_v, scale), atol=1e-5, rtol=1e-5
    )
    # The new tokens' K/V are in the cache at their slots.
    flat_k = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    torch.testing.assert_close(flat_k[meta.slot_mapping], k)
    # A second layer (same plan, other cache) reuses the step's indices.
    out2 = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale)
    torch.testing.assert_close(out2, out)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="decode chunking is a CPU cache optimization")
@pytest.mark.parametrize("specs", [[(c, 1) for c in range(0, 44, 4)], [*MIXED, *DECODE_ONLY, *MIXED]])
def test_decode_group_in_chunks(monkeypatch, specs):
    # Tiny chunk budget: the decode sequences are cut into runs of _MIN_CHUNK_SEQS.
    monkeypatch.setattr(torch_backend, "_CHUNK_BYTES", 1)
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(specs, 4, 6)
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.5)
    (decode,) = [g for g in backend._plan.groups if g.max_q == 1]
    assert len(next(iter(decode.chunks.values()))) > 1
    torch.testing.assert_close(out.cpu(), naive_attention(q, meta, full_k, full_v, 0.5), atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32_reference():
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(MIXED, 16, 6, dtype=torch.bfloat16)
    backend = get_attention_backend("torch", torch.device("cpu"))
    backend.prepare(meta)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float().cpu(), naive_attention(q, meta, full_k, full_v, 0.3), atol=3e-2, rtol=3e-2
    )


def test_negative_slots_are_not_written():
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch([(4, 3)], 4, 2)
    meta.slot_mapping[1] = -1
    before = k_cache.clone()
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    backend.forward(q, k, v, k_cache, v_cache, meta, 1.0)
    changed = (k_cache != before).any(-1).any(-1).view(-1).nonzero().squeeze(1).tolist()
    assert changed == [meta.slot_mapping[0].item(), meta.slot_mapping[2].item()]


def test_forward_without_prepare_is_an_error():
    q, k, v, k_cache, v_cache, meta, _, _ = make_batch([(0, 2)], 4, 2)
    backend = TorchAttentionBackend()
    with pytest.raises(RuntimeError, match="prepare"):
        backend.forward(q, k, v, k_cache, v_cache, meta, 1.0)
    backend.prepare(meta)
    _, _, _, _, _, other_meta, _, _ = make_batch([(0, 2)], 4, 2)
    with pytest.raises(RuntimeError, match="prepare"):
        backend.forward(q, k, v, k_cache, v_cache, other_meta, 1.0)


def test_factory():
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    # Forced on CPU, triton runs its kernels in the interpreter (for tests and checks).
    assert type(get_attention_backend("triton", torch.device("cpu"))).__name__ == "TritonAttentionBackend"
    with pytest.raises(ValueError, match="unknown"):
        get_attention_backend("flash", torch.device("cpu"))
