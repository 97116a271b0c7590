"""The runner's per-request state, and the flattened batch built from it each step.

A step plan names requests and how many tokens each computes; this module turns that
into one unpadded batch:

    req:          a (prefill 4)   b (decode)   c (chunk 2)
    input_ids     a0 a1 a2 a3     b7           c4 c5
    positions     0  1  2  3      7            4  5
    slot_mapping  block_ids[pos // block_size] * block_size + pos % block_size
    logits rows   a3 (a samples), b7 (b samples); c is mid-prompt and samples nothing

A request with drafts (speculative decoding) computes its pending token and the drafts,
and every one of those positions is a logits row:

    req:          b (decode + drafts d8 d9)
    input_ids     b7 d8 d9       logits rows b7 d8 d9 (verification scores all three)

All index arrays are built with numpy and moved to the device once per field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from services.executor.attention.backend import AttentionMetadata
from services.executor.sampler import SamplingState
from shared.protocol import CachedRequestData, NewRequestData


@dataclass(slots=True)
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + output known so far
    block_ids: list[int]
    num_computed_tokens: int  # tokens in the KV cache before the current step
    sampling: SamplingState
    reply_to: str = ""  # the gateway channel its tokens stream to (executor service)
    traceparent: str = ""
    # Draft tokens scheduled this step after token_ids (speculative decoding); they are
    # scored, never appended: verification appends what it accepts.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.sampling.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.sampling.output_token_ids)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.sampling.output_token_ids.append(token_id)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (num_tokens,) int64
    positions: torch.Tensor  # (num_tokens,) int64
    meta: AttentionMetadata
    # Rows of the hidden states that sample: one per sampling request, 1 + len(drafts)
    # for a request with drafts, consecutive, in the order of sampling_requests.
    logits_indices: torch.Tensor
    sampling_requests: list[RequestState]  # in plan order


class InputBatch:
    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.requests: dict[str, RequestState] = {}

    def add(self, new: NewRequestData, generator: torch.Generator | None) -> RequestState:
        if new.req_id in self.requests:
            raise ValueError(f"request {new.req_id!r} sent as new while the runner still holds it")
        prompt = list(new.prompt_token_ids)
        output = list(new.output_token_ids)
        state = RequestState(
            req_id=new.req_id,
            token_ids=prompt + output,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            sampling=SamplingState(new.sampling_params, prompt, output, generator),
            reply_to=new.reply_to,
            traceparent=new.traceparent,
        )
        self.requests[new.req_id] = state
        return state

    def update(self, cached: CachedRequestData) -> None:
        state = self.requests.get(cached.req_id)
        if state is None:
            raise KeyError(f"step plan updates request {cached.req_id!r}, which the runner does not hold")
        state.block_ids.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens

    def remove(self, req_id: str) -> None:
        # Finished ids may name requests that never reached this runner (aborted while waiting).
        self.requests.pop(req_id, None)

    def set_drafts(self, scheduled_spec_tokens: dict[str, list[int]]) -> None:
        """This step's drafts (a plan carries each request's drafts for its step only)."""
        for state in self.requests.values():
            if state.spec_token_ids:
                state.spec_token_ids = []
        for req_id, drafts in scheduled_spec_tokens.items():
            self._get(req_id).spec_token_ids = list(drafts)

    def prepare(self, num_scheduled_tokens: dict[str, int]) -> ModelInputs:
        """The batch for one step, requests in the plan's order (zero-token entries skipped)."""
        scheduled = [(r, n) for r, n in num_scheduled_tokens.items() if n > 0]
        states = [self._get(r) for r, _ in scheduled]
        num_drafts = np.fromiter((len(s.spec_token_ids) for s in states), dtype=np.int64, count=len(states))
        num_seqs = len(states)
        q_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=num_seqs)
        computed = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=num_seqs)
        seq_lens = computed + q_lens
        known = np.fromiter((len(s.token_ids) for s in states), dtype=np.int64, count=num_seqs) + num_drafts
        bs = self.block_size
        blocks_needed = -(-seq_lens // bs)
        self._check(states, seq_lens, known, blocks_needed)

        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        num_tokens = int(query_start[-1])
        if num_tokens == num_seqs:  # pure decode: one token each
            token_ids = [s.token_ids[c] for s, c in zip(states, computed.tolist(), strict=True)]
        else:
            token_ids = []
            for s, c, n in zip(states, computed.tolist(), q_lens.tolist(), strict=True):
                # Drafts ride on a decode: the pending token, then the drafts.
                token_ids.extend(s.token_ids[c : c + n - len(s.spec_token_ids)])
                token_ids.extend(s.spec_token_ids)
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        positions = np.arange(num_tokens) - np.repeat(query_start[:-1] - computed, q_lens)

        width = int(blocks_needed.max())
        block_tables = np.zeros((num_seqs, width), dtype=np.int32)
        for i, s in enumerate(states):
            row = s.block_ids[:width]
            block_tables[i, : len(row)] = row
        slot_mapping = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        samples = seq_lens == known
        dev = self.device
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_lens_cpu=q_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=bs,
        )
        return ModelInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(positions).to(dev),
            meta=meta,
            logits_indices=torch.from_numpy(
                _logits_rows(query_start[1:][samples], num_drafts[samples])
            ).to(dev),
            sampling_requests=[s for s, flag in zip(states, samples.tolist(), strict=True) if flag],
        )

    def _get(self, req_id: str) -> RequestState:
        state = self.requests.get(req_id)
        if state is None:
            raise KeyError(f"step plan schedules request {req_id!r}, which the runner does not hold")
        return state

    def _check(self, states, seq_lens: np.ndarray, known: np.ndarray, blocks_needed: np.ndarray) -> None:
        if np.any(seq_lens > known):
            i = int(np.argmax(seq_lens > known))
            raise ValueError(
                f"request {states[i].req_id!r}: step would compute up to token {int(seq_lens[i])} "
                f"but only {int(known[i])} tokens are known"
            )
        have = np.fromiter((len(s.block_ids) for s in states), dtype=np.int64, count=len(states))
        if np.any(have < blocks_needed):
            i = int(np.argmax(have < blocks_needed))
            raise ValueError(
                f"request {states[i].req_id!r}: {int(have[i])} blocks cannot hold {int(seq_lens[i])} tokens"
            )


def _logits_rows(query_ends: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """Each sampling request's last 1 + num_drafts token rows, in order."""
    if not num_drafts.any():
        return query_ends - 1
    counts = num_drafts + 1
    first = np.repeat(query_ends - counts, counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return first + offsets
