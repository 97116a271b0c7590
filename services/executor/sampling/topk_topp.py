"""Truncation of the sampling distribution: top-k, top-p (nucleus) and min-p.

All of it works on temperature-scaled logits, one row per sequence, with the
per-row parameters as Python sequences.

`truncate` is what the sampler uses: it returns each row's surviving candidates as
a sorted window (values and token ids) instead of masking the whole vocabulary,
because on CPU a full sort of 64 x 49k logits costs about 140 ms (2 threads) while
`topk(50)` costs about 5 ms, and the race that follows then runs over the window:

    row logits ─▶ topk(W) ─▶ [ v0 ≥ v1 ≥ … ≥ v_{W-1} ]   ids [ i0 i1 … ]
                              keep pos < k, then the top-p prefix, then min-p;
                              dropped entries become -inf

A row with top-p but no top-k has no natural window: on CPU it tries the windows of
`NUCLEUS_WINDOWS` in turn and falls back to a full sort only when its nucleus is
wider than all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

NEG_INF = float("-inf")
NUCLEUS_WINDOWS = (256, 4096)  # CPU: windows tried in turn before a full sort


class Candidates(NamedTuple):
    """Surviving candidates of some rows, sorted by descending logit."""

    rows: list[int]  # which rows of the input these are
    vals: torch.Tensor  # (len(rows), W) logits; dropped candidates at -inf
    ids: torch.Tensor  # (len(rows), W) their token ids


def truncate(
    x: torch.Tensor,
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
    windows: Sequence[int] = (),
) -> list[Candidates]:
    """Candidates of each row after top-k, then top-p, then min-p.

    Semantics (vLLM): top-k keeps exactly k tokens (ties broken by sort order) and
    0, -1 or >= vocab disables it; top-p keeps the smallest prefix whose probability,
    renormalized over the top-k, reaches top_p (>= 1 disables it); min-p drops tokens
    with prob < min_p * max prob. The top token always stays.

    Rows with top-p but no top-k are first cut to `windows[0]` tokens; a row whose
    window holds less than top_p of its probability (its nucleus may reach past the
    window) is redone with the next window, and finally over the whole vocabulary.
    Every row appears in exactly one of the returned groups.
    """
    rows, vocab = x.shape
    ks = [k if 0 < k < vocab else 0 for k in top_k]  # 0: no top-k
    ps = [float(p) for p in top_p]
    nucleus = [k == 0 and p < 1.0 for k, p in zip(ks, ps, strict=True)]
    # Without a top-k the window is only part of the distribution: normalize over all.
    lse = x.logsumexp(dim=-1) if any(nucleus) else None
    out: list[Candidates] = []
    todo = list(range(rows))
    pending = [w for w in windows if w < vocab]
    while todo:
        window = pending.pop(0) if pending else vocab
        sel = None if len(todo) == rows else torch.tensor(todo, dtype=torch.long, device=x.device)
        vals, ids, short = _truncate_window(
            x if sel is None else x.index_select(0, sel),
            [ks[i] for i in todo],
            [ps[i] for i in todo],
            [min_p[i] for i in todo],
            [nucleus[i] for i in todo],
            window,
            None if lse is None else (lse if sel is None else lse.index_select(0, sel)),
        )
        if short:
            keep = [r for r in range(len(todo)) if r not in set(short)]
            k_t = torch.tensor(keep, dtype=torch.long, device=x.device)
            out.append(Candidates([todo[r] for r in keep], vals[k_t], ids[k_t]))
        else:
            out.append(Candidates(todo, vals, ids))
        todo = [todo[r] for r in short]
    return out


def _truncate_window(
    x: torch.Tensor,
    ks: list[int],
    ps: list[float],
    min_p: list[float],
    nucleus: list[bool],
    window: int,
    lse_full: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One pass of `truncate` with nucleus rows cut to `window`; returns (vals, ids, short)."""
    vocab = x.shape[1]
    dev = x.device
    width = max(k if k else (window if nuc else vocab) for k, nuc in zip(ks, nucleus, strict=True))
    if width < vocab:
        vals, ids = x.topk(width, dim=-1, sorted=True)
    else:
        vals, ids = x.sort(dim=-1, descending=True)

    k_t = torch.tensor([k or width for k in ks], dtype=torch.long, device=dev).unsqueeze(1)
    keep = torch.arange(width, device=dev).unsqueeze(0) < k_t
    short: list[int] = []
    if any(p < 1.0 for p in ps):
        masked = vals.masked_fill(~keep, NEG_INF)
        lse = masked.logsumexp(dim=-1)
        if any(nucleus):
            assert lse_full is not None
            nuc = torch.tensor(nucleus, dtype=torch.bool, device=dev)
            lse = torch.where(nuc, lse_full, lse)
        probs = (masked - lse.unsqueeze(1)).exp()
        cum = probs.cumsum(dim=-1)
        p_t = torch.tensor(ps, dtype=cum.dtype, device=dev).unsqueeze(1)
        keep &= (cum - probs) < p_t  # mass before a token: exactly 0 for the top one
        if width < vocab and any(nucleus):
            # NOTE: a host sync; callers pass windows only on CPU, where it is free.
            too_small = (cum[:, -1:] < p_t).squeeze(1) & nuc
            short = torch.nonzero(too_small).flatten().tolist()
    if any(m > 0.0 for m in min_p):
        # prob_i < min_p * prob_max  ⇔  v_i < v_0 + log(min_p); min_p = 0 gives -inf.
        m_t = torch.tensor(min_p, dtype=vals.dtype, device=dev).unsqueeze(1)
        keep &= vals >= vals[:, :1] + m_t.log()
    return vals.masked_fill(~keep, NEG_INF), ids, short


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop, in place, tokens with prob < min_p * max prob of their row (log space)."""
    if not any(m > 0.0 for m in min_p):
        return logits
    m = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    threshold = logits.amax(dim=-1, keepdim=True) + m.log()
    return logits.masked_fill_(logits < threshold, NEG_INF)
