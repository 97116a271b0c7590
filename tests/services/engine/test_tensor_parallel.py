"""The in-process engine at tensor_parallel_size > 1 (gloo on CPU, ranks 1..N-1 in worker
processes) gives the same tokens as at TP=1, fp32: greedy and seeded sampling, chunked
prefill, prefix-cache hits, preemption; an injected fault fails one step on every rank and
the engine goes on."""

from __future__ import annotations

import multiprocessing
import random

import pytest
import torch

from services.engine import LLM, SamplingParams
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    # Ranks get torch.get_num_threads() // N threads each: pin the total for every machine.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]


def generate(llm: LLM, prompts, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def tp_llm(path, tp: int, **kw) -> LLM:
    kw.setdefault("num_gpu_blocks_override", 64)
    return LLM(str(path), dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=tp, **kw)


def test_smollm2_tp3_matches_tp1(smollm2_dir):
    # 9 query heads and 3 KV heads: 3 query heads and 1 KV head per rank.
    prompts = random_prompts([3, 40, 17, 9], 49152)
    want = generate(tp_llm(smollm2_dir, 1), prompts)
    llm = tp_llm(smollm2_dir, 3)
    try:
        assert generate(llm, prompts) == want
    finally:
        llm.shutdown()


# Every architecture and both splits, not every pair (each case is 4-10 s of process start-up).
@pytest.mark.parametrize(("arch", "tp"), [
    ("llama", 2), ("llama", 4),  # 4 ranks, 2 KV heads: each KV head on two ranks
    ("qwen2", 2),  # attention biases split by rank
    ("qwen3", 4),  # q/k norms on a KV head shared by two ranks
])
def test_tiny_models_match_tp1(tmp_path, arch, tp):
    path = make_tiny_model(arch, tmp_path)
    prompts = random_prompts([5, 17, 33, 2], 256)
    want = generate(tp_llm(path, 1), prompts)
    llm = tp_llm(path, tp)
    try:
        assert generate(llm, prompts) == want
        assert llm.engine.runner.tp.stats.calls > 0  # the collectives ran, and were counted
    finally:
        llm.shutdown()


def scheduling_scenario(llm: LLM) -> list[list[int]]:
    """Chunked prefill (16-token budget), preemption (12 blocks of 4), a prefix-cache hit,
    then seeded sampling; returns every output in order."""
    prompts = random_prompts([5, 17, 33, 2], 256)
    out = generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    out += generate(llm, [prompts[2][:24] + [11, 12]])  # shares 6 full blocks with prompt 2
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=6, ignore_eos=True) for s in (1, 2)]
    out += generate(llm, prompts[:2], seeded)
    return out


def test_chunked_prefill_prefix_cache_preemption_and_seeds_match_tp1(tmp_path):
    path = make_tiny_model("qwen2", tmp_path)
    kw = dict(block_size=4, num_gpu_blocks_override=12, max_num_batched_tokens=16)
    ref = tp_llm(path, 1, **kw)
    want = scheduling_scenario(ref)
    llm = tp_llm(path, 2, **kw)
    try:
        assert scheduling_scenario(llm) == want
        stats, ref_stats = llm.engine.stats(), ref.engine.stats()
        assert stats.num_preemptions > 0 and stats.num_preemptions == ref_stats.num_preemptions
        assert stats.prefix_cache_hits >= 24 and stats.prefix_cache_hits == ref_stats.prefix_cache_hits
    finally:
        llm.shutdown()


def test_injected_fault_fails_one_step_on_every_rank(tmp_path, monkeypatch):
    path = make_tiny_model("llama", tmp_path)
    prompts = random_prompts([5, 9], 256)
    want = generate(tp_llm(path, 1), prompts)
    # Rank 0 raises in its 2nd step with work; rank 1 must agree and skip that forward too,
    # or the next step's collectives no longer line up.
    monkeypatch.setenv("FOLIO_FAULT_STEP", "0:2")
    llm = tp_llm(path, 2)
    monkeypatch.delenv("FOLIO_FAULT_STEP")
    try:
        failed = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].finish_reason for o in failed] == ["abort", "abort"]
        assert [len(o.outputs[0].token_ids) for o in failed] == [1, 1]  # step 1 sampled, step 2 failed
        assert generate(llm, prompts) == want
    finally:
        llm.shutdown()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("folio-tp-rank")]
