"""Weights, tokenizer and cache-dir helpers of the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.executor.loader import ModelSourceError, default_cache_dir, iter_weights, load_tokenizer


def test_iter_weights_reads_every_shard(tmp_path: Path) -> None:
    a = {"model.embed_tokens.weight": torch.randn(5, 4), "model.norm.weight": torch.ones(4)}
    b = {"lm_head.weight": torch.randn(5, 4).to(torch.bfloat16)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    got = dict(iter_weights(tmp_path))
    assert set(got) == set(a) | set(b)
    for name, t in {**a, **b}.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_iter_weights_names_a_truncated_file(tmp_path: Path) -> None:
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="model.safetensors"):
        list(iter_weights(tmp_path))


def test_iter_weights_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no \\*.safetensors"):
        list(iter_weights(tmp_path))


def test_load_tokenizer(smollm2_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(smollm2_dir)
    assert tok.decode(tok("Hello, world!").input_ids) == "Hello, world!"
    assert tok.eos_token == "<|im_end|>"
    with pytest.raises(ModelSourceError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FOLIO_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FOLIO_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "folio"
