"""End to end: the in-process engine on SmolLM2-135M-Instruct, fp32 greedy, against transformers."""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me one tip for learning Python.",
    "What colour is the sky on Mars?",
    "Translate 'good morning' into Spanish.",
    "Why do cats purr?",
    "Name a prime number above 50.",
]
SYSTEM = (
    "You are a concise, friendly assistant for a small library. Answer in at most two short "
    "sentences, avoid lists, and never invent facts about the library's opening hours, which are "
    "nine to five on weekdays and ten to two on Saturdays."
)


def chat_prompts(tokenizer) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in QUESTIONS
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def common_prefix_len(prompts: list[list[int]]) -> int:
    n = 0
    while all(len(p) > n and p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefix_matches_transformers(smollm2_dir, prefix_caching):
    llm = LLM(str(smollm2_dir), dtype="float32", enable_prefix_caching=prefix_caching, block_size=16)
    prompts = chat_prompts(llm.tokenizer)
    prefix = common_prefix_len(prompts)
    assert prefix >= 48, prefix
    # The first request alone fills the cache; the other seven are admitted together after it.
    first = llm.generate([prompts[0]], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    got = [o.token_ids for o in first + rest]
    assert got == hf_greedy(smollm2_dir, prompts, 16)
    stats = llm.engine.stats()
    if prefix_caching:
        assert stats.prefix_cache_hits == 7 * (prefix // 16) * 16
        assert all(o.num_cached_tokens == (prefix // 16) * 16 for o in rest)
    else:
        assert stats.prefix_cache_hits == 0


def test_chunked_prefill_matches_transformers(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", max_num_batched_tokens=32, enable_prefix_caching=False)
    prompts = chat_prompts(llm.tokenizer)[:4]
    assert all(len(p) > 32 for p in prompts)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_greedy(smollm2_dir, prompts, 16)
    # Each prompt needed several 32-token chunks, so there were more steps than decode steps alone.
    assert llm.engine.num_steps > 16 + max(len(p) for p in prompts) // 32


def test_preemption_matches_transformers(smollm2_dir):
    # 10 blocks of 16 slots: three 47-token prompts fill 9 of them; their second output token
    # needs a fourth block each, so two of them are preempted (the fourth prompt waits).
    llm = LLM(
        str(smollm2_dir),
        dtype="float32",
        num_gpu_blocks_override=10,
        block_size=16,
        enable_prefix_caching=False,
    )
    prompts = [p[-47:] for p in chat_prompts(llm.tokenizer)[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = llm.generate(prompts, params)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == hf_greedy(smollm2_dir, prompts, 24)
    assert llm.engine.stats().kv_cache_usage == 0.0


def test_text_stop_strings_and_n(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32")
    (out,) = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=12))
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.finish_reason in ("length", "stop")
    # A stop string taken from the greedy text itself ends the text before it.
    stop = out.text.strip().split()[1]
    (cut,) = llm.generate(
        "The capital of France is", SamplingParams(temperature=0.0, max_tokens=12, stop=[stop])
    )
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and out.text.startswith(cut.text)
    # n completions with a seed: reproducible, and each choice has its own seed.
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7)
    a = llm.generate("Once upon a time", params)[0]
    b = llm.generate("Once upon a time", params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    assert llm.engine.stats().kv_cache_usage == 0.0


def test_logprobs_and_errors(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", max_model_len=64)
    (out,) = llm.generate([1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and lp.rank == 1 and len(lp.top_ids) == 3
    with pytest.raises(ValueError):
        llm.generate([1] * 64, GREEDY)  # prompt fills max_model_len
    with pytest.raises(ValueError):
        llm.generate([[]], GREEDY)
    for bad_id in (49152, -1):
        with pytest.raises(ValueError, match=f"Token id {bad_id} is out of vocabulary"):
            llm.generate([1, bad_id, 3], GREEDY)
    # The engine still serves after rejecting bad prompts.
    assert len(llm.generate([1, 2, 3], GREEDY)[0].token_ids) > 0


def test_seeded_sampling_survives_preemption(smollm2_dir):
    """A seeded request gives the same tokens whether or not it was preempted (recomputed)."""
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=100 + i, ignore_eos=True)
              for i in range(4)]
    roomy = LLM(str(smollm2_dir), dtype="float32", block_size=16, enable_prefix_caching=False)
    prompts = [p[-47:] for p in chat_prompts(roomy.tokenizer)[:4]]
    want = [o.token_ids for o in roomy.generate(prompts, params)]
    assert roomy.engine.stats().num_preemptions == 0
    # 12 blocks of 16: the four 47-token prompts fill all of them; every second output token
    # needs a fourth block (the youngest is preempted), and the 65th token a fifth (another one).
    tight = LLM(str(smollm2_dir), dtype="float32", num_gpu_blocks_override=12, block_size=16,
                enable_prefix_caching=False)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.stats().num_preemptions >= 2
    assert got == want
