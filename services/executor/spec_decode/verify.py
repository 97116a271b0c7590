"""Verify drafts: the target's logits at every scored position ─▶ the tokens to emit.

A request with k drafts has k+1 logits rows (its pending token and each draft). Row j
is processed exactly as a plain step would process the token at that position: its
`output_token_ids` are the request's output plus drafts[:j] (penalties, min_tokens and
the seeded draw index see the drafts before it), so the emitted tokens follow the same
distribution as without speculation, after logit_bias, penalties, temperature, top-k,
top-p and min-p, as vLLM applies them.

    greedy:   accept drafts while draft_j == argmax(row j); emit argmax at the first
              mismatch (or the bonus row): token-for-token what plain decoding gives
    seeded:   the same with the sampler's own seeded draw of each row (row j draws with
              token_seed(seed, k + j), as plain decoding draws token k + j): token-for-token
              what plain decoding gives with that seed, whatever the number of drafts
    random:   rejection_sampler.rejection_sample over the rows' full distributions

The seeded rule is rejection sampling too: drafts are deterministic (one-hot q), and a
draft d accepted iff an exact sample x ~ p equals it is accepted with probability p(d);
when rejected, x ~ p given x != d, which is the residual (p - q)+ normalised. It matters
because the number of drafts is not a function of the text (backoff.py weighs measured
step times): with per-step draws, a seeded request's tokens changed from run to run.

Logprobs (where asked) are those of each emitted token in its own row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from services.executor.sampler import Sampler, SamplingState
from services.executor.sampling.topk_topp import NEG_INF, apply_min_p, truncate
from services.executor.spec_decode.rejection_sampler import rejection_sample
from shared.protocol import Logprobs


@dataclass(slots=True)
class Verified:
    token_ids: list[int]  # accepted drafts, then one target token
    num_accepted: int  # drafts among token_ids
    logprobs: list[Logprobs]  # one per token where the request asked, else []


def verify(
    sampler: Sampler, logits: torch.Tensor, states: Sequence[SamplingState], drafts: Sequence[list[int]]
) -> list[Verified]:
    """`logits` has sum(len(d) + 1) rows: each request's rows together, in order."""
    row_states: list[SamplingState] = []
    for s, d in zip(states, drafts, strict=True):
        row_states.append(s)
        row_states += [replace(s, output_token_ids=s.output_token_ids + d[:j]) for j in range(1, len(d) + 1)]
    if logits.shape[0] != len(row_states):
        raise ValueError(f"{logits.shape[0]} logits rows for {len(row_states)} draft positions")
    if logits.shape[1] > sampler.vocab_size:
        logits = logits[:, : sampler.vocab_size]
    processed = sampler.process_logits(logits, row_states)
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)

    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    seeded = [i for i, s in enumerate(states) if not s.params.greedy and _seeded(s)]
    random_ = [i for i, s in enumerate(states) if not s.params.greedy and not _seeded(s)]
    emitted: list[list[int]] = [[] for _ in states]
    accepted = [0] * len(states)

    def take_while_equal(i: int, target: list[int]) -> None:
        n = 0
        while n < len(drafts[i]) and drafts[i][n] == target[n]:
            n += 1
        emitted[i], accepted[i] = target[: n + 1], n

    if greedy:
        argmax = processed.argmax(dim=-1).tolist()
        for i in greedy:
            take_while_equal(i, argmax[starts[i] : starts[i + 1]])
    if seeded:
        rows = [r for i in seeded for r in range(starts[i], starts[i + 1])]
        # Each row its own generator: the sampler re-seeds every row's before drawing any.
        sampled = sampler.sample(
            processed.index_select(0, torch.tensor(rows, dtype=torch.long, device=processed.device)),
            [replace(row_states[r], generator=torch.Generator(row_states[r].generator.device))
             for r in rows],
        ).tolist()
        k = 0
        for i in seeded:
            n = starts[i + 1] - starts[i]
            take_while_equal(i, sampled[k : k + n])
            k += n
    if random_:
        _sample_random(sampler, processed, row_states, drafts, starts, random_, emitted, accepted)

    logprobs: list[list[Logprobs]] = [[] for _ in states]
    want = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if want:
        rows = [starts[i] + j for i in want for j in range(len(emitted[i]))]
        toks = [t for i in want for t in emitted[i]]
        idx = torch.tensor(rows, dtype=torch.long, device=processed.device)
        lps = sampler.logprobs(
            processed.index_select(0, idx),
            torch.tensor(toks, dtype=torch.long, device=processed.device),
            toks,
            [row_states[r].params for r in rows],
        )
        k = 0
        for i in want:
            logprobs[i] = [lp for lp in lps[k : k + len(emitted[i])] if lp is not None]
            k += len(emitted[i])
    return [Verified(e, a, lp) for e, a, lp in zip(emitted, accepted, logprobs, strict=True)]


def target_probs(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """(rows, V) float32 sampling distributions of processed logits: temperature, then
    top-k, top-p and min-p with the sampler's own truncation (so the same tokens survive)."""
    dev = logits.device
    temps = torch.tensor([s.params.temperature for s in states], dtype=torch.float32, device=dev)
    x = logits.float() / temps.unsqueeze(1)
    vocab = x.shape[1]
    params = [s.params for s in states]
    cut = [j for j, p in enumerate(params) if 0 < p.effective_top_k < vocab or p.top_p < 1.0]
    plain = [j for j in range(len(params)) if j not in set(cut)]
    if plain:
        sel = torch.tensor(plain, dtype=torch.long, device=dev)
        x.index_copy_(0, sel, apply_min_p(x.index_select(0, sel), [params[j].min_p for j in plain]))
    if cut:
        full = torch.full((len(cut), vocab), NEG_INF, dtype=x.dtype, device=dev)
        sel = torch.tensor(cut, dtype=torch.long, device=dev)
        for group in truncate(
            x.index_select(0, sel),
            [params[j].effective_top_k for j in cut],
            [params[j].top_p for j in cut],
            [params[j].min_p for j in cut],
        ):
            g_rows = torch.tensor(group.rows, dtype=torch.long, device=dev)
            full.index_copy_(0, g_rows, full.index_select(0, g_rows).scatter_(1, group.ids, group.vals))
        x.index_copy_(0, sel, full)
    return torch.softmax(x, dim=-1)


def _seeded(s: SamplingState) -> bool:
    return s.generator is not None and s.params.seed is not None


def _sample_random(sampler, processed, row_states, drafts, starts, reqs, emitted, accepted) -> None:
    """Rejection sampling for the unseeded random requests, in one batch from the engine's
    generator."""
    dev = processed.device
    K = max(len(drafts[i]) for i in reqs)
    rows = [starts[i] + min(j, len(drafts[i])) for i in reqs for j in range(K + 1)]
    probs = target_probs(
        processed.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev)),
        [row_states[r] for r in rows],
    ).view(len(reqs), K + 1, -1)
    draft_ids = torch.tensor(
        [drafts[i] + [0] * (K - len(drafts[i])) for i in reqs], dtype=torch.long, device=dev
    ).view(len(reqs), K)
    num = torch.tensor([len(drafts[i]) for i in reqs], dtype=torch.long, device=dev)
    tokens, counts = rejection_sample(probs, draft_ids, num, None, sampler.generator)
    for b, (toks, c) in enumerate(zip(tokens.tolist(), counts.tolist(), strict=True)):
        emitted[reqs[b]], accepted[reqs[b]] = toks[:c], c - 1
