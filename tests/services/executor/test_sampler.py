"""Sampler tests: each filter on hand-made logits, exact penalties and logprobs,
min_tokens, distribution sanity (fixed seeds, so nothing can flake) and seeded
determinism across batch compositions."""

from __future__ import annotations

import math

import pytest
import torch

from services.executor.sampler import Sampler, SamplingState, make_generator
from services.executor.sampling.topk_topp import apply_min_p, truncate
from shared.sampling_params import SamplingParams

NEG_INF = float("-inf")
# A known distribution, deliberately not in sorted order over the vocabulary.
PROBS = {3: 0.5, 0: 0.25, 4: 0.15, 1: 0.07, 2: 0.03}


def known_logits(rows: int = 1) -> torch.Tensor:
    row = torch.tensor([math.log(PROBS[i]) for i in range(5)])
    return row.repeat(rows, 1)


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def apply_top_k_top_p(logits: torch.Tensor, top_k, top_p, min_p=None, windows=()) -> torch.Tensor:
    """`truncate`'s candidates scattered back over the vocabulary: the filters as a mask."""
    rows = logits.shape[0]
    out = torch.full_like(logits, NEG_INF)
    groups = truncate(logits, top_k or [0] * rows, top_p or [1.0] * rows, min_p or [0.0] * rows, windows)
    assert sorted(r for g in groups for r in g.rows) == list(range(rows))
    for g in groups:
        out[g.rows] = torch.full((len(g.rows), logits.shape[1]), NEG_INF).scatter_(1, g.ids, g.vals)
    return out


def state(out: list[int] | None = None, prompt: list[int] | None = None, gen=None, **kw) -> SamplingState:
    return SamplingState(SamplingParams(**kw), prompt or [0], out or [], gen)


# ---------------------------------------------------------------- filters
def test_top_k_keeps_exactly_k():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logits[4] = 1.0  # all tied: still exactly k
    ks = [1, 7, 0, -1, 3]
    out = apply_top_k_top_p(logits.clone(), ks, None)
    for r, k in enumerate(ks):
        if k <= 0:
            assert torch.equal(out[r], logits[r])
        else:
            assert len(kept(out[r])) == k
            assert kept(out[r]) == set(logits[r].topk(k).indices.tolist()) or r == 4
            assert torch.equal(out[r][torch.isfinite(out[r])], logits[r][torch.isfinite(out[r])])


def test_top_k_larger_than_vocab_is_a_no_op():
    logits = torch.randn(2, 10)
    assert torch.equal(apply_top_k_top_p(logits.clone(), [10, 1000], None), logits)
    sampler = Sampler(10, [], generator=make_generator(0))
    counts = sample_counts(sampler, logits[0], 4000, top_k=1000, top_p=1.0)
    assert int((counts > 0).sum()) == 10


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.4, {3}), (0.6, {3, 0}), (0.8, {3, 0, 4}), (0.95, {3, 0, 4, 1}), (0.99, {3, 0, 4, 1, 2}), (1.0, None)],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    logits = known_logits(2)
    out = apply_top_k_top_p(logits.clone(), None, [top_p, 1.0])
    assert kept(out[0]) == (expected if expected is not None else set(range(5)))
    assert torch.equal(out[1], logits[1])  # the disabled row is untouched


def test_top_p_applies_after_top_k_renormalization():
    # top-3 renormalized: 0.5/0.9, 0.25/0.9, 0.15/0.9 = .556, .278, .167: p=0.8 keeps 2,
    # while p=0.8 alone (no top-k) keeps 3. Row 2 has top-p without top-k (full sort path).
    logits = known_logits(3)
    out = apply_top_k_top_p(logits.clone(), [3, 3, 0], [0.8, 1.0, 0.8])
    assert kept(out[0]) == {3, 0}
    assert kept(out[1]) == {3, 0, 4}
    assert kept(out[2]) == {3, 0, 4}


