"""Draft-model speculative decoding is exact: fp32 greedy outputs equal plain decoding with
the target drafting for itself and with a tiny random draft of the same vocabulary, with
chunked prefill, prefix-cache hits and preemption in the run."""

from __future__ import annotations

import shutil

import pytest

from services.engine import LLM, SamplingParams
from shared.config import ConfigError
from tests.services.engine.test_spec_decode import COPY_TASKS, OPEN_QUESTIONS, chat
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_smollm2_draft(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("draft"), vocab_size=49152, num_hidden_layers=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


def outputs(model, prompts_fn, params, waves=1, **engine_args):
    llm = LLM(str(model), dtype="float32", **engine_args)
    prompts = prompts_fn(llm)
    got = []
    for wave in range(waves):
        got += [o.token_ids for o in llm.generate(prompts[wave::waves], params)]
    assert llm.engine.stats().kv_cache_usage == 0.0
    return got, llm


@pytest.mark.parametrize("draft", ["self", "tiny_random"])
def test_smollm2_with_a_draft_model_is_exact(smollm2_dir, tiny_smollm2_draft, draft):
    draft_path = smollm2_dir if draft == "self" else tiny_smollm2_draft
    prompts = lambda llm: [chat(llm, t) for t in COPY_TASKS[:2] + OPEN_QUESTIONS[:1] + COPY_TASKS[:1]]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    args = dict(num_gpu_blocks_override=12, block_size=16, max_num_batched_tokens=48)
    want, _ = outputs(smollm2_dir, prompts, params, waves=2, **args)
    spec = {"model": str(draft_path), "num_speculative_tokens": 3}
    got, llm = outputs(smollm2_dir, prompts, params, waves=2, speculative_config=spec, **args)
    assert got == want
    stats = llm.engine.stats()
    sd = stats.spec_decode
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and sd.num_draft_tokens > 0
    if draft == "self":  # the target's own greedy drafts: all accepted unless cut by the budget
        assert sd.num_accepted_tokens == sd.num_draft_tokens
    else:  # a random draft is nearly always wrong, and back-off stops drafting for it
        assert sd.num_accepted_tokens < 0.2 * sd.num_draft_tokens
        assert sd.num_drafts < sum(len(t) for t in got) / 2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_targets_with_a_tiny_random_draft_are_exact(tmp_path, arch):
    target = make_tiny_model(arch, tmp_path / "target")
    draft = make_tiny_model(arch, tmp_path / "draft", seed=1, num_hidden_layers=1)
    prompts = lambda llm: [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13], list(range(20, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    args = dict(block_size=4, max_num_batched_tokens=16, skip_tokenizer_init=True)
    want, _ = outputs(target, prompts, params, **args)
    for spec in (
        {"model": str(draft), "num_speculative_tokens": 4},
        {"model": str(target), "num_speculative_tokens": 4},
    ):
        got, llm = outputs(target, prompts, params, speculative_config=spec, **args)
        assert got == want
        assert llm.engine.stats().spec_decode.num_draft_tokens > 0


def test_a_draft_with_another_vocabulary_is_refused_at_start_up(tmp_path, smollm2_dir):
    other = make_tiny_model("llama", tmp_path / "other")
    with pytest.raises(ConfigError, match="speculative_config"):
        LLM(
            str(smollm2_dir),
            dtype="float32",
            speculative_config={"model": str(other), "num_speculative_tokens": 2},
        )
