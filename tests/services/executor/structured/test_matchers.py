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
    m.mask(logits, [(1, "c")])
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
    m.mask(logits, [(0, "a")])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    m.remove("a")
    assert not m


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
    m.mask(logits, [(0, "bad")])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    assert torch.isfinite(logits[1]).all()
    assert m.accept("bad", EOS)
    m.cache.shutdown()
