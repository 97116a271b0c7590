"""Logit processing before sampling: min_tokens masking, logit_bias and vLLM/HF penalties.

All of it runs in place on (rows, vocab) float logits, vectorized over the batch.
Penalties touch only tokens a row has seen, so they are computed on those tokens'
logits (gathered along each row's padded id list) and scattered back, and output
counts come from a sorted copy of the output (searchsorted): work in proportion to
the sequence lengths, never a (rows, vocab) temporary.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch


def mask_tokens(logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
    """Set logits[rows[i], token_ids[i]] to -inf for every i, in place (min_tokens)."""
    if rows:
        r = torch.tensor(rows, dtype=torch.long, device=logits.device)
        c = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
        logits.index_put_((r, c), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    return logits


def add_bias(
    logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int], biases: Sequence[float]
) -> torch.Tensor:
    """logits[rows[i], token_ids[i]] += biases[i] for every i, in place, in one scatter-add
    (logit_bias; a (row, token) pair appears at most once, as the bias is a dict per row)."""
    if rows:
        dev = logits.device
        r = torch.tensor(rows, dtype=torch.long, device=dev)
        c = torch.tensor(token_ids, dtype=torch.long, device=dev)
        v = torch.tensor(biases, dtype=logits.dtype, device=dev)
        logits.index_put_((r, c), v, accumulate=True)
    return logits


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    presence_penalties: Sequence[float],
    frequency_penalties: Sequence[float],
    repetition_penalties: Sequence[float],
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply the three penalties in place, one entry of each sequence per logits row
    (or per row of `rows`, when given: the other rows are not touched).

    Same semantics and arithmetic as vLLM's `apply_penalties`:
    - repetition (HF style), over tokens seen in the prompt OR the output:
      logit > 0 → logit / penalty, else logit * penalty;
    - frequency: logit -= penalty * (count of the token in the output);
    - presence: logit -= penalty * (1 if the token occurs in the output).
    """
    vocab = logits.shape[1]
    dev, dt = logits.device, logits.dtype
    if any(r != 1.0 for r in repetition_penalties):
        ids, real = _padded([(*p, *o) for p, o in zip(prompt_token_ids, output_token_ids, strict=True)], dev)
    else:
        ids, real = _padded(output_token_ids, dev)
    if ids.shape[1] == 0:
        return logits
    # NOTE: every slot that is padding or out of the vocabulary (a tokenizer's extra ids)
    # is pointed at the row's first valid token, so it recomputes exactly the value of a
    # real slot and the scatter's write order cannot matter. A row with no valid token
    # points at token 0 and writes back its unchanged logit.
    real &= (ids >= 0) & (ids < vocab)
    has_any = real.any(dim=1, keepdim=True)
    first = ids.gather(1, real.to(torch.int8).argmax(dim=1, keepdim=True))
    ids = torch.where(real, ids, torch.where(has_any, first, 0))

    out_ids, out_real = _padded(output_token_ids, dev)
    if rows is None:
        at: tuple[torch.Tensor, torch.Tensor] | None = None
        vals = logits.gather(1, ids)
    else:
        at = (torch.tensor(rows, dtype=torch.long, device=dev).unsqueeze(1).expand_as(ids), ids)
        vals = logits[at]
    counts = _occurrences(torch.where(out_real, out_ids, -1), ids).to(dt)

    rep = torch.tensor(repetition_penalties, dtype=dt, device=dev).unsqueeze(1)
    new = torch.where(vals > 0, vals / rep, vals * rep)
    new -= torch.tensor(frequency_penalties, dtype=dt, device=dev).unsqueeze(1) * counts
    new -= torch.tensor(presence_penalties, dtype=dt, device=dev).unsqueeze(1) * (counts > 0).to(dt)
    new = torch.where(has_any, new, vals)
    return logits.scatter_(1, ids, new) if at is None else logits.index_put_(at, new)


def _occurrences(haystack: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """How often each queries[r, j] occurs in haystack[r] (both (rows, *) int64)."""
    if haystack.shape[1] == 0:
        return torch.zeros(queries.shape, dtype=torch.long, device=queries.device)
    hay = haystack.sort(dim=-1).values
    return torch.searchsorted(hay, queries, right=True) - torch.searchsorted(hay, queries)


def _padded(token_ids: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, longest) int64 ids (padding is 0) and the mask of real entries.

    One tensor from one flat list: the Python work is a C-level chain, not a loop.
    """
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    width = int(lengths.max()) if len(token_ids) else 0
    real = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.zeros(real.shape, dtype=torch.long)
    ids[real] = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long)
    return ids.to(device), real.to(device)
