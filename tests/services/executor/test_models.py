"""The Llama-family model code against transformers' modeling, logits of a whole prompt.

The runner tests compare generated tokens; these compare numbers, and cover the config
variants one by one (GQA ratios, rope scaling types, tied embeddings, dtypes).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from services.executor.attention import AttentionMetadata, get_attention_backend
from services.executor.loader import iter_weights, resolve_model
from services.executor.models.model_config import ModelArgs, resolve_dtype, rope_parameters
from services.executor.models.registry import SUPPORTED_ARCHITECTURES, get_model_class
from tests.services.executor.hf_tokens import hf_model
from tests.tiny_models import ARCHS, make_tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(path, dtype=torch.float32, load=True, block_size: int = 4):
    resolved = resolve_model(str(path))
    model = get_model_class(resolved.architecture)(
        resolved.hf_config, attn_backend=get_attention_backend("torch", torch.device("cpu")), dtype=dtype
    )
    if load:
        model.load_weights(iter_weights(resolved.path))
    return model


def prefill(model, ids: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits of every position of one prompt run as one prefill."""
    a = model.args
    n = len(ids)
    num_blocks = -(-n // block_size)
    # Blocks in reverse order: the paged layout must not matter.
    table = torch.arange(num_blocks, dtype=torch.int32).flip(0)
    caches = [
        (
            torch.zeros(num_blocks, block_size, a.num_kv_heads, a.head_dim, dtype=model.dtype),
            torch.zeros(num_blocks, block_size, a.num_kv_heads, a.head_dim, dtype=model.dtype),
        )
        for _ in range(a.num_layers)
    ]
    pos = torch.arange(n)
    meta = AttentionMetadata(
        num_tokens=n,
        num_seqs=1,
        slot_mapping=table[pos // block_size].long() * block_size + pos % block_size,
        block_tables=table[None],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        max_query_len=n,
        max_seq_len=n,
        query_lens_cpu=[n],
        seq_lens_cpu=[n],
        block_size=block_size,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), pos, caches, meta))


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(str(path))(torch.tensor([ids])).logits[0].float()


IDS = list(range(10, 250, 7))  # 35 tokens


VARIANTS = [
    *[(arch, {}) for arch in ARCHS],
    *[(arch, {"tie_word_embeddings": True}) for arch in ARCHS],
    ("llama", {"num_key_value_heads": 4}),  # plain multi-head
    ("qwen3", {"num_key_value_heads": 1}),  # GQA 4
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen3", {"attention_bias": True}),
]


@pytest.mark.parametrize("arch,overrides", VARIANTS, ids=lambda x: str(x) if isinstance(x, str) else None)
def test_logits_match_transformers(tmp_path, arch, overrides):
    path = make_tiny_model(arch, tmp_path, **overrides)
    logits = prefill(build(path), IDS)
    assert logits.dtype == torch.float32 and logits.shape == (len(IDS), 256)
    torch.testing.assert_close(logits, hf_logits(path, IDS), atol=2e-5, rtol=1e-5)


def hf_logits_bf16(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_matches_transformers_in_bfloat16(tmp_path, arch):
    """bf16 against transformers in bf16 (on CPU they agree bit for bit today): a tolerance
    ten times below the bf16-vs-fp32 gap (~0.1 here), so bf16-only bugs cannot hide in it."""
    path = make_tiny_model(arch, tmp_path)
    got = prefill(build(path, torch.bfloat16), IDS)
    assert got.dtype == torch.float32  # logits are always float32 for the sampler
    ref = hf_logits_bf16(path, IDS)
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_load_weights_rejects_bad_checkpoints(tmp_path):
    path = make_tiny_model("qwen2", tmp_path)
    weights = dict(iter_weights(path))
    model = build(path, load=False)
    partial = {k: v for k, v in weights.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match="missing"):
        model.load_weights(partial.items())
    with pytest.raises(KeyError, match="unexpected"):
        model.load_weights([*weights.items(), ("model.unexpected.weight", torch.zeros(1))])
    bad = dict(weights)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 64)
    with pytest.raises(ValueError, match="shape"):
        model.load_weights(bad.items())


def test_dummy_weights_give_finite_outputs(tmp_path):
    path = make_tiny_model("llama3", tmp_path, num_hidden_layers=3)
    model = build(path, load=False)
    model.init_dummy_weights(seed=3)
    logits = prefill(model, IDS)
    assert torch.isfinite(logits).all()
    again = build(path, load=False)
    again.init_dummy_weights(seed=3)
    torch.testing.assert_close(prefill(again, IDS), logits)