def test_nucleus_windows_fall_back_for_rows_they_cannot_cover():
    # A window of 2 tokens holds 0.75 of the mass: enough for top_p=0.4, not for 0.8;
    # one of 3 tokens holds 0.9. Row 2 has a top-k: renormalized within it, no window.
    logits = known_logits(4)
    groups = truncate(logits, [0, 0, 2, 0], [0.4, 0.8, 0.8, 0.95], [0.0] * 4, windows=(2, 3))
    assert [(g.rows, g.vals.shape[1]) for g in groups] == [([0, 2], 2), ([1], 3), ([3], 5)]
    assert groups[0].ids[0].tolist() == [3, 0] and groups[0].vals[0, 1] == NEG_INF
    assert torch.isfinite(groups[0].vals[1]).all()
    assert groups[1].ids[0].tolist() == [3, 0, 4] and torch.isfinite(groups[1].vals).all()
    assert kept(apply_top_k_top_p(logits, [0, 0, 2, 0], [0.4, 0.8, 0.8, 0.95], windows=(2, 3))[3]) == {
        3,
        0,
        4,
        1,
    }


def test_min_p_in_truncate_matches_mask():
    logits = known_logits(2)
    out = apply_top_k_top_p(logits, [4, 0], [1.0, 0.99], [0.35, 0.25])
    assert kept(out[0]) == {3, 0}
    assert kept(out[1]) == {3, 0, 4}


def test_min_p():
    logits = known_logits(4)
    out = apply_min_p(logits.clone(), [0.35, 0.25, 0.0, 1.0])
    assert kept(out[0]) == {3, 0}  # prob >= 0.175
    assert kept(out[1]) == {3, 0, 4}  # prob >= 0.125
    assert torch.equal(out[2], logits[2])
    assert kept(out[3]) == {3}


