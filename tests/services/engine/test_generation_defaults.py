"""A model folder's generation_config.json sampling defaults (vLLM's --generation-config)."""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from shared.generation_defaults import sampling_defaults
from tests.tiny_models import make_tiny_model, write_generation_config

GEN = dict(temperature=0.0, top_k=7, top_p=0.9, min_p=0.05, repetition_penalty=1.1, max_new_tokens=4)


def test_sampling_defaults_read_only_sampling_fields(tmp_path):
    write_generation_config(tmp_path / "m", do_sample=True, eos_token_id=2, **GEN)
    want = {**{k: v for k, v in GEN.items() if k != "max_new_tokens"}, "max_tokens": 4}
    assert sampling_defaults(tmp_path / "m") == want
    assert sampling_defaults(tmp_path / "m", "vllm") == {}
    assert sampling_defaults(None, str(tmp_path / "m")) == want  # a folder of its own
    assert sampling_defaults(tmp_path / "none") == {}


@pytest.mark.slow
def test_llm_uses_the_model_defaults_unless_vllm(tmp_path):
    path = write_generation_config(make_tiny_model("llama", tmp_path), temperature=0.0, max_new_tokens=4)
    prompts = [[11, 12, 13, 14], [20, 30]]
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, num_gpu_blocks_override=32)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.0, 4)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert got == want and all(len(t) <= 4 for t in got)
    off = LLM(str(path), skip_tokenizer_init=True, num_gpu_blocks_override=32, generation_config="vllm")
    assert off.get_default_sampling_params() == SamplingParams()
