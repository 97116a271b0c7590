"""Per-request grammar matchers: mask each step's logits, advance with each accepted token.

Owned by the model runner on rank 0 (the rank that samples); keyed by request id and
dropped with the request. In a step:

    logits (sampling rows) ─▶ mask(): constrained rows' disallowed tokens → -inf
                           ─▶ sampler (min_tokens, bias, penalties, temperature, top-k/p …)
    each appended token    ─▶ accept() → terminated? ─▶ check_stop(grammar_terminated=…)

Masking comes before the sampler, so its all-greedy argmax fast path also picks only
allowed tokens. Constrained requests get no speculative drafts (the runner proposes none
for them), so a matcher never has to roll back a rejected draft.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.executor.structured.compiler import GrammarCache
from shared.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    compiled: Any  # Future of the compiled grammar until the first mask, then None
    replay: list[int] = field(default_factory=list)  # output before a preemption, re-accepted
    matcher: Any = None  # xgrammar.GrammarMatcher


class GrammarMatchers:
    def __init__(self, cache: GrammarCache) -> None:
        self.cache = cache
        self._entries: dict[str, _Entry] = {}
        self._bitmask: torch.Tensor | None = None  # (rows, ceil(vocab / 32)) int32, reused

    def add(self, req_id: str, params: SamplingParams, output_token_ids: Sequence[int]) -> None:
        """Start compiling a new (or preempted and re-sent) request's grammar, if it has one."""
        spec = params.structured_outputs
        if spec is not None:
            self._entries[req_id] = _Entry(self.cache.get(spec), list(output_token_ids))

    def remove(self, req_id: str) -> None:
        self._entries.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._entries

    def __bool__(self) -> bool:
        return bool(self._entries)

    def _matcher(self, req_id: str) -> Any:
        entry = self._entries[req_id]
        if entry.matcher is None:
            import xgrammar as xgr

            try:
                compiled = entry.compiled.result()
            except Exception:
                # The gateway and LLM compiled this spec's grammar already, so this is an
                # engine fault (e.g. no tokenizer): end the request (only a stop token is
                # allowed) instead of failing every request in the step.
                log.exception("request %s: its grammar did not compile; ending it", req_id)
                compiled = self.cache.stop_only()
            entry.matcher = xgr.GrammarMatcher(compiled)
            entry.compiled = None
            for t in entry.replay:  # a preempted request resumes where its output left off
                entry.matcher.accept_token(t)
            entry.replay = []
        return entry.matcher

    def mask(self, logits: torch.Tensor, rows: Sequence[tuple[int, str]]) -> None:
        """Set the logits of tokens each constrained row's grammar forbids next to -inf, in
        place. `rows`: (row of `logits`, request id) for the constrained requests."""
        if not rows:
            return
        import xgrammar as xgr

        vocab = self.cache.vocab_size
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = xgr.allocate_token_bitmask(max(len(rows), 8), vocab)
        bitmask = self._bitmask[: len(rows)]
        for i, (_, req_id) in enumerate(rows):
            self._matcher(req_id).fill_next_token_bitmask(bitmask, i)
        # Expand to booleans over the model's vocabulary: works for any logits dtype/device.
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)[:, :vocab]
        index = torch.tensor([r for r, _ in rows], dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, index)[:, :vocab]
        sub.masked_fill_(~allowed.to(logits.device), float("-inf"))
        logits[:, :vocab].index_copy_(0, index, sub)
        if logits.shape[1] > vocab:  # padded LM-head columns are never a grammar's token
            logits[index, vocab:] = float("-inf")

    def accept(self, req_id: str, token_id: int) -> bool:
        """Advance the request's matcher; True when its grammar has terminated."""
        m = self._matcher(req_id)
        if not m.accept_token(token_id):
            # Only a masked-out token can get here (e.g. min_tokens banned the only allowed
            # stop token): end the request rather than continue outside its grammar.
            log.warning("request %s: token %d is outside its grammar; finishing it", req_id, token_id)
            return True
        return m.is_terminated()
