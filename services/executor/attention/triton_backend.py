"""Triton attention backend: write-KV, paged decode (split-K) and prefill/extend over paged KV.

Per step (`prepare`): remember the step's shape and drop last step's plan. The plan itself
(split-K count, scratch buffer) also depends on the layer's head counts, which `prepare` does
not see, so the first layer of a step computes it and every later layer reuses it.

Per layer (`forward`): `reshape_and_cache` writes the new K/V, then one attention kernel:
`paged_decode` when every sequence has exactly one query token, else `paged_prefill`, which
also serves the decode rows of a mixed batch.

On CPU tensors the kernels run through Triton's interpreter (tests); on CUDA they compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.executor.attention.backend import AttentionBackend, AttentionMetadata
from services.executor.kernels.launch import use_interpreter
from services.executor.kernels.paged_decode import choose_num_splits, decode_workspace_numel, paged_decode
from services.executor.kernels.paged_prefill import paged_prefill
from services.executor.kernels.reshape_and_cache import reshape_and_cache


@dataclass(slots=True)
class _DecodePlan:
    heads: tuple[int, int, int]  # (num_heads, num_kv_heads, head_dim) it was made for
    num_splits: int
    workspace: torch.Tensor | None


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, num_splits: int | None = None) -> None:
        # num_splits: force the decode split-K count (tests, benchmarks); None picks per step.
        self._forced_splits = num_splits
        self._meta: AttentionMetadata | None = None
        self._plan: _DecodePlan | None = None
        # Scratch for split-K partials: grows, never shrinks, so steady-state steps allocate
        # nothing. A buffer it outgrows stays alive in _retired, since a captured CUDA graph
        # may still point at it.
        self._workspace: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []
        self._num_sms: dict[int, int] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._plan = None

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
        reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_tokens == 0:
            return out
        if meta.max_query_len == 1 and meta.num_tokens == meta.num_seqs:
            plan = self._decode_plan(q, k_cache, meta)
            paged_decode(
                q[: meta.num_seqs],
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                out=out[: meta.num_seqs],
                num_splits=plan.num_splits,
                workspace=plan.workspace,
            )
        else:
            paged_prefill(
                q[: meta.num_tokens],
                k_cache,
                v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.seq_lens,
                scale,
                meta.max_query_len,
                out=out[: meta.num_tokens],
            )
        return out

    def _decode_plan(self, q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> _DecodePlan:
        num_heads, head_dim = q.shape[1], q.shape[2]
        heads = (num_heads, k_cache.shape[2], head_dim)
        if self._plan is not None and self._plan.heads == heads and meta is self._meta:
            return self._plan
        if self._forced_splits is not None:
            splits = self._forced_splits
        elif use_interpreter(q.device):
            splits = 1
        else:
            splits = choose_num_splits(meta.num_seqs, heads[1], meta.max_seq_len, self._sm_count(q.device))
        workspace = None
        need = decode_workspace_numel(meta.num_seqs, num_heads, head_dim, splits)
        if need:
            ws = self._workspace
            if ws is None or ws.numel() < need or ws.device != q.device:
                if ws is not None:
                    self._retired.append(ws)
                ws = self._workspace = torch.empty(need, dtype=torch.float32, device=q.device)
            workspace = ws
        self._plan = _DecodePlan(heads, splits, workspace)
        self._meta = meta
        return self._plan

    def _sm_count(self, device: torch.device) -> int:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]