def sample_counts(sampler: Sampler, logits_row: torch.Tensor, draws: int, **kw) -> torch.Tensor:
    states = [state(**kw) for _ in range(draws)]
    tokens = sampler(logits_row.repeat(draws, 1), states).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).double()


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Every count within 5 sigma of its expectation, and a chi-square far below its tail."""
    n = counts.sum()
    expected = probs.double() * n
    support = expected > 0
    assert torch.all(counts[~support] == 0)
    sigma = (n * probs.double() * (1 - probs.double())).sqrt()
    assert torch.all((counts - expected).abs()[support] <= 5 * sigma[support] + 1)
    chi2 = ((counts - expected)[support] ** 2 / expected[support]).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 10 * math.sqrt(2 * dof) + 10


def test_combined_filters_sample_renormalized_distribution():
    sampler = Sampler(5, [], generator=make_generator(7))
    counts = sample_counts(sampler, known_logits()[0], 20000, temperature=1.0, top_k=4, top_p=0.8, min_p=0.5)
    # top-4: .5 .25 .15 .07 → /0.97; top-p 0.8 keeps {3, 0, 4}; min-p 0.5 keeps prob >= 0.25: {3, 0}.
    probs = torch.zeros(5)
    probs[3], probs[0] = 0.5 / 0.75, 0.25 / 0.75
    assert_matches(counts, probs)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0, 2.0])
    sampler = Sampler(6, [], generator=make_generator(1234))
    counts = sample_counts(sampler, logits, 20000, temperature=temperature)
    assert_matches(counts, torch.softmax(logits / temperature, dim=-1))


def test_greedy_is_argmax_and_fast_path_leaves_logits_alone():
    torch.manual_seed(1)
    logits = torch.randn(8, 300)
    before = logits.clone()
    sampler = Sampler(300, [0])
    out = sampler(logits, [state(temperature=0.0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    # Mixed greedy/random/penalized batch: greedy rows still argmax, caller's logits untouched.
    states = [state(temperature=0.0 if i % 2 else 0.9, presence_penalty=0.1 * (i % 3)) for i in range(8)]
    out = sampler(logits, states)
    processed = sampler.process_logits(logits, states)
    for i in range(1, 8, 2):
        assert out.token_ids[i] == int(processed[i].argmax())
    assert torch.equal(logits, before)


def test_padded_vocab_columns_never_sampled():
    logits = torch.zeros(3, 12)
    logits[:, 10:] = 100.0  # LM-head padding past the real vocabulary
    sampler = Sampler(10, [], generator=make_generator(0))
    out = sampler(logits, [state(temperature=0.0), state(temperature=1.0), state(logprobs=3)])
    assert all(t < 10 for t in out.token_ids)


# ---------------------------------------------------------------- penalties and min_tokens
def test_penalties_exact():
    vocab = 6
    logits = torch.tensor(
        [
            [1.5, -0.5, 2.0, 0.0, -3.0, 0.25],
            [1.5, -0.5, 2.0, 0.0, -3.0, 0.25],
            [1.0, 2.0, -1.0, 3.0, 0.5, -0.75],
            [0.3, 0.2, 0.1, -0.1, -0.2, -0.3],
            [0.3, 0.2, 0.1, -0.1, -0.2, -0.3],
            [0.3, 0.2, 0.1, -0.1, -0.2, -0.3],
        ]
    )
    states = [
        state(
            prompt=[0, 1],
            out=[2, 2, 4],
            repetition_penalty=1.25,
            frequency_penalty=0.5,
            presence_penalty=0.25,
        ),
        state(prompt=[0, 1], out=[2, 2, 4]),  # no penalties: untouched
        state(prompt=[5, 5, 3], out=[1, 3, 3, 3], repetition_penalty=0.8, presence_penalty=-1.0),
        state(prompt=[1], out=[0, 0, 5], frequency_penalty=-0.4),
        # Nothing seen: nothing changes. Ids past the vocabulary (tokenizer extras) are ignored.
        SamplingState(SamplingParams(repetition_penalty=1.5, presence_penalty=0.5), [], []),
        state(prompt=[2, 99], out=[3, 77, 3], repetition_penalty=2.0, frequency_penalty=0.1),
    ]
    expected = logits.clone()
    for r, s in enumerate(states):
        p = s.params
        for t in range(vocab):
            x = expected[r, t].item()
            if t in s.prompt_token_ids or t in s.output_token_ids:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            c = s.output_token_ids.count(t)
            x = torch.tensor(x) - torch.tensor(p.frequency_penalty) * c
            x = x - torch.tensor(p.presence_penalty) * (1.0 if c else 0.0)
            expected[r, t] = x
    got = Sampler(vocab, []).process_logits(logits, states)
    assert torch.equal(got, expected)
    assert torch.equal(got[1], logits[1])
    only_penalized = [0, 2, 3, 5]  # every row penalized: the whole-batch path
    again = Sampler(vocab, []).process_logits(logits[only_penalized], [states[i] for i in only_penalized])
    assert torch.equal(again, expected[only_penalized])
    assert got[0, 2].item() == pytest.approx(2.0 / 1.25 - 2 * 0.5 - 0.25)
    assert got[0, 0].item() == pytest.approx(1.5 / 1.25)  # prompt-only: repetition, no frequency
    assert got[2, 3].item() == pytest.approx(3.0 / 0.8 + 1.0)
    assert torch.equal(got[4], logits[4])
    assert got[5].tolist() == pytest.approx([0.3, 0.2, 0.05, -0.2 - 0.2, -0.2, -0.3])


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, 10)
    states = [
        state(out=[1], min_tokens=3, stop_token_ids=[5]),
        state(out=[1, 1, 1], min_tokens=3, stop_token_ids=[5]),  # reached: nothing masked
        state(out=[], min_tokens=1, ignore_eos=True),  # vLLM masks EOS under min_tokens regardless
    ]
    got = Sampler(10, [2, 7]).process_logits(logits, states)
    assert set(range(10)) - kept(got[0]) == {2, 5, 7}
    assert torch.equal(got[1], logits[1])
    assert set(range(10)) - kept(got[2]) == {2, 7}


def test_logit_bias_exact_and_before_penalties():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    states = [
        state(logit_bias={0: 5.0, 3: -2.5}),
        state(),  # no bias: untouched
        # vLLM's order: bias, then the repetition penalty (prompt [0], output [1]) divides.
        state(out=[1], logit_bias={1: 6.0, 99: 1.0}, repetition_penalty=2.0),  # 99: past the vocab
    ]
    got = Sampler(4, []).process_logits(logits, states)
    assert got.tolist() == [[6.0, 2.0, 3.0, 1.5], [1.0, 2.0, 3.0, 4.0], [0.5, 4.0, 3.0, 4.0]]
    # Greedy rows take the biased argmax (the fast path must not skip the bias).
    greedy = [state(temperature=0.0, logit_bias={0: 100.0}), state(temperature=0.0)]
    assert Sampler(4, [])(logits[:2], greedy).token_ids == [0, 3]


def test_min_tokens_delays_eos_in_greedy_decoding():
    sampler = Sampler(8, [7])
    logits = torch.zeros(1, 8)
    logits[0, 7], logits[0, 5], logits[0, 3] = 5.0, 4.0, 1.0  # EOS, then a stop id, then 3
    s = state(temperature=0.0, min_tokens=4, stop_token_ids=[5])
    tokens = []
    for _ in range(5):
        tok = sampler(logits, [s]).token_ids[0]
        tokens.append(tok)
        s.output_token_ids.append(tok)
    assert tokens == [3, 3, 3, 3, 7]


# ---------------------------------------------------------------- logprobs
def test_logprobs_match_processed_logits():
    torch.manual_seed(3)
    vocab = 40
    logits = torch.randn(5, vocab)
    states = [
        state(temperature=0.0, logprobs=5, out=[3, 3], repetition_penalty=1.5),
        state(temperature=0.8, top_k=5, logprobs=20, gen=make_generator(1)),
        state(temperature=1.0, logprobs=None),
        state(temperature=1.0, logprobs=0, min_tokens=2, out=[1]),
        state(temperature=0.7, top_p=0.5, logprobs=3, frequency_penalty=1.0, out=[0, 0, 9]),
    ]
    sampler = Sampler(vocab, [0], generator=make_generator(0))
    out = sampler(logits, states)
    lp = torch.log_softmax(sampler.process_logits(logits, states), dim=-1)
    assert out.logprobs[2] is None
    for r, s in enumerate(states):
        got = out.logprobs[r]
        if got is None:
            continue
        tok = out.token_ids[r]
        assert got.token_id == tok
        assert got.logprob == lp[r, tok].item()
        assert got.rank == 1 + int((lp[r] > lp[r, tok]).sum())
        n = s.params.logprobs
        assert len(got.top_ids) == len(got.top_logprobs) == n
        assert got.top_logprobs == sorted(got.top_logprobs, reverse=True)
        assert got.top_ids == lp[r].topk(n).indices.tolist()[:n]
        assert got.top_logprobs == [lp[r, t].item() for t in got.top_ids]
    assert out.logprobs[0].rank == 1  # greedy picks the most likely token
    assert out.logprobs[3].top_ids == [] and math.isinf(lp[3, 0].item())  # EOS masked under min_tokens


def test_logprobs_n_clamped_to_vocab():
    out = Sampler(4, []).__call__(torch.randn(1, 4), [state(temperature=0.0, logprobs=20)])
    assert len(out.logprobs[0].top_ids) == 4


# ---------------------------------------------------------------- seeded determinism
VOCAB = 64


def step_logits(key: int, step: int) -> torch.Tensor:
    """Deterministic logits for request `key` at `step`, independent of the batch."""
    g = torch.Generator().manual_seed(key * 1000 + step)
    return torch.randn(VOCAB, generator=g) * 2.0


TARGET = dict(temperature=0.9, top_k=40, top_p=0.95, seed=4242)


def run_batch(layout: list[tuple[int, dict]], steps: int = 20, engine_seed: int = 0) -> dict[int, list[int]]:
    """layout: (request key, params) per row; returns each key's sampled tokens."""
    sampler = Sampler(VOCAB, [VOCAB - 1], generator=make_generator(engine_seed))
    states = {}
    for key, kw in layout:
        p = SamplingParams(**kw)
        gen = make_generator(p.seed) if p.seed is not None else None
        states[key] = SamplingState(p, [1, 2, 3], [], gen)
    for step in range(steps):
        logits = torch.stack([step_logits(key, step) for key, _ in layout])
        out = sampler(logits, [states[key] for key, _ in layout])
        for (key, _), tok in zip(layout, out.token_ids, strict=True):
            states[key].output_token_ids.append(tok)
    return {key: s.output_token_ids for key, s in states.items()}


