"""Decode steps replayed from CUDA graphs.

A decode step of n sequences runs each layer's dozen kernels on n tokens. For n up to a few
hundred the GPU finishes each kernel faster than Python launches the next, so an eager step
is bound by launches. Here the model's forward is captured once per batch size in
`sizes`, and a decode step of n sequences replays the smallest captured size >= n:

    step inputs (n rows) ──copy──▶ static buffers[:n] ──▶ graph(bs).replay() ──▶ hidden[:n]
                                   rows n..bs-1: padding

What a graph needs, and how a step provides it:
- Fixed addresses: every input lives in a static buffer that each step copies into.
- Fixed shapes: batch padded to a captured size; the block-table buffer is max_model_len wide.
- No host decisions that depend on the step: the attention backend plans the capture for a
  context of max_model_len (its split-K count), and its kernels size each sequence's work
  from `seq_lens` on the device, so one graph serves every context length.
- Padding rows must not touch live state: their slot is -1 (write nothing) and their length
  is 1 (read one key of whatever block their stale table row names; the result is dropped).

Only the model's forward is captured; logits and sampling stay eager (they depend on the
requests' sampling parameters). Mixed prefill/decode steps, and decode steps larger than the
largest size, run eagerly.

`DecodeGraphs(..., capture=False)` runs the same padded forward without a graph, so the
padding logic is testable on CPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence

import torch

from services.executor.attention.backend import AttentionBackend, AttentionMetadata
from shared.config import EngineConfig

log = logging.getLogger(__name__)


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 (vLLM's set), up to max_num_seqs (which is kept)."""
    sizes = [s for s in [1, 2, 4, *range(8, 513, 8)] if s <= max_num_seqs]
    if max_num_seqs <= 512 and max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


def graph_sizes(
    config: EngineConfig, device: torch.device, backend: AttentionBackend
) -> tuple[list[int], str | None]:
    """The batch sizes to capture, and why there are none when the list is empty."""
    if config.enforce_eager:
        return [], "enforce_eager is set"
    if device.type != "cuda":
        return [], f"device is {device.type}"
    if not backend.supports_cuda_graphs:
        return [], f"the {backend.name} attention backend cannot be captured"
    if config.tensor_parallel_size > 1:
        # Capturing collectives needs NCCL graph support that this project cannot test yet.
        return [], "tensor_parallel_size > 1"
    if config.cuda_graph_sizes is not None:
        sizes = [s for s in config.cuda_graph_sizes if s <= config.max_num_seqs]  # sorted by config
    else:
        sizes = default_graph_sizes(config.max_num_seqs)
    return sizes, None if sizes else "no cuda_graph_sizes <= max_num_seqs"


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        sizes: Sequence[int],
        *,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one batch size")
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(set(sizes))
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        self.capture_graphs = capture
        n, dev = self.max_size, device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self._metas = {bs: self._meta(bs) for bs in self.sizes}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0  # decode steps served from a graph (or, without capture, padded)

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        """Warm every size up eagerly, then capture them, largest first, into one memory pool.

        The warm-ups come first so that nothing allocates inside a capture that should
        outlive it: Triton compiles each kernel variant, cuBLAS creates its workspaces and
        the attention backend grows its split-K scratch to the largest any size needs.
        """
        if not self.capture_graphs:
            return
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        for bs in reversed(self.sizes):
            self._forward(bs)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bs] = self._forward(bs)
            self._graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info(
            "captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s, %.0f MiB",
            len(self.sizes),
            self.max_size,
            time.perf_counter() - start,
            used / 2**20,
        )

    # ------------------------------------------------------------------ replay
    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.max_query_len == 1
            and meta.num_tokens == meta.num_seqs
            and 0 < meta.num_seqs <= self.max_size
        )

    def padded_size(self, n: int) -> int:
        i = bisect.bisect_left(self.sizes, n)
        if i == len(self.sizes):
            raise ValueError(f"decode batch of {n} is larger than the largest graph ({self.max_size})")
        return self.sizes[i]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode step's hidden states, (num_seqs, hidden), from the padded graph."""
        n = meta.num_seqs
        bs = self.padded_size(n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.num_replays += 1
        if not self.capture_graphs:
            return self._forward(bs)[:n]
        self._graphs[bs].replay()
        return self._outputs[bs][:n]

    # ------------------------------------------------------------------ internals
    def _meta(self, bs: int) -> AttentionMetadata:
        # Host-side lengths say "as long as the model allows": backends plan for the worst
        # case once, and the kernels read the real lengths from seq_lens.
        return AttentionMetadata(
            num_tokens=bs,
            num_seqs=bs,
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,
            block_size=self.block_size,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._metas[bs])
