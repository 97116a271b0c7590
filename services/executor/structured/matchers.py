"""Per-request grammar matchers: mask each step's logits, advance with each accepted token.

Owned by the model runner on rank 0 (the rank that samples); keyed by request id and
dropped with the request. In a step:

    logits (sampling rows) ─▶ mask(): constrained rows' disallowed tokens → -inf
                           ─▶ sampler (min_tokens, bias, penalties, temperature, top-k/p …)
    each appended token    ─▶ accept() → terminated? ─▶ check_stop(grammar_terminated=…)

Masking comes before the sampler, so its all-greedy argmax fast path also picks only
allowed tokens. A request with speculative drafts has 1 + k rows: row j is masked for
the state after drafts 0..j-1, which mask() reaches by accepting the drafts and then
rolls back, so the matcher is again where the request's output ends. Verification then
never accepts a draft the grammar forbids (its target probability is 0), and accept()
advances the matcher by the tokens actually emitted. Rows after a draft the grammar
rejects (or after one that ends it) are never reached: they repeat the last filled mask.
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

    def ready(self, req_id: str) -> bool:
        """Whether the request's grammar is compiled (a request that is still waiting for
        it samples nothing this step instead of holding up the batch)."""
        entry = self._entries[req_id]
        return entry.matcher is not None or entry.compiled.done()

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

    def mask(self, logits: torch.Tensor, rows: Sequence[tuple[int, str, Sequence[int]]]) -> None:
        """Set the logits of tokens each constrained row's grammar forbids next to -inf, in
        place. `rows`: (first row of `logits`, request id, draft tokens) for the constrained
        requests; a request has 1 + len(drafts) rows from its first."""
        if not rows:
            return
        import xgrammar as xgr

        vocab = self.cache.vocab_size
        n = sum(1 + len(drafts) for _, _, drafts in rows)
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = xgr.allocate_token_bitmask(max(n, 8), vocab)
        bitmask = self._bitmask[:n]
        index: list[int] = []
        for first, req_id, drafts in rows:
            i = len(index)
            index.extend(range(first, first + 1 + len(drafts)))
            self._fill(self._matcher(req_id), bitmask, i, drafts)
        # Expand to booleans over the model's vocabulary: works for any logits dtype/device.
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(n, -1)[:, :vocab]
        index_t = torch.tensor(index, dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, index_t)[:, :vocab]
        sub.masked_fill_(~allowed.to(logits.device), float("-inf"))
        logits[:, :vocab].index_copy_(0, index_t, sub)
        if logits.shape[1] > vocab:  # padded LM-head columns are never a grammar's token
            logits[index_t, vocab:] = float("-inf")

    @staticmethod
    def _fill(matcher: Any, bitmask: torch.Tensor, row: int, drafts: Sequence[int]) -> None:
        """Rows row … row + len(drafts): the masks after each prefix of the drafts; the
        matcher ends where it started."""
        matcher.fill_next_token_bitmask(bitmask, row)
        end = row + 1 + len(drafts)
        accepted = 0
        for j, token_id in enumerate(drafts, 1):
            if not matcher.is_terminated() and matcher.accept_token(token_id):
                accepted += 1
            if accepted < j or matcher.is_terminated():  # rows from here on are unreachable
                bitmask[row + j : end] = bitmask[row + j - 1]
                break
            matcher.fill_next_token_bitmask(bitmask, row + j)
        if accepted:
            matcher.rollback(accepted)

    def accept(self, req_id: str, token_id: int) -> bool:
        """Advance the request's matcher; True when its grammar has terminated."""
        m = self._matcher(req_id)
        if not m.accept_token(token_id):
            # Only a masked-out token can get here (e.g. min_tokens banned the only allowed
            # stop token): end the request rather than continue outside its grammar.
            log.warning("request %s: token %d is outside its grammar; finishing it", req_id, token_id)
            return True
        return m.is_terminated()