def test_seeded_request_independent_of_batch():
    alone = run_batch([(0, TARGET)])[0]
    others = [
        (1, dict(temperature=1.0, seed=7)),
        (2, dict(temperature=1.0)),
        (3, dict(temperature=0.0)),
        (4, dict(temperature=0.7, top_k=5, presence_penalty=0.5, logprobs=2)),
        (5, dict(temperature=1.0, top_p=0.6, min_p=0.1, seed=3)),
    ]
    first = run_batch([(0, TARGET)] + others, engine_seed=1)[0]
    middle = run_batch(others[:2] + [(0, TARGET)] + others[2:], engine_seed=2)[0]
    last = run_batch(others[::-1] + [(0, TARGET)], engine_seed=3)[0]
    assert alone == first == middle == last
    assert len(set(alone)) > 3  # really sampled, not stuck on one token
    assert run_batch([(0, {**TARGET, "seed": 4243})])[0] != alone


def test_nucleus_window_does_not_change_seeded_tokens(monkeypatch):
    """The CPU window for top-p is an optimization: the same tokens as a full sort."""
    layout = [(0, dict(temperature=1.0, top_p=0.9, seed=5)), (1, dict(temperature=1.5, top_p=0.7, seed=6))]
    default = run_batch(layout)
    monkeypatch.setattr("services.executor.sampler.NUCLEUS_WINDOWS", (2, 4))  # often too small: fallback
    small = run_batch(layout)
    monkeypatch.setattr("services.executor.sampler.NUCLEUS_WINDOWS", ())  # always the full sort
    assert default == small == run_batch(layout)


