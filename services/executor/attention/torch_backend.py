"""Paged attention in plain PyTorch: the CPU backend and the reference for other backends.

Per step, `prepare` splits the sequences into two groups and builds their index tensors
on the host side once:

    decode group  (query_len == 1): q is (S, kv_heads, group, d), one query per sequence
    prefill group (query_len  > 1): queries padded to (S, max_q), causal+padding mask

Per layer: one index_copy_ writes the new K/V through slot_mapping; for each group one
index_select gathers whole blocks of K/V into (S, blocks * block_size, kv_heads, d),
and one scaled_dot_product_attention call does the math. Query heads sharing a KV head
are folded into the query-length axis, so GQA needs no copy of K/V per query head.

NOTE: decode attention is memory-bound on CPU, and the gather copies every context K/V
once more. A large decode group is therefore cut into chunks of sequences whose gathered
K/V (about _CHUNK_BYTES) stays in cache between the copy and the attention that reads
it; a small batch is one chunk. Chunks are sized in bytes, never one per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from services.executor.attention.backend import AttentionBackend, AttentionMetadata

_CHUNK_BYTES = 4 << 20
_MIN_CHUNK_SEQS = 4


@dataclass
class _Keys:
    """Which cache blocks a run of sequences reads, and the mask over their keys."""

    block_ids: torch.Tensor  # (S * nb,) int64: each sequence's first nb blocks, row-major
    num_seqs: int
    num_keys: int  # nb * block_size: the padded key length L
    mask: torch.Tensor  # decode: (S, 1, 1, L); prefill: (S, max_q, L). True = attend


@dataclass
class _Group:
    keys: _Keys
    max_q: int = 1
    query_index: torch.Tensor | None = None  # tokens gathered as queries; None: all, in order
    out_index: torch.Tensor | None = None  # prefill: padded rows that hold real tokens
    token_index: torch.Tensor | None = None  # batch positions of the group's tokens; None: all
    seq_lens: np.ndarray | None = None  # decode: to cut chunks once the K/V row size is known
    meta: AttentionMetadata | None = None
    seqs: np.ndarray | None = None
    chunks: dict[int, list[tuple[int, int, _Keys]]] = field(default_factory=dict)  # by bytes/token
    folded_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # by GQA group size


@dataclass
class _Plan:
    meta: AttentionMetadata
    write_slots: torch.Tensor  # slots of the new tokens that are written
    write_index: torch.Tensor | None  # which new tokens those are; None: all
    groups: list[_Group]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._plan: _Plan | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        self._plan = _build_plan(meta)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        plan = self._plan
        if plan is None or plan.meta is not meta:
            raise RuntimeError("TorchAttentionBackend.prepare(meta) was not called for this step")
        _write_kv(plan, k, v, k_cache, v_cache)
        num_tokens, num_heads, head_dim = q.shape
        g = num_heads // k_cache.shape[2]
        if len(plan.groups) == 1 and plan.groups[0].token_index is None:
            return _attend(plan.groups[0], q, k_cache, v_cache, g, scale)
        out = q.new_empty(num_tokens, num_heads, head_dim)
        for group in plan.groups:
            out[group.token_index] = _attend(group, q, k_cache, v_cache, g, scale)
        return out


def _write_kv(plan: _Plan, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    if plan.write_index is not None:
        k, v = k[plan.write_index], v[plan.write_index]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, plan.write_slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, plan.write_slots, v)


def _gather(cache: torch.Tensor, keys: _Keys) -> torch.Tensor:
    """(S, kv_heads, L, d) view of each sequence's blocks, in order."""
    blocks = torch.index_select(cache, 0, keys.block_ids)
    return blocks.view(keys.num_seqs, keys.num_keys, cache.shape[2], cache.shape[3]).transpose(1, 2)


def _attend(
    group: _Group, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: int, scale: float
) -> torch.Tensor:
    """Attention output of the group's tokens, (group tokens, heads, d), in batch order."""
    if group.query_index is not None:
        q = q[group.query_index]
    if group.max_q == 1:
        return _attend_decode(group, q, k_cache, v_cache, g, scale)
    s, kv_heads, d, mq = group.keys.num_seqs, k_cache.shape[2], q.shape[2], group.max_q
    k, v = _gather(k_cache, group.keys), _gather(v_cache, group.keys)
    # (S*mq, H, d) -> (S, kv_heads, mq*g, d): rows are (query position, head in group).
    qf = q.reshape(s, mq, kv_heads, g, d).transpose(1, 2).reshape(s, kv_heads, mq * g, d)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=_folded_mask(group, g), scale=scale)
    # reshape, not view: GPU kernels may return another memory layout.
    out = out.reshape(s, kv_heads, mq, g, d).transpose(1, 2).reshape(s * mq, kv_heads * g, d)
    return out if group.out_index is None else out[group.out_index]


def _attend_decode(
    group: _Group, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: int, scale: float
) -> torch.Tensor:
    # One query per sequence: the g query heads of a KV head act as g queries.
    s, kv_heads, d = group.keys.num_seqs, k_cache.shape[2], q.shape[2]
    q = q.reshape(s, kv_heads, g, d)
    if k_cache.device.type == "cpu":
        chunks = _decode_chunks(group, 2 * k_cache[0, 0].numel() * k_cache.element_size())
    else:  # a GPU wants one big kernel launch, not cache-sized pieces
        chunks = [(0, s, group.keys)]
    if len(chunks) == 1:
        keys = chunks[0][2]
        out = F.scaled_dot_product_attention(
            q, _gather(k_cache, keys), _gather(v_cache, keys), attn_mask=keys.mask, scale=scale
        )
        return out.reshape(s, kv_heads * g, d)
    out = q.new_empty(s, kv_heads, g, d)
    for start, stop, keys in chunks:
        out[start:stop] = F.scaled_dot_product_attention(
            q[start:stop], _gather(k_cache, keys), _gather(v_cache, keys), attn_mask=keys.mask, scale=scale
        )
    return out.view(s, kv_heads * g, d)


