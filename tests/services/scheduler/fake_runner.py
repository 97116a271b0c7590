"""A tiny stand-in for the executors' model runner, for scheduler tests.

It follows the StepPlan contract the real runner relies on, and checks it: requests
are sent once as new and then as diffs, `num_computed_tokens` is what is in the KV
before the step, block tables cover every scheduled slot. Its "KV cache" stores the
token id written at each slot, and a sampled token is a function of the sequence
*read back through the block table*, so a wrong block id, a block shared by mistake,
or a prefix hit on the wrong block changes the outputs or trips an assertion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import StepPlan, StepResult
from shared.sampling_params import SamplingParams
from shared.stop import check_stop

FIRST_TOKEN = 10  # sampled tokens are >= this, so small ids (EOS, stop ids) appear only when forced


@dataclass
class _Seq:
    tokens: list[int]  # prompt + output, as the executors know them
    block_ids: list[int]
    num_computed: int
    num_prompt: int
    params: SamplingParams


@dataclass
class FakeRunner:
    block_size: int
    num_blocks: int
    # Finishes are decided here, as the real runner decides them (the scheduler applies them).
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    vocab_size: int = 1000
    # req_id -> {output index: token}: force e.g. an EOS at the 3rd generated token.
    forced: dict[str, dict[int, int]] = field(default_factory=dict)
    # Requests whose next sampling is deferred once (as the real runner defers a request
    # whose grammar is still compiling): no token; the scheduler recomputes the last one.
    defer: set[str] = field(default_factory=set)
    seqs: dict[str, _Seq] = field(default_factory=dict)
    kv: dict[int, int] = field(default_factory=dict)  # slot -> token id written there
    samples: list[tuple[int, str]] = field(default_factory=list)  # (step_id, req_id)
    chunks: list[tuple[int, str, int]] = field(default_factory=list)  # (step_id, req_id, n)

    def _slot(self, seq: _Seq, pos: int) -> int:
        block = seq.block_ids[pos // self.block_size]
        assert 0 <= block < self.num_blocks, f"block id {block} out of range"
        return block * self.block_size + pos % self.block_size

    def _read(self, req_id: str, seq: _Seq, end: int) -> list[int]:
        out = [self.kv.get(self._slot(seq, p), -1) for p in range(end)]
        assert out == seq.tokens[:end], f"{req_id}: KV cache does not hold its tokens"
        return out

    def step(self, plan: StepPlan) -> StepResult:
        for req_id in plan.finished_req_ids:
            self.seqs.pop(req_id, None)
        for new in plan.new_requests:
            assert new.req_id not in self.seqs, f"{new.req_id} sent as new twice"
            self.seqs[new.req_id] = _Seq(
                list(new.prompt_token_ids) + list(new.output_token_ids),
                list(new.block_ids),
                new.num_computed_tokens,
                len(new.prompt_token_ids),
                new.sampling_params,
            )
        for c in plan.cached_requests:
            seq = self.seqs[c.req_id]
            assert seq.num_computed == c.num_computed_tokens, (c.req_id, seq.num_computed, c)
            seq.block_ids.extend(c.new_block_ids)
        assert plan.total_num_scheduled_tokens == sum(plan.num_scheduled_tokens.values())

        # Write every scheduled token first, then read: as a real forward does per layer.
        for req_id, n in plan.num_scheduled_tokens.items():
            seq = self.seqs[req_id]
            start, end = seq.num_computed, seq.num_computed + n
            assert n >= 1 and end <= len(seq.tokens), (req_id, start, n, len(seq.tokens))
            assert len(seq.block_ids) * self.block_size >= end, f"{req_id}: blocks do not cover the step"
            for p in range(start, end):
                self.kv[self._slot(seq, p)] = seq.tokens[p]
            seq.num_computed = end
            self.chunks.append((plan.step_id, req_id, n))

        req_ids, sampled, reasons = [], [], []
        for req_id in plan.num_scheduled_tokens:
            seq = self.seqs[req_id]
            if seq.num_computed != len(seq.tokens):
                continue  # a mid-prompt chunk samples nothing
            context = self._read(req_id, seq, seq.num_computed)
            if req_id in self.defer:
                self.defer.discard(req_id)
                seq.num_computed -= 1
                req_ids.append(req_id)
                sampled.append([])
                reasons.append(0)
                continue
            out_idx = len(seq.tokens) - seq.num_prompt
            tok = self.forced.get(req_id, {}).get(out_idx)
            if tok is None:
                tok = FIRST_TOKEN + sum((i + 1) * t for i, t in enumerate(context)) % (
                    self.vocab_size - FIRST_TOKEN
                )
            seq.tokens.append(tok)
            req_ids.append(req_id)
            sampled.append([tok])
            reason = check_stop(seq.tokens[seq.num_prompt :], seq.num_prompt, seq.params,
                                self.eos_token_ids, self.max_model_len)
            reasons.append(0 if reason is None else int(reason))
            self.samples.append((plan.step_id, req_id))
        return StepResult(step_id=plan.step_id, req_ids=req_ids, sampled_token_ids=sampled,
                          finish_reasons=reasons)


def expected_tokens(prompt: list[int], n: int, vocab_size: int = 1000) -> list[int]:
    """What FakeRunner generates for `prompt` when nothing is forced."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(FIRST_TOKEN + sum((i + 1) * t for i, t in enumerate(seq)) % (vocab_size - FIRST_TOKEN))
    return seq[len(prompt) :]
