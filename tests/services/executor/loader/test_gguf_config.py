"""Config details of the GGUF conversion that SmolLM2 does not exercise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.executor.loader import ModelSourceError
from services.executor.loader.gguf_config import infer_llama3_scaling, llama3_rope_factors


@pytest.mark.parametrize(("factor", "original"), [(8.0, 8192), (32.0, 8192)])
def test_llama3_rope_freqs_are_recognized(factor: float, original: int) -> None:
    head_dim, theta = 128, 500000.0
    factors = llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, original).astype(np.float32)
    scaling = infer_llama3_scaling(factors, head_dim, theta, "x.gguf")
    assert scaling == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }
    # The config we write must make transformers compute the frequencies llama.cpp uses.
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=131072,
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(inv_freq.numpy(), plain / factors, rtol=1e-5)


def test_unknown_rope_freqs_are_rejected() -> None:
    with pytest.raises(ModelSourceError, match="rope_freqs"):
        infer_llama3_scaling(np.linspace(1, 3, 64), 128, 500000.0, "x.gguf")
