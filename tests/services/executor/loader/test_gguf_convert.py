"""GGUF -> Hugging Face conversion, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.executor.loader import (
    ModelSourceError,
    bundled_gguf_path,
    convert_gguf,
    iter_weights,
    load_tokenizer,
)
from services.executor.loader.gguf_convert import MARKER_FILE

from .tiny_gguf import CHAT_TEMPLATE, write_tiny_llama_gguf

Q = gguf.GGMLQuantizationType
LOGITS_TOL = 1e-4


def _logits(model_dir: Path, ids: torch.Tensor, gguf_file: str | None = None) -> torch.Tensor:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


def test_smollm2_logits_match_transformers_gguf_loader(smollm2_dir: Path) -> None:
    gguf_path = bundled_gguf_path()
    tok = load_tokenizer(smollm2_dir)
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    ours = _logits(smollm2_dir, ids)
    ref = _logits(gguf_path.parent, ids, gguf_file=gguf_path.name)
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    assert (ours - ref).abs().max().item() < LOGITS_TOL
    # A wrong q/k un-permutation still gives finite logits; the top token would drift.
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_config_and_files(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert (config.get("dtype") or config.get("torch_dtype")) == "float32"  # Q4_1/Q8_0 dequantized
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        30,
        9,
        3,
    )
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (smollm2_dir / MARKER_FILE).is_file()
    names = dict(iter_weights(smollm2_dir))
    assert "lm_head.weight" not in names and len(names) == 1 + 1 + 30 * 9
    assert all(t.dtype == torch.float32 for t in names.values())


def test_smollm2_tokenizer_matches_gguf_tokenizer(smollm2_dir: Path) -> None:
    gguf_path = bundled_gguf_path()
    ours = load_tokenizer(smollm2_dir)
    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    texts = [
        "Hello world",
        "  spaces\tand\nnewlines",
        "naïve café 日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids
    assert ours.chat_template
    chat = [{"role": "user", "content": "What is 2+2?"}]
    prompt = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert ours.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize(
    ("qtype", "tied", "dtype"),
    [
        (Q.F32, True, torch.float32),
        (Q.F16, False, torch.float16),
        (Q.BF16, True, torch.bfloat16),
        (Q.Q8_0, False, torch.float32),
    ],
)
def test_tiny_gguf_matches_transformers(tmp_path: Path, qtype: Q, tied: bool, dtype: torch.dtype) -> None:
    src = tmp_path / "tiny.gguf"
    hf = write_tiny_llama_gguf(src, qtype=qtype, tied=tied)
    out = convert_gguf(src, tmp_path / "out", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config.get("dtype") or config.get("torch_dtype")) == str(dtype).removeprefix("torch.")
    weights = dict(iter_weights(out))
    assert set(weights) == set(hf)
    if qtype != Q.Q8_0:  # lossless types: the exact Hugging Face tensors come back
        for name, expected in hf.items():
            want = torch.from_numpy(expected)
            if expected.ndim == 2:  # norms stay float32 as llama.cpp stores them
                want = want.to(dtype)
            assert weights[name].dtype == want.dtype, name
            assert torch.equal(weights[name], want), name

    ids = torch.tensor([[1, 262, 266, 40, 70, 2, 100]])
    ours = _logits(out, ids)
    ref = _logits(tmp_path, ids, gguf_file=src.name)
    assert (ours - ref).abs().max().item() < LOGITS_TOL

    tok = load_tokenizer(out)
    assert tok("hello world").input_ids == [262, 3 + ord(" "), 266]  # 3 specials, then bytes
    assert tok.chat_template == CHAT_TEMPLATE


def test_qk_rows_are_unpermuted(tmp_path: Path) -> None:
    # Direct check of the inverse permutation: a GGUF whose q/k rows were not permuted
    # would come back scrambled, so the converted q_proj must equal the original exactly.
    src = tmp_path / "tiny.gguf"
    hf = write_tiny_llama_gguf(src, seed=3)
    out = convert_gguf(src, tmp_path / "out", progress=False)
    weights = dict(iter_weights(out))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(weights[name].numpy(), hf[name])


def test_non_llama_gguf_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "gpt2.gguf"
    write_tiny_llama_gguf(src, arch="gpt2")
    with pytest.raises(ModelSourceError, match=r"architecture 'gpt2' is not supported"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_conversion_leaves_no_folder(tmp_path: Path) -> None:
    src = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 8, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match=r"unexpected tensor 'blk.0.ffn_gate_exps.weight'"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.gguf"]


def test_convert_refuses_non_empty_output(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="not empty"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