def seeded_tokens(seed: int, indexes: range, gen: torch.Generator, history: int = 0) -> list[int]:
    """The token drawn at each output index from flat logits: a fingerprint of the noise alone.

    `history` arbitrary tokens already generated, then one token per index in `indexes`.
    """
    s = SamplingState(SamplingParams(temperature=1.0, seed=seed), [1], [7] * history, gen)
    sampler = Sampler(VOCAB, [])
    out = []
    for k in indexes:
        s.output_token_ids[:] = [7] * k  # only the count of earlier tokens may matter
        out.append(sampler(torch.zeros(1, VOCAB), [s]).token_ids[0])
    return out


def test_seeded_draw_is_a_function_of_seed_and_token_index():
    """Preemption re-creates a request's generator and recomputes it: the k-th token's noise
    must come from (seed, k) alone, not from how many draws the generator made before."""
    ref = seeded_tokens(4242, range(12), make_generator(4242))
    assert len(set(ref)) > 6  # flat logits: the token is the noise's argmax
    # A fresh generator (as after preemption) resuming at index 6 draws what index 6 drew.
    assert seeded_tokens(4242, range(6, 12), make_generator(4242)) == ref[6:]
    # A generator in any state (used before, seeded otherwise) gives the same draws.
    used = make_generator(1)
    torch.rand(3 * VOCAB, generator=used)
    assert seeded_tokens(4242, range(12), used) == ref
    # Another seed, and in particular the n choices' seed + 1, are unrelated streams, also
    # shifted by an index ((s + 1, k) is not (s, k + 1)).
    other = seeded_tokens(4243, range(12), make_generator(0))
    assert other != ref and other[:-1] != ref[1:]
    assert sum(a == b for a, b in zip(other, ref, strict=True)) <= 3


def test_seeded_request_resumed_mid_stream_matches_uninterrupted():
    """Real logits: a request's state re-created after k tokens continues as if never stopped."""
    p = SamplingParams(**TARGET)
    full = run_batch([(0, TARGET)], steps=10)[0]
    sampler = Sampler(VOCAB, [VOCAB - 1])
    s = SamplingState(p, [1, 2, 3], list(full[:4]), make_generator(p.seed))
    for step in range(4, 10):
        s.output_token_ids.append(sampler(step_logits(0, step).unsqueeze(0), [s]).token_ids[0])
    assert s.output_token_ids == full


def test_engine_seed_makes_unseeded_rows_reproducible():
    layout = [(k, dict(temperature=1.0)) for k in range(4)]
    first = run_batch(layout, steps=5, engine_seed=11)
    assert first == run_batch(layout, steps=5, engine_seed=11)
    # The engine seed really drives them: another one gives other tokens.
    assert first != run_batch(layout, steps=5, engine_seed=12)
