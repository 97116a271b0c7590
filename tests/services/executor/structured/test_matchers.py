"""Grammar cache and logits masking on SmolLM2's real tokenizer (no model weights)."""

from __future__ import annotations

import pytest
import torch

from services.executor.loader import load_tokenizer, resolve_model
from services.executor.structured.compiler import GrammarCache
from services.executor.structured.matchers import GrammarMatchers
from shared.sampling_params import SamplingParams
from shared.structured_outputs import StructuredOutputsParams

VOCAB = 49152  # the model's vocabulary: the LM head's width, not the tokenizer's length
EOS = 2  # SmolLM2-Instruct's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m-instruct").path)


@pytest.fixture(scope="module")
def cache(tokenizer):
    c = GrammarCache(lambda: tokenizer, VOCAB, [EOS])
    yield c
    c.shutdown()


def _params(**spec) -> SamplingParams:
    return SamplingParams(structured_outputs=StructuredOutputsParams(**spec))


def test_equal_specs_share_one_compiled_grammar(cache):
    a = cache.get(StructuredOutputsParams(json={"type": "object"}))
    b = cache.get(StructuredOutputsParams(json='{"type": "object"}'))
    c = cache.get(StructuredOutputsParams(json={"type": "array"}))
    assert a is b and a is not c
    assert a.result(timeout=60) is b.result()


def test_mask_allows_exactly_the_grammar_tokens(cache, tokenizer):
    m = GrammarMatchers(cache)
    m.add("c", _params(choice=["yes", "no"]), [])
    assert "c" in m and "free" not in m
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB + 64)  # a padded LM head: columns past the vocabulary
    before = logits.clone()
    m.mask(logits, [(1, "c", [])])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    expected = {
        t
        for t in range(len(tokenizer))
        if (s := tokenizer.decode([t])) and ("yes".startswith(s) or "no".startswith(s))
    }
    assert allowed == expected
    assert torch.equal(logits[1, list(allowed)], before[1, list(allowed)])


def test_accept_terminates_at_the_stop_token_and_a_preempted_request_resumes(cache, tokenizer):
    m = GrammarMatchers(cache)
    no = tokenizer.encode("no")
    m.add("a", _params(choice=["yes", "no"]), [])
    for t in no:
        assert not m.accept("a", t)
    assert m.accept("a", EOS)  # the grammar ends only on a stop token
    # The same request re-sent after preemption with its output so far: only the stop token is left.
    m.remove("a")
    m.add("a", _params(choice=["yes", "no"]), no)
    logits = torch.zeros(1, VOCAB)
    m.mask(logits, [(0, "a", [])])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    m.remove("a")
    assert not m


def _allowed(row: torch.Tensor) -> list[int]:
    return torch.isfinite(row).nonzero().flatten().tolist()


def test_draft_rows_are_masked_for_their_prefix_and_the_matcher_rolls_back(cache, tokenizer):
    """A request with drafts has 1 + k rows: row j is masked as the grammar stands after
    drafts 0..j-1; rows after a draft the grammar rejects repeat the last mask; afterwards
    the matcher is where it was, so accept() advances it by the tokens really emitted."""
    spec = dict(choice=["yes please, thank you", "no thanks"])
    yes = tokenizer.encode("yes please, thank you")
    assert len(yes) >= 3
    bad = tokenizer.encode("x")[0]

    def expected_after(prefix: list[int], spec=spec) -> list[int]:
        ref = GrammarMatchers(cache)
        ref.add("r", _params(**spec), prefix)  # the replay path accepts the prefix
        one = torch.zeros(1, VOCAB)
        ref.mask(one, [(0, "r", [])])
        return _allowed(one[0])

    m = GrammarMatchers(cache)
    m.add("s", _params(**spec), [])
    m.add("c", _params(choice=["yes", "no"]), [])
    drafts = [yes[0], yes[1], bad, yes[2]]
    logits = torch.zeros(1 + len(drafts) + 2, VOCAB)
    m.mask(logits, [(0, "s", drafts), (6, "c", [])])  # row 5: an unconstrained request
    for j in range(3):
        assert _allowed(logits[j]) == expected_after(yes[:j])
    assert bad not in _allowed(logits[2])  # verification can never accept the bad draft
    assert _allowed(logits[3]) == _allowed(logits[4]) == _allowed(logits[2])
    assert torch.isfinite(logits[5]).all()
    assert _allowed(logits[6]) == expected_after([], dict(choice=["yes", "no"]))
    # Rolled back: the mask without drafts is the first row's again, and the emitted
    # tokens (two accepted drafts plus the target's own token) advance it.
    again = torch.zeros(1, VOCAB)
    m.mask(again, [(0, "s", [])])
    assert _allowed(again[0]) == expected_after([])
    for t in yes:
        assert not m.accept("s", t)
    assert m.accept("s", EOS)


def test_drafts_past_the_end_of_the_grammar_are_unreachable_rows(cache, tokenizer):
    no = tokenizer.encode("no")
    m = GrammarMatchers(cache)
    m.add("e", _params(choice=["yes", "no"]), [])
    drafts = no + [EOS, no[0]]  # the stop token ends the grammar: the row after repeats
    logits = torch.zeros(1 + len(drafts), VOCAB)
    m.mask(logits, [(0, "e", drafts)])
    assert _allowed(logits[len(no)]) == [EOS]
    assert _allowed(logits[-1]) == _allowed(logits[-2]) == [EOS]
    for t in no:
        assert not m.accept("e", t)
    assert m.accept("e", EOS)


def test_a_token_outside_the_grammar_ends_the_request(cache, tokenizer):
    m = GrammarMatchers(cache)
    m.add("r", _params(regex="[0-9]+"), [])
    assert m.accept("r", tokenizer.encode("x")[0])


def test_a_grammar_that_fails_to_compile_ends_only_its_request():
    def no_tokenizer():
        raise OSError("tokenizer files missing")

    m = GrammarMatchers(GrammarCache(no_tokenizer, VOCAB, [EOS]))
    m.add("bad", _params(regex="[0-9]+"), [])
    logits = torch.zeros(2, VOCAB)
    m.mask(logits, [(0, "bad", [])])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    assert torch.isfinite(logits[1]).all()
    assert m.accept("bad", EOS)
    m.cache.shutdown()
