"""--quantization and the per-model default."""

from __future__ import annotations

import pytest
import torch

from services.executor.loader import bundled_gguf_path
from services.executor.quant.choose import DENSE_ABOVE_ROWS, choose_quantization
from shared.config import ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def q4_1():
    return bundled_gguf_path()  # SmolLM2: Q4_1 matrices, Q8_0 embedding


def test_fp8_is_a_clear_error_on_cpu(q4_1):
    with pytest.raises(ConfigError, match="fp8 weights need a GPU"):
        choose_quantization("fp8", "auto", q4_1, torch.bfloat16, CPU)


def test_gguf_needs_a_gguf_and_the_cpu():
    with pytest.raises(ConfigError, match="needs a GGUF model"):
        choose_quantization("gguf", "auto", None, torch.bfloat16, CPU)
    with pytest.raises(ConfigError, match="CPU kernels only"):
        choose_quantization("int8", "auto", None, torch.bfloat16, CUDA)


def test_explicit_choices(q4_1):
    assert choose_quantization("gguf", "float32", q4_1, torch.float32, CPU)[0].method == "gguf"
    assert choose_quantization("int4", "auto", None, torch.bfloat16, CPU)[0].method == "int4"
    assert choose_quantization("none", "auto", q4_1, torch.bfloat16, CPU)[0].method == "none"


def test_default_packs_a_4bit_gguf_in_bfloat16_only(q4_1):
    spec, why = choose_quantization(None, "auto", q4_1, torch.bfloat16, CPU)
    assert (spec.method, spec.keep_dense, spec.dense_above) == ("gguf", True, DENSE_ABOVE_ROWS)
    assert "Q4_1" in why and "dense bfloat16 copy" in why
    # float32 compute (no native bf16), an explicit dtype, a float checkpoint: dense.
    assert choose_quantization(None, "auto", q4_1, torch.float32, CPU)[0].method == "none"
    assert choose_quantization(None, "bfloat16", q4_1, torch.bfloat16, CPU)[0].method == "none"
    assert choose_quantization(None, "auto", None, torch.bfloat16, CPU)[0].method == "none"
