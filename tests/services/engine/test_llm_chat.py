"""`LLM.chat` and `SamplingParams.logit_bias` on the in-process engine (SmolLM2, fp32)."""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", max_model_len=512)


def templated(llm: LLM, conv: list[dict]) -> list[int]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def test_chat_one_conversation_equals_generate(llm):
    [out] = llm.chat(CONVS[0], GREEDY)
    ids = templated(llm, CONVS[0])
    [ref] = llm.generate([ids], GREEDY)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert out.outputs[0].text == ref.outputs[0].text and out.outputs[0].text


def test_chat_list_of_conversations_equals_generate(llm):
    outs = llm.chat(CONVS, GREEDY)
    refs = llm.generate([templated(llm, c) for c in CONVS], GREEDY)
    assert len(outs) == 2
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]
    assert outs[0].outputs[0].text != outs[1].outputs[0].text


def test_logit_bias_in_process(llm):
    tok = llm.get_tokenizer()
    [t] = tok.encode(" banana", add_special_tokens=False)
    ids = templated(llm, CONVS[0])
    [plain] = llm.generate([ids], GREEDY)
    [forced] = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=3, logit_bias={t: 100.0}))
    assert forced.outputs[0].token_ids == [t, t, t]
    g = plain.outputs[0].token_ids[0]
    [banned] = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, logit_bias={g: -100.0}))
    assert banned.outputs[0].token_ids != [g]
    # Only the biased row moves: the unbiased one in the same batch keeps its greedy tokens.
    biased = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={t: 100})
    outs = llm.generate([ids, ids], [GREEDY, biased])
    assert outs[0].outputs[0].token_ids == plain.outputs[0].token_ids
    assert outs[1].outputs[0].token_ids == [t] * 8
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate([ids], SamplingParams(logit_bias={10**9: 1.0}))
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: 200.0})
