"""The rejection sampler emits tokens distributed exactly as the target's, checked by a
chi-square goodness-of-fit test on small vocabularies where target and draft differ.

The bound: with N independent emitted tokens over a support of m tokens, Pearson's
statistic X² = Σ (O - N p)² / (N p) follows χ²(m - 1) under the null hypothesis (the
sampler is exact); we reject above its 0.999 quantile (13.816 for 2 degrees of freedom,
18.467 for 4), so a correct sampler fails a given seed with probability 0.001 (seeds are
fixed, so the test is deterministic). N = 40,000 keeps every expected count above 100 (the
χ² approximation needs >= 5). A sampler that resamples from p instead of the residual
max(0, p - q) emits min(p, q) + (1 - Σ min(p, q)) p; on these distributions its expected
X² is above 1,000, so the same test catches it, as `test_a_wrong_sampler_fails` shows.
"""

import numpy as np
import pytest
import torch

from services.executor.sampler import SamplingState
from services.executor.spec_decode.rejection_sampler import rejection_sample
from services.executor.spec_decode.verify import target_probs
from shared.sampling_params import SamplingParams

N = 40_000
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467}

P = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.12, 0.08],  # target at position 0
        [0.05, 0.10, 0.50, 0.20, 0.15],  # position 1
        [0.30, 0.30, 0.20, 0.10, 0.10],  # position 2 (bonus)
    ]
)
Q = torch.tensor(
    [
        [0.10, 0.50, 0.10, 0.20, 0.10],  # draft at position 0
        [0.30, 0.20, 0.20, 0.20, 0.10],
    ]
)


def chi2(observed: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the support of expected_p (and nothing may fall outside it)."""
    support = expected_p > 0
    assert observed[~support].sum() == 0, "emitted a token the target gives probability 0"
    n = observed.sum()
    e = n * expected_p[support]
    return float(((observed[support] - e) ** 2 / e).sum()), int(support.sum()) - 1


def assert_matches(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    counts = np.bincount(tokens.numpy(), minlength=expected.shape[0])
    stat, df = chi2(counts, expected.numpy().astype(np.float64))
    assert stat < CHI2_999[df], f"chi-square {stat:.1f} >= {CHI2_999[df]} (df {df}): counts {counts}"


def sample_drafts(q: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(q.shape[0])], 1
    )


def run(
    p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, seed: int = 1, sampler=rejection_sample
):
    n, k = drafts.shape
    tokens, emitted = sampler(
        p.expand(n, -1, -1),
        drafts,
        torch.full((n,), k),
        None if q is None else q.expand(n, -1, -1),
        torch.Generator().manual_seed(seed),
    )
    return tokens, emitted


def check_positions(p: torch.Tensor, tokens: torch.Tensor, emitted: torch.Tensor) -> None:
    """Each emitted position j (given it was reached) is distributed as p_j."""
    for j in range(p.shape[0]):
        reached = emitted > j
        assert reached.sum() > 1_000, "too few samples reach this position for the test to mean much"
        assert_matches(tokens[reached, j], p[j])


def test_drafts_from_a_different_distribution():
    drafts = sample_drafts(Q, N, seed=7)
    tokens, emitted = run(P, Q, drafts)
    check_positions(P, tokens, emitted)


def test_one_hot_drafts_as_from_ngram_or_greedy_draft():
    # The same (wrong for the target) drafts for every sample: q is one-hot.
    drafts = torch.tensor([[0, 2]]).expand(N, -1).contiguous()
    tokens, emitted = run(P, None, drafts)
    check_positions(P, tokens, emitted)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.7), (4, 0.8)])
def test_with_top_k_and_top_p(top_k, top_p):
    logits = torch.log(P) + 0.3 * torch.randn(P.shape, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    p = target_probs(logits, [SamplingState(params, [], [])] * 3)
    expected = torch.stack([reference_truncated(row, top_k, top_p) for row in logits])
    torch.testing.assert_close(p, expected)  # target_probs truncates as vLLM does
    assert (expected == 0).any(), "truncation should drop something in this case"
    drafts = sample_drafts(Q, N, seed=11)
    tokens, emitted = run(expected, Q, drafts, seed=5)
    check_positions(expected, tokens, emitted)


def reference_truncated(logits_row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p over the renormalized top-k, by hand with numpy."""
    x = logits_row.double().numpy()
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, dtype=bool)
    kept = order[:top_k] if top_k else order
    probs = np.exp(x[kept] - x[kept].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep[kept[before < top_p]] = True
    out = np.where(keep, np.exp(x - x.max()), 0.0)
    return torch.tensor(out / out.sum(), dtype=torch.float32)


def wrong_sampler(p, drafts, num, q, gen):
    """Resamples a rejected position from p instead of the residual max(0, p - q)."""
    tokens, emitted = rejection_sample(p, drafts, num, q, gen)
    b = torch.arange(p.shape[0])
    last = emitted - 1
    rejected = last < num
    redo = torch.multinomial(p[b, last], 1, generator=gen).squeeze(1)
    tokens[b[rejected], last[rejected]] = redo[rejected]
    return tokens, emitted


def test_a_wrong_sampler_fails():
    drafts = sample_drafts(Q, N, seed=7)
    tokens, emitted = run(P, Q, drafts, sampler=wrong_sampler)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_matches(tokens[:, 0], P[0])


def test_shapes_padding_and_no_drafts():
    p = P.expand(3, -1, -1)
    drafts = torch.tensor([[0, 0], [2, 4], [1, 1]])
    tokens, emitted = rejection_sample(
        p, drafts, torch.tensor([0, 1, 2]), None, torch.Generator().manual_seed(0)
    )
    assert tokens.shape == (3, 3) and emitted.tolist()[0] == 1
    assert all(1 <= e <= n + 1 for e, n in zip(emitted.tolist(), [0, 1, 2], strict=True))
    # Certain drafts (p = 1 on them) are always accepted, then the bonus comes from p_k.
    sure = torch.zeros(1, 3, 5)
    sure[0, 0, 2] = sure[0, 1, 4] = sure[0, 2, 1] = 1.0
    tokens, emitted = rejection_sample(sure, torch.tensor([[2, 4]]), torch.tensor([2]), None, None)
    assert tokens.tolist() == [[2, 4, 1]] and emitted.tolist() == [3]
    # Impossible drafts (p = 0) are always rejected.
    tokens, emitted = rejection_sample(sure, torch.tensor([[3, 4]]), torch.tensor([2]), None, None)
    assert tokens[0, 0].item() == 2 and emitted.tolist() == [1]
