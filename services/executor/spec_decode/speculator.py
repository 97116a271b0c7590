"""The runner's speculative decoding: sample a step that carries drafts, and propose the
next drafts. One object per runner (rank 0 proposes; every rank verifies nothing itself:
rank 0 samples for all, as without speculation).

    step with drafts ─▶ sample(): requests without drafts ─▶ the plain sampler (one row each)
                                  requests with drafts    ─▶ verify() (1 + k rows each)
    after the step   ─▶ propose(): back-off picks each request's draft length from its
                        acceptance and what a row costs in this batch (step_cost.py,
                        fitted to the decode steps' times, given by the runner through
                        record_step), capped so that accepted drafts + the bonus token
                        never pass max_tokens or max_model_len; the n-gram or
                        draft-model proposer fills it

Seeded requests stay reproducible run to run, but with speculation their tokens can
depend on how many drafts the token budget let through (as in vLLM); greedy outputs
are exactly those of plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.executor.input_batch import RequestState
from services.executor.sampler import Sampler
from services.executor.spec_decode.backoff import DraftBackoff
from services.executor.spec_decode.ngram import NgramProposer
from services.executor.spec_decode.step_cost import StepCost
from services.executor.spec_decode.verify import Verified, verify
from shared.speculative_config import SpeculativeConfig


class Speculator:
    def __init__(self, spec: SpeculativeConfig, max_model_len: int, draft_model=None) -> None:
        """`draft_model`: a DraftModelProposer for method draft_model, else None (n-gram)."""
        self.spec = spec
        self.max_model_len = max_model_len
        self.backoff = DraftBackoff(spec.num_speculative_tokens, spec.backoff)
        self.cost = StepCost()
        self._last_rows = 0
        self.draft_model = draft_model
        self.ngram = (
            None if spec.uses_draft_model else NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        )

    def remove(self, req_id: str) -> None:
        self.backoff.remove(req_id)
        if self.draft_model is not None:
            self.draft_model.remove(req_id)

    def sample(
        self, sampler: Sampler, logits: torch.Tensor, requests: Sequence[RequestState]
    ) -> list[Verified]:
        """Tokens of each sampling request; `logits` has 1 + len(drafts) rows per request."""
        plain = [i for i, r in enumerate(requests) if not r.spec_token_ids]
        spec = [i for i, r in enumerate(requests) if r.spec_token_ids]
        starts = [0]
        for r in requests:
            starts.append(starts[-1] + 1 + len(r.spec_token_ids))
        out: list[Verified | None] = [None] * len(requests)
        dev = logits.device
        if plain:
            rows = torch.tensor([starts[i] for i in plain], dtype=torch.long, device=dev)
            x = logits if len(plain) == len(requests) else logits.index_select(0, rows)
            sampled = sampler(x, [requests[i].sampling for i in plain])
            for i, t, lp in zip(plain, sampled.token_ids, sampled.logprobs, strict=True):
                out[i] = Verified([t], 0, [] if lp is None else [lp])
        if spec:
            rows = torch.tensor(
                [row for i in spec for row in range(starts[i], starts[i + 1])], dtype=torch.long, device=dev
            )
            verified = verify(
                sampler,
                logits.index_select(0, rows),
                [requests[i].sampling for i in spec],
                [requests[i].spec_token_ids for i in spec],
            )
            for i, v in zip(spec, verified, strict=True):
                self.backoff.record(requests[i].req_id, len(requests[i].spec_token_ids), v.num_accepted)
                out[i] = v
        return out  # type: ignore[return-value]

    def record_step(self, num_tokens: int, max_query_len: int, seconds: float) -> None:
        """A step's forward-and-sample time; only decode steps (every request computes its
        pending token and its drafts, no prompt chunk) fit the per-row cost."""
        if max_query_len <= 1 + self.spec.num_speculative_tokens:
            self.cost.record(num_tokens, seconds)
            self._last_rows = num_tokens

    def propose(self, requests: Sequence[RequestState]) -> list[list[int]]:
        """Drafts for each request's next step ([] for a request that finished)."""
        threshold = self.cost.draft_threshold(len(requests), max(self._last_rows, len(requests)))
        limits = [self._limit(r, threshold) for r in requests]
        if self.draft_model is not None:
            return self.draft_model.propose(requests, limits)
        return [self.ngram.propose_one(r.token_ids, k) for r, k in zip(requests, limits, strict=True)]

    def _limit(self, r: RequestState, threshold: float) -> int:
        k = self.backoff.num_drafts(r.req_id, threshold)
        # Verification scores positions len-1 … len-1+k: all must be < max_model_len.
        k = min(k, self.max_model_len - len(r.token_ids))
        max_tokens = r.sampling.params.max_tokens
        if max_tokens is not None:
            # k accepted drafts + 1 target token must fit in what is left.
            k = min(k, max_tokens - r.num_output_tokens - 1)
        return max(0, k)