def test_registry():
    for name in SUPPORTED_ARCHITECTURES:
        assert get_model_class(name).architecture == name
    with pytest.raises(ValueError, match="unsupported"):
        get_model_class("GPT2LMHeadModel")


def _v4_config(**kw):
    base = dict(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=5e5,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_transformers4_style_configs():
    theta, scaling = rope_parameters(_v4_config(rope_scaling=None))
    assert theta == 5e5 and scaling is None
    theta, scaling = rope_parameters(
        _v4_config(
            rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4}
        )
    )
    assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == 128
    assert rope_parameters(_v4_config(rope_scaling={"rope_type": "default"}))[1] is None
    args = ModelArgs.from_hf(_v4_config(), "Qwen2ForCausalLM")
    assert args.qkv_bias and not args.o_bias and args.head_dim == 4 and args.sliding_window is None
    args = ModelArgs.from_hf(_v4_config(sliding_window=4096), "MistralForCausalLM")
    assert args.sliding_window == 4096 and not args.qkv_bias


def test_resolve_dtype(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    avx2, avx512_bf16, amx = {"avx2"}, {"avx2", "avx512f", "avx512_bf16"}, {"amx_bf16", "amx_tile"}
    # CPU auto: bfloat16 exactly where the CPU multiplies it natively, whatever the config says.
    configs = [SimpleNamespace(torch_dtype="bfloat16"), SimpleNamespace(dtype=torch.float16)]
    configs.append(SimpleNamespace())
    for config in configs:
        assert resolve_dtype("auto", config, cpu, avx2) == torch.float32
        assert resolve_dtype("auto", config, cpu, avx512_bf16) == torch.bfloat16
        assert resolve_dtype("auto", config, cpu, amx) == torch.bfloat16
    with caplog.at_level("INFO"):
        resolve_dtype("auto", SimpleNamespace(), cpu, avx512_bf16)
    assert "bfloat16 (the CPU multiplies bfloat16 natively: avx512_bf16)" in caplog.text
    assert resolve_dtype("auto", SimpleNamespace(dtype=torch.float16), cuda) == torch.float16
    assert resolve_dtype("float16", SimpleNamespace(dtype="bfloat16"), cpu) == torch.float16
    assert resolve_dtype("float32", SimpleNamespace(dtype="bfloat16"), cpu, avx512_bf16) == torch.float32


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_weight_slicing(tmp_path, tp_size):
    # 4 heads, 2 KV heads: with 2 ranks each holds one KV head, with 4 each KV head is
    # replicated on two ranks.
    path = make_tiny_model("qwen2", tmp_path)
    resolved = resolve_model(str(path))
    full = dict(iter_weights(path))
    cls = get_model_class(resolved.architecture)
    d = 16
    q_rows: list[torch.Tensor] = []
    down_cols: list[torch.Tensor] = []
    for rank in range(tp_size):
        model = cls(
            resolved.hf_config,
            attn_backend=get_attention_backend("torch", torch.device("cpu")),
            tp_rank=rank,
            tp_size=tp_size,
        )
        model.load_weights(full.items())
        attn = model.model.layers[0].self_attn
        qkv = attn.qkv_proj
        q_rows.append(qkv.weight[: qkv.q_size])
        kv_head = rank * 2 // tp_size
        expect_k = full["model.layers.0.self_attn.k_proj.weight"][kv_head * d : (kv_head + 1) * d]
        torch.testing.assert_close(qkv.weight[qkv.q_size : qkv.q_size + d], expect_k)
        expect_vb = full["model.layers.0.self_attn.v_proj.bias"][kv_head * d : (kv_head + 1) * d]
        torch.testing.assert_close(qkv.bias[qkv.q_size + d :], expect_vb)
        assert model.num_local_kv_heads == 1
        down_cols.append(model.model.layers[0].mlp.down_proj.weight)
        gate_up = model.model.layers[0].mlp.gate_up_proj.weight
        n = 128 // tp_size
        up = full["model.layers.0.mlp.up_proj.weight"][rank * n : (rank + 1) * n]
        torch.testing.assert_close(gate_up[n:], up)
        emb = model.model.embed_tokens.weight
        torch.testing.assert_close(
            emb, full["model.embed_tokens.weight"][rank * emb.shape[0] : (rank + 1) * emb.shape[0]]
        )
    torch.testing.assert_close(torch.cat(q_rows), full["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(torch.cat(down_cols, dim=1), full["model.layers.0.mlp.down_proj.weight"])
