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


def run(path, backend: str, **kw) -> list[list[int]]:
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
    first = llm.generate(PROMPTS, params)
    # Same prompts again: with prefix caching on, these extend over cached blocks.
    again = llm.generate(PROMPTS, params)
    assert llm.engine.stats().kv_cache_usage == 0.0
    return [o.token_ids for o in first + again]


@pytest.mark.parametrize("block_size", [1, 4])
def test_triton_backend_matches_torch(tmp_path, block_size):
    path = make_tiny_model("llama", tmp_path / "m")
    # An 8-token budget splits the 9-token prompt into chunks: prefill + extend + decode mixed.
    kw = dict(block_size=block_size, max_num_batched_tokens=8, enable_prefix_caching=True)
    assert run(path, "triton", **kw) == run(path, "torch", **kw)
