"""Speculative decoding is exact: fp32 greedy outputs are token-for-token those of the same
requests without speculation, in batches that mix requests with and without drafts,
with chunked prefill, prefix-cache hits and preemption in the run.

Draft-model variants (the target drafting for itself, a tiny random draft) are in
test_spec_decode_draft.py; the rejection sampler's distribution in
tests/services/executor/spec_decode/test_rejection_sampler.py.
"""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from tests.tiny_models import make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

PARAGRAPH = (
    "The library opens at nine on weekdays and at ten on Saturdays. Members may borrow up to "
    "five books at a time for three weeks, and renew them twice online unless another member "
    "has reserved them."
)
COPY_TASKS = [
    f"Repeat this text exactly, word for word:\n\n{PARAGRAPH}",
    f"Rewrite this paragraph, changing only 'five books' to 'six books':\n\n{PARAGRAPH}",
    f"Copy the following notice:\n\n{PARAGRAPH}\n\n{PARAGRAPH}",
]
OPEN_QUESTIONS = ["Why do cats purr?", "Name a prime number above 50."]


def chat(llm: LLM, text: str) -> list[int]:
    return llm.render_chat([{"role": "user", "content": text}])


def run_pair(model: str, prompts_fn, params, *, waves: int = 1, **engine_args):
    """Outputs without and with n-gram speculation (same engine args), and the spec engine."""
    outs = []
    for spec in (None, NGRAM):
        llm = LLM(model, dtype="float32", speculative_config=spec, **engine_args)
        prompts = prompts_fn(llm)
        got = []
        for wave in range(waves):  # later waves hit the prefix cache the first one filled
            got += [o.token_ids for o in llm.generate(prompts[wave::waves], params)]
        outs.append(got)
        assert llm.engine.stats().kv_cache_usage == 0.0
    return outs[0], outs[1], llm


def test_ngram_smollm2_exact_with_chunked_prefill_prefix_hits_and_preemption(smollm2_dir):
    # 14 blocks of 16 slots for six requests of 60-100 prompt tokens and 48 new ones: some
    # are preempted; 64-token budget: prompts prefill in chunks beside speculative decodes.
    params = SamplingParams(temperature=0.0, max_tokens=48)
    base, spec, llm = run_pair(
        str(smollm2_dir),
        lambda llm: [chat(llm, t) for t in COPY_TASKS + OPEN_QUESTIONS + COPY_TASKS[:1]],
        params,
        waves=2,
        num_gpu_blocks_override=14,
        block_size=16,
        max_num_batched_tokens=64,
    )
    assert spec == base
    stats = llm.engine.stats()
    sd = stats.spec_decode
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert sd.num_draft_tokens > 0 and 0 < sd.num_accepted_tokens < sd.num_draft_tokens
    assert sd.accepted_tokens_per_pos[0] >= sd.accepted_tokens_per_pos[-1]
    # Copying text, most drafts are right: far fewer steps than output tokens.
    assert sd.num_accepted_tokens > 0.5 * sum(len(t) for t in spec[:3])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_ngram_tiny_models_exact(tmp_path, arch):
    path = str(make_tiny_model(arch, tmp_path / arch))
    # Random tiny models repeat themselves, so n-gram drafts come and are partly accepted.
    prompts = lambda llm: [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13], list(range(20, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    base, spec, llm = run_pair(
        path, prompts, params, block_size=4, max_num_batched_tokens=16, skip_tokenizer_init=True
    )
    assert spec == base
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def test_ngram_stops_inside_an_accepted_run_and_logprobs_follow_the_tokens(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", speculative_config=NGRAM)
    prompt = chat(llm, COPY_TASKS[0])
    (full,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, logprobs=2))
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 10
    for tok, lp in zip(full.token_ids, full.logprobs, strict=True):
        assert lp.token_id == tok and lp.rank == 1
    # max_tokens and a stop token id in the middle of accepted runs cut exactly there.
    for n in (7, 13):
        (cut,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
        assert cut.token_ids == full.token_ids[:n] and cut.finish_reason == "length"
    stop_id = full.token_ids[20]
    first = full.token_ids.index(stop_id)
    (cut,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_id]))
    assert cut.token_ids == full.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert llm.engine.stats().kv_cache_usage == 0.0


def test_seeded_sampling_with_drafts_gives_the_tokens_of_plain_decoding(smollm2_dir):
    """The number of drafts follows measured step times (backoff.py), so it changes from run
    to run: a seeded request must not depend on it (it did: runs differed at token 9)."""
    llm = LLM(str(smollm2_dir), dtype="float32", speculative_config=NGRAM)
    prompt = chat(llm, COPY_TASKS[0])
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=32, seed=3, ignore_eos=True)
    runs = [llm.generate([prompt], params)[0].token_ids for _ in range(2)]
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    plain = LLM(str(smollm2_dir), dtype="float32").generate([prompt], params)[0].token_ids
    assert runs == [plain] * 2 and len(plain) == 32


def test_ngram_at_tensor_parallel_2_equals_tp1(tmp_path):
    """Rank 0 verifies and proposes; every rank appends the same accepted run."""
    path = str(make_tiny_model("llama", tmp_path / "llama"))
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], list(range(20, 50))]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = [
        o.token_ids for o in LLM(path, dtype="float32", skip_tokenizer_init=True).generate(prompts, params)
    ]
    llm = LLM(
        path, dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=2, speculative_config=NGRAM
    )
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    finally:
        llm.shutdown()


def test_constrained_requests_get_drafts_and_keep_their_greedy_tokens(smollm2_dir):
    """Drafts for requests under a grammar: draft rows are masked for their prefix and the
    matcher rolls back, so outputs equal plain constrained decoding; an unconstrained
    request in the same batch is unchanged, and copying JSON the prompt holds accepts
    most drafts."""
    import json

    from shared.structured_outputs import StructuredOutputsParams

    record = {"name": "Ada Lovelace", "born": 1815, "languages": ["English", "French"], "active": False}
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
            "languages": {"type": "array", "items": {"type": "string"}},
            "active": {"type": "boolean"},
        },
        "required": ["name", "born", "languages", "active"],
        "additionalProperties": False,
    }
    specs = [
        StructuredOutputsParams(json=schema),
        StructuredOutputsParams(regex=r"[A-Z][a-z]+ opens at (nine|ten)\."),
        None,
    ]
    texts = [
        f"Repeat this JSON exactly:\n{json.dumps(record)}",
        f"When does the library open? Answer from this text:\n\n{PARAGRAPH}",
        COPY_TASKS[0],
    ]

    def params(spec):
        return SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=spec)

    outs = []
    for spec_config in (None, NGRAM):
        llm = LLM(str(smollm2_dir), dtype="float32", speculative_config=spec_config)
        prompts = [chat(llm, t) for t in texts]
        outs.append(llm.generate(prompts, [params(s) for s in specs]))
        assert llm.engine.stats().kv_cache_usage == 0.0
    base, spec = outs
    assert [o.token_ids for o in spec] == [o.token_ids for o in base]
    assert json.loads(spec[0].text) == record
    assert spec[0].finish_reason == "stop"
    sd = llm.engine.stats().spec_decode
    assert sd.num_draft_tokens > 0 and sd.num_accepted_tokens > 0.5 * len(spec[0].token_ids)
