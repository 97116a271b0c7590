"""Rejection sampling of draft tokens (Leviathan et al. 2023; Chen et al. 2023): the
emitted tokens are distributed exactly as sampling from the target alone would give.

For each request with drafts d_0 … d_{k-1} drawn from q, and target distributions
p_0 … p_k at the k+1 scored positions:

    for j in 0 … k-1:   accept d_j with probability min(1, p_j(d_j) / q_j(d_j))
                        on the first rejection emit  t ~ norm(max(0, p_j − q_j))  and stop
    all k accepted:     emit the bonus token  t ~ p_k

Why it is exact: P(emit x at j) = q(x)·min(1, p(x)/q(x)) + (1 − Σ_y min(p(y), q(y)))·
max(0, p(x) − q(x)) / Σ_y max(0, p(y) − q(y)) = min(p(x), q(x)) + max(0, p(x) − q(x)) = p(x),
since Σ min(p, q) + Σ max(0, p − q) = Σ p = 1.

A proposer that drafts one token deterministically (n-gram lookup, a greedy draft
model) has q = one-hot(d_j): then it is accepted with probability p_j(d_j) and a
rejection resamples from p_j with d_j removed. Greedy requests never come here: the
runner accepts the longest prefix of drafts equal to the target's argmax.

Batched: B requests padded to K drafts; `num_drafts[b]` says how many are real.
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Emitted tokens of B requests.

    target_probs (B, K+1, V): p_j, each row summing to 1 (rows past num_drafts+1 ignored).
    draft_ids (B, K) int64: the drafts (padding: any valid id).
    num_drafts (B,) int64: real drafts per request, 0 … K.
    draft_probs (B, K, V) or None: q_j; None means one-hot at the draft (deterministic proposer).
    generator: all randomness (uniforms, then one multinomial draw per request) comes from it.

    Returns (tokens (B, K+1) int64, num_emitted (B,) int64): request b emits
    tokens[b, :num_emitted[b]] = its accepted drafts, then one resampled or bonus token.
    """
    B, K1, _ = target_probs.shape
    K = K1 - 1
    if draft_ids.shape != (B, K) or num_drafts.shape != (B,):
        raise ValueError(
            f"draft_ids {tuple(draft_ids.shape)}, num_drafts {tuple(num_drafts.shape)}: expected B={B}, K={K}"
        )
    dev = target_probs.device
    rows = torch.arange(B, device=dev)
    if K > 0:
        uniforms = torch.rand(B, K, generator=generator, device=dev)
        p_d = target_probs[:, :K].gather(2, draft_ids.unsqueeze(2)).squeeze(2)
        if draft_probs is None:
            accept = uniforms < p_d  # q(d) = 1
        else:
            q_d = draft_probs.gather(2, draft_ids.unsqueeze(2)).squeeze(2)
            accept = uniforms * q_d < p_d  # u < p/q without dividing by a tiny q
        accept &= torch.arange(K, device=dev).unsqueeze(0) < num_drafts.unsqueeze(1)
        # Accepted drafts form a prefix: count up to the first rejection (or padding).
        num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)
    else:
        num_accepted = torch.zeros(B, dtype=torch.int64, device=dev)
    rejected = num_accepted < num_drafts
    p_at = target_probs[rows, num_accepted]  # (B, V): the position that emits a new token
    if K > 0:
        at = num_accepted.clamp(max=K - 1)
        if draft_probs is None:
            q_at = torch.zeros_like(p_at).scatter_(1, draft_ids[rows, at].unsqueeze(1), 1.0)
        else:
            q_at = draft_probs[rows, at]
        residual = (p_at - q_at).clamp_min(0)
        # p = q exactly leaves no residual, but then a rejection has probability 0; guard
        # the division anyway by falling back to p.
        empty = residual.sum(dim=1) <= 0
        residual = torch.where((rejected & ~empty).unsqueeze(1), residual, p_at)
    else:
        residual = p_at
    recovered = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    tokens = torch.zeros(B, K1, dtype=torch.int64, device=dev)
    if K > 0:
        tokens[:, :K] = draft_ids
    tokens[rows, num_accepted] = recovered
    return tokens, num_accepted + 1
