"""The model with fused Triton elementwise kernels gives the torch ops' tokens.

The kernels themselves are tested in tests/services/executor/kernels/test_fused_ops.py;
this checks how the layers use them (the residual updated in place, q/k rotated in place
inside the fused qkv output, Qwen3's per-head norms left to torch). On CPU the kernels
run in Triton's interpreter (FOLIO_FUSED_KERNELS=all); on CUDA compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

from services.engine import LLM, SamplingParams
from services.executor.models.fused_ops import fused_ops_enabled
from tests.tiny_models import make_tiny_model

pytest.importorskip("triton")

DEVICE = os.environ.get("FOLIO_TEST_DEVICE", "cpu")
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33]]


def test_switch(monkeypatch):
    monkeypatch.delenv("FOLIO_FUSED_KERNELS", raising=False)
    assert fused_ops_enabled("cuda") and not fused_ops_enabled("cpu")
    monkeypatch.setenv("FOLIO_FUSED_KERNELS", "0")
    assert not fused_ops_enabled("cuda")
    monkeypatch.setenv("FOLIO_FUSED_KERNELS", "all")
    assert fused_ops_enabled("cpu") and fused_ops_enabled("cuda")


def run(path, monkeypatch, setting: str):
    monkeypatch.setenv("FOLIO_FUSED_KERNELS", setting)
    llm = LLM(
        str(path),
        dtype="float32",
        skip_tokenizer_init=True,
        device=DEVICE,
        attention_backend="torch",
        num_gpu_blocks_override=256,
        enforce_eager=True,
    )
    norm = llm.engine.runner.model.model.norm
    assert (norm._kernel is not None) == (setting != "0")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, params)
    logprobs = torch.tensor([lp.top_logprobs for o in outs for lp in o.logprobs])
    return [o.token_ids for o in outs], logprobs


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_fused_layers_match_torch_ops(tmp_path, monkeypatch, arch):
    path = make_tiny_model(arch, tmp_path / "m")
    tokens, logprobs = run(path, monkeypatch, "0")
    fused_tokens, fused_logprobs = run(path, monkeypatch, "all")
    assert fused_tokens == tokens
    # fp32: the kernels differ from torch in summation order only.
    torch.testing.assert_close(fused_logprobs, logprobs, rtol=0, atol=1e-4)
