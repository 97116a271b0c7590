"""verify() on a seeded request: the tokens plain decoding draws with that seed, whatever
the drafts, and (over many seeds) an exact rejection sampler for one-hot drafts."""

import numpy as np
import torch

from services.executor.sampler import Sampler, SamplingState, make_generator
from services.executor.spec_decode.verify import verify
from shared.sampling_params import SamplingParams

VOCAB = 6
# Fixed logits per output position: what the target would give at token index 0, 1, ...
LOGITS = torch.log(torch.tensor([
    [0.40, 0.25, 0.15, 0.12, 0.05, 0.03],
    [0.05, 0.10, 0.50, 0.20, 0.10, 0.05],
    [0.30, 0.30, 0.20, 0.10, 0.05, 0.05],
    [0.10, 0.10, 0.10, 0.10, 0.30, 0.30],
    [0.60, 0.10, 0.10, 0.10, 0.05, 0.05],
]))
PARAMS = dict(temperature=0.9, top_k=5, seed=11)


def state(params: SamplingParams, output: list[int]) -> SamplingState:
    return SamplingState(params, [1, 2], list(output), make_generator(params.seed))


def plain(params: SamplingParams, n: int) -> list[int]:
    """What decoding without drafts emits: one sampler call per token."""
    sampler, out = Sampler(VOCAB, []), []
    for k in range(n):
        out.append(sampler(LOGITS[k : k + 1], [state(params, out)]).token_ids[0])
    return out


def verified(params: SamplingParams, done: list[int], drafts: list[int]) -> tuple[list[int], int]:
    k = len(done)
    rows = LOGITS[k : k + len(drafts) + 1]
    (v,) = verify(Sampler(VOCAB, []), rows, [state(params, done)], [drafts])
    return v.token_ids, v.num_accepted


def test_seeded_tokens_do_not_depend_on_the_drafts():
    params = SamplingParams(**PARAMS)
    want = plain(params, 5)
    assert verified(params, [], want[:4]) == (want, 4)  # every draft right
    assert verified(params, want[:1], want[1:3]) == (want[1:4], 2)  # resumed after one token
    for j in range(4):  # draft j wrong: the drafts before it, then plain decoding's token j
        drafts = list(want[:4])
        drafts[j] = (want[j] + 1) % VOCAB
        assert verified(params, [], drafts) == (want[: j + 1], j)
    # Any split into steps of any draft count walks the same tokens.
    done: list[int] = []
    for num_drafts in (0, 2, 1):
        drafts = [(t + 1) % VOCAB if i == 1 else t for i, t in enumerate(want[len(done) :][:num_drafts])]
        tokens, _ = verified(params, done, drafts)
        done += tokens
    assert done == want[: len(done)] and len(done) >= 3


def test_seeded_acceptance_is_exact_rejection_sampling():
    """Over 5,000 seeds a one-token draft d is accepted with probability p(d), and a
    rejection emits a token of the residual: p without d, renormalised (chi-square at the
    0.999 quantile, as test_rejection_sampler.py)."""
    n, d = 5_000, 0
    p = torch.softmax(LOGITS[0] / 0.9, dim=-1).numpy().astype(np.float64)
    counts = np.zeros(VOCAB)
    for seed in range(n):
        tokens, _ = verified(SamplingParams(temperature=0.9, seed=seed), [], [d])
        counts[tokens[0]] += 1
    # Emitted token 0 is distributed as p (accepted d, or the residual's draw).
    e = n * p
    stat = float(((counts - e) ** 2 / e).sum())
    assert stat < 20.515, f"chi-square {stat:.1f} (df 5): counts {counts}"  # 0.999 quantile of χ²(5)
