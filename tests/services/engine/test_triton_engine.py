"""The engine with the triton attention backend gives the torch backend's greedy tokens.

On CPU the kernels run in Triton's interpreter, so the model is tiny; on a GPU the same
test runs compiled.
"""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from tests.tiny_models import make_tiny_model

pytest.importorskip("triton")

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33]]


def run(path, backend: str, stats: list | None = None, prompts=PROMPTS, **kw) -> list[list[int]]:
    # A fixed cache size: on a GPU, parallel test workers must not each claim 90% of memory.
    llm = LLM(
        str(path),
        attention_backend=backend,
        dtype="float32",
        skip_tokenizer_init=True,
        num_gpu_blocks_override=512,
        **kw,
    )
    assert type(llm.engine.runner.attn_backend).__name__.lower().startswith(backend)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts, params)
    # Same prompts again: with prefix caching on, these extend over cached blocks.
    again = llm.generate(prompts, params)
    assert llm.engine.stats().kv_cache_usage == 0.0
    if stats is not None:
        stats.append(llm.engine.stats())
    return [o.token_ids for o in first + again]


@pytest.mark.parametrize("block_size", [1, 4])
def test_triton_backend_matches_torch(tmp_path, block_size):
    path = make_tiny_model("llama", tmp_path / "m")
    # An 8-token budget splits the 9-token prompt into chunks: prefill + extend + decode mixed.
    kw = dict(block_size=block_size, max_num_batched_tokens=8, enable_prefix_caching=True)
    assert run(path, "triton", **kw) == run(path, "torch", **kw)


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_speculative_verification_on_the_triton_backend_matches_torch(tmp_path, spec):
    """Verification batches (a pending token + drafts, an extend over paged KV) and a draft
    model's catch-up and decode steps through the Triton kernels."""
    path = make_tiny_model("llama", tmp_path / "m")
    if spec == "ngram":
        config = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    else:
        config = {"model": str(make_tiny_model("llama", tmp_path / "d", seed=1)), "num_speculative_tokens": 3}
    kw = dict(block_size=4, max_num_batched_tokens=32)
    stats: list = []
    # Every token of the vocabulary is in this prompt: a 1-gram lookup always finds a draft
    # (a draft model always drafts).
    prompts = PROMPTS + [list(range(256))] if spec == "ngram" else PROMPTS
    got = run(path, "triton", stats, prompts, speculative_config=config, **kw)
    assert got == run(path, "torch", prompts=prompts, **kw)
    assert stats[0].spec_decode.num_draft_tokens > 0