def _folded_mask(group: _Group, g: int) -> torch.Tensor:
    mask = group.folded_masks.get(g)
    if mask is None:
        s, mq, keys = group.keys.mask.shape
        mask = group.keys.mask[:, None, :, None, :].expand(s, 1, mq, g, keys).reshape(s, 1, mq * g, keys)
        group.folded_masks[g] = mask
    return mask


def _decode_chunks(group: _Group, bytes_per_token: int) -> list[tuple[int, int, _Keys]]:
    """The decode group cut into runs of sequences of about _CHUNK_BYTES of K+V each
    (computed at the first layer, when the cache's row size is known)."""
    chunks = group.chunks.get(bytes_per_token)
    if chunks is not None:
        return chunks
    lens = group.seq_lens
    per_seq = int(lens.max()) * bytes_per_token
    size = max(_MIN_CHUNK_SEQS, _CHUNK_BYTES // max(per_seq, 1))
    if size >= len(lens):
        chunks = [(0, len(lens), group.keys)]
    else:
        chunks = [
            (a, min(a + size, len(lens)), _keys(group.meta, group.seqs[a : a + size], lens[a : a + size]))
            for a in range(0, len(lens), size)
        ]
    group.chunks[bytes_per_token] = chunks
    return chunks


# ---------------------------------------------------------------------- planning
def _build_plan(meta: AttentionMetadata) -> _Plan:
    device = meta.slot_mapping.device
    q_lens = np.asarray(meta.query_lens_cpu, dtype=np.int64)
    seq_lens = np.asarray(meta.seq_lens_cpu, dtype=np.int64)
    starts = np.zeros(len(q_lens) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=starts[1:])

    slots = meta.slot_mapping.to(torch.int64)
    write_index = None
    keep = slots >= 0
    if not bool(keep.all()):
        write_index = keep.nonzero().squeeze(1)
        slots = slots[write_index]

    decode = np.flatnonzero(q_lens == 1)
    prefill = np.flatnonzero(q_lens > 1)
    alone = len(decode) == 0 or len(prefill) == 0
    groups = []
    if len(decode):
        groups.append(_decode_group(meta, decode, seq_lens, starts, alone, device))
    if len(prefill):
        groups.append(_prefill_group(meta, prefill, q_lens, seq_lens, starts, alone, device))
    return _Plan(meta, slots, write_index, groups)


def _keys(
    meta: AttentionMetadata, seqs: np.ndarray, lens: np.ndarray, q_lens: np.ndarray | None = None
) -> _Keys:
    """Blocks and mask for sequences `seqs` (rows of the block table) with these lengths.
    Without q_lens: one query each, at the last position (decode)."""
    device = meta.block_tables.device
    nb = -(-int(lens.max()) // meta.block_size)
    num_keys = nb * meta.block_size
    table = meta.block_tables[:, :nb]
    if len(seqs) != meta.num_seqs:
        table = table[torch.from_numpy(seqs).to(device)]
    keys = np.arange(num_keys)
    if q_lens is None:
        mask = (keys[None, :] < lens[:, None])[:, None, None, :]
    else:
        # Query i of a sequence sits at position ctx + i and sees keys 0..ctx+i. Padded
        # rows (i >= q_len) see the whole sequence: no row is fully masked (NaN).
        rows = np.arange(int(q_lens.max()))[None, :, None]
        ctx = (lens - q_lens)[:, None, None]
        mask = (keys[None, None, :] <= ctx + rows) & (keys[None, None, :] < lens[:, None, None])
    return _Keys(
        block_ids=table.reshape(-1).to(torch.int64),
        num_seqs=len(seqs),
        num_keys=num_keys,
        mask=torch.from_numpy(mask).to(device),
    )


def _decode_group(meta, seqs, seq_lens, starts, alone: bool, device) -> _Group:
    # Alone, every sequence is one token in order: the batch is the group, no indexing.
    in_order = alone and meta.num_tokens == len(seqs)
    tokens = None if in_order else torch.from_numpy(starts[seqs]).to(device)
    lens = seq_lens[seqs]
    return _Group(
        keys=_keys(meta, seqs, lens),
        query_index=tokens,
        token_index=tokens,
        seq_lens=lens,
        meta=meta,
        seqs=seqs,
    )


def _prefill_group(meta, seqs, q_lens, seq_lens, starts, alone: bool, device) -> _Group:
    qls = q_lens[seqs]
    mq = int(qls.max())
    rows = np.arange(mq)[None, :]
    real = rows < qls[:, None]  # (S, mq): padded query rows are False
    # Padded rows repeat the last real query; their outputs are dropped.
    query_index = starts[seqs][:, None] + np.minimum(rows, qls[:, None] - 1)
    flat_real = np.flatnonzero(real.reshape(-1))
    all_real = len(flat_real) == real.size
    return _Group(
        keys=_keys(meta, seqs, seq_lens[seqs], qls),
        max_q=mq,
        query_index=None if alone and all_real else torch.from_numpy(query_index.reshape(-1)).to(device),
        out_index=None if all_real else torch.from_numpy(flat_real).to(device),
        token_index=None if alone else torch.from_numpy(query_index.reshape(-1)[flat_real]).to(device),
    )
