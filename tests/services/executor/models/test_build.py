"""build_model with each weight format: packed GGUF, load-time int8, and the dense path.

Accuracy is measured as teacher-forced next-token agreement: the argmax of every
position's logits over one held-in passage, against the dense float32 model of the same
weights.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from services.executor.attention import get_attention_backend
from services.executor.loader import load_tokenizer, resolve_model
from services.executor.models.build import build_model
from shared.config import ConfigError, EngineConfig
from tests.services.executor.loader.tiny_gguf import write_tiny_llama_gguf
from tests.services.executor.test_models import prefill
from tests.tiny_models import make_tiny_model

CPU = torch.device("cpu")

# Held-in text: the kind of prose SmolLM2 was trained on.
PASSAGE = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century and spread "
    "to Western Europe and North America. It replaced hand production with machines, new chemical "
    "and iron processes, steam power and the factory system. Textiles were the dominant industry "
    "in terms of employment, value of output and capital invested. Many of the technological and "
    "architectural innovations were British. By the mid-eighteenth century Britain was the world's "
    "leading commercial nation, controlling a global trading empire with colonies in North America "
    "and the Caribbean. The revolution brought a rise in population and in the standard of living, "
    "although the working conditions in the early factories and mines were often harsh, and child "
    "labour was common. Historians still debate the causes: the supply of coal, the high wages that "
    "made machines worth building, the patent system, and the scientific culture of the time. In "
    "the nineteenth century railways carried goods and people across the country at speeds never "
    "seen before, and the telegraph carried news faster still."
)


def build(resolved, quantization: str | None, dtype: torch.dtype, dtype_arg: str = "auto"):
    config = EngineConfig(model=str(resolved.path), quantization=quantization, dtype=dtype_arg)
    backend = get_attention_backend("torch", CPU)
    return build_model(config, resolved, max_model_len=1024, attn_backend=backend, dtype=dtype, device=CPU)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_packed_equals_dense(tmp_path, qtype, tied):
    """float32 activations: the packed kernels reproduce the dequantized weights exactly
    (test_int4_kernel.py), so logits differ by float32 summation order only."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, qtype, tied=tied)
    resolved = resolve_model(str(path), download_dir=str(tmp_path / "cache"))
    assert resolved.gguf_path == path.resolve()
    ids = list(range(3, 200, 5))
    dense = prefill(build(resolved, "none", torch.float32), ids)
    model = build(resolved, "gguf", torch.float32)
    assert model.lm_head.packed is not None and model.model.layers[0].mlp.down_proj.weight is None
    torch.testing.assert_close(prefill(model, ids), dense, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m-instruct")


def test_smollm2_q4_1_agrees_with_dense_float32(smollm2):
    """Measured on 6 passages of 256 tokens (docs, README, design notes): packed bfloat16
    agreed with dense float32 on 0.930-0.961 of positions, dense bfloat16 (same weights,
    no packing) on 0.957-0.977; on this passage (191 tokens) 0.979 and 0.974. The gap is
    bfloat16 scales: the kernel wants them in the activation dtype, and Q4_1's fp16
    scales lose 3 bits there. 0.90 leaves room for another CPU's summation order."""
    ids = load_tokenizer(smollm2.path)(PASSAGE)["input_ids"]
    assert len(ids) > 180
    reference = prefill(build(smollm2, "none", torch.float32), ids)
    packed = build(smollm2, "gguf", torch.bfloat16)
    assert packed.lm_head.packed is not None and packed.model.embed_tokens.weight is None
    got = agreement(prefill(packed, ids), reference)
    assert got >= 0.90, got


def test_int8_on_a_tiny_model(tmp_path):
    """Tiny random models have nearly flat logits (many near-ties), the hardest case for
    agreement: measured 0.94-0.96 over llama/qwen2/qwen3 at 120 positions with int8, in
    float32 and bfloat16. 0.88 allows a few more flipped near-ties."""
    path = make_tiny_model("llama", tmp_path)
    resolved = resolve_model(str(path))
    ids = list(range(10, 250, 2))
    reference = prefill(build(resolved, "none", torch.float32), ids)
    model = build(resolved, "int8", torch.float32)
    assert model.lm_head.packed is not None and model.model.layers[0].self_attn.qkv_proj.weight is None
    assert agreement(prefill(model, ids), reference) >= 0.88


def test_fp8_and_gguf_without_a_gguf_are_config_errors(tmp_path):
    resolved = resolve_model(str(make_tiny_model("llama", tmp_path)))
    with pytest.raises(ConfigError, match="fp8"):
        build(resolved, "fp8", torch.float32)
    with pytest.raises(ConfigError, match="needs a GGUF"):
        build(resolved, "gguf", torch.float32)


@pytest.mark.slow
def test_tensor_parallel_packed_gguf_matches_tp1(tmp_path):
    """Packed weights sliced per rank (column splits by rows, row splits on 32-input block
    boundaries, the vocabulary by rows) give TP=1's greedy tokens, which are the dense
    model's: float32 activations reproduce the dequantized weights exactly."""
    from services.engine import LLM, SamplingParams

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, T.Q4_1, tied=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 30, 77], [100, 3, 12]]
    out = {}
    for name, quant, tp in (("dense", "none", 1), ("tp1", "gguf", 1), ("tp2", "gguf", 2)):
        llm = LLM(str(path), dtype="float32", quantization=quant, tensor_parallel_size=tp,
                  skip_tokenizer_init=True, download_dir=str(tmp_path / "cache"))  # fmt: skip
        try:
            out[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    assert out["tp2"] == out["tp1"] == out["dense"]


@pytest.mark.slow
def test_smollm2_chat_continuations_agree(smollm2):
    """Greedy chat answers of the dense float32 model, scored teacher-forced by the packed
    bfloat16 model: the fraction of answer tokens it would have picked itself. Measured
    8/8, 38/39, 39/40 and 38/40 (0.97 overall); required: 0.85 overall."""
    from services.engine import LLM, SamplingParams

    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain photosynthesis in two sentences.",
        "Give me one tip for learning Python.",
    ]
    llm = LLM(str(smollm2.path), dtype="float32", max_model_len=1024)
    try:
        prompts = [llm.render_chat([{"role": "user", "content": q}]) for q in questions]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40))
        answers = [o.outputs[0].token_ids for o in outs]
    finally:
        llm.shutdown()
    packed = build(smollm2, "gguf", torch.bfloat16)
    hits = total = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        picks = prefill(packed, prompt + answer[:-1]).argmax(-1)[len(prompt) - 1 :]
        hits += int((picks == torch.tensor(answer)).sum())
        total += len(answer)
    assert hits / total >= 0.85, (hits, total)
