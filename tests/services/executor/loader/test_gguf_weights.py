"""A GGUF's tensors read packed: the same weights, under the same names, as its conversion."""

from __future__ import annotations

import gguf
import pytest
import torch

from services.executor.loader import iter_weights, resolve_model
from services.executor.loader.gguf_weights import iter_gguf_weights, packed_weight_types
from services.executor.quant.group_affine import GroupAffine
from tests.services.executor.loader.tiny_gguf import write_tiny_llama_gguf


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0])
def test_packed_tensors_dequantize_to_the_converted_folder(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, qtype, tied=False)
    resolved = resolve_model(str(path), download_dir=str(tmp_path / "cache"))
    dense = dict(iter_weights(resolved.path))
    packed = dict(iter_gguf_weights(path))
    assert packed.keys() == dense.keys()
    for name, w in packed.items():
        if name.endswith("norm.weight"):
            assert isinstance(w, torch.Tensor)  # F32 in the file: stays dense
            assert torch.equal(w, dense[name])
        else:  # q/k rows un-permuted like the conversion's
            assert isinstance(w, GroupAffine) and w.qtype == qtype.name
            assert torch.equal(w.dequantize(), dense[name]), name
    assert set(packed_weight_types(path)) == {"F32", qtype.name}


def test_a_converted_folder_knows_its_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, gguf.GGMLQuantizationType.Q4_0)
    cache = str(tmp_path / "cache")
    folder = resolve_model(str(path), download_dir=cache).path
    # `folio serve` hands its children the folder, not the file.
    assert resolve_model(str(folder), download_dir=cache).gguf_path == path.resolve()
    path.write_bytes(path.read_bytes()[:-64] + bytes(64))  # the file changed since
    assert resolve_model(str(folder), download_dir=cache).gguf_path is None
