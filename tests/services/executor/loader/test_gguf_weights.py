"""A GGUF's tensors read packed: the same weights, under the same names, as its conversion."""

from __future__ import annotations

import gguf
import pytest
import torch

from services.executor.loader import iter_weights, resolve_model
from services.executor.loader.gguf_weights import iter_gguf_weights, packed_weight_types
from services.executor.quant.group_affine import GroupAffine
from tests.services.executor.loader.tiny_gguf import HEADS, KV_HEADS, write_tiny_llama_gguf


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0])
def test_packed_tensors_dequantize_to_the_converted_folder(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, qtype, tied=False)
    resolved = resolve_model(str(path), download_dir=str(tmp_path / "cache"))
    dense = dict(iter_weights(resolved.path))
    packed = dict(iter_gguf_weights(path, HEADS, KV_HEADS))
    assert packed.keys() == dense.keys()
    for name, w in packed.items():
        if name.endswith("norm.weight"):
            assert isinstance(w, torch.Tensor)  # F32 in the file: stays dense
            assert torch.equal(w, dense[name])
        else:  # q/k rows un-permuted like the conversion's
            assert isinstance(w, GroupAffine) and w.qtype == qtype.name
            assert torch.equal(w.dequantize(), dense[name]), name
    assert set(packed_weight_types(path)) == {"F32", qtype.name}


def test_the_tensor_table_matches_gguf_reader(tmp_path):
    from gguf import GGUFReader

    from services.executor.loader.gguf_index import gguf_tensors

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, gguf.GGMLQuantizationType.Q4_1)
    ours, theirs = gguf_tensors(path), GGUFReader(path).tensors
    assert [t.name for t in ours] == [t.name for t in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert (a.tensor_type, a.shape.tolist(), a.n_bytes) == (
            b.tensor_type,
            b.shape.tolist(),
            int(b.n_bytes),
        )
        assert bytes(a.data) == bytes(memoryview(b.data).cast("B"))


def test_a_truncated_file_is_a_model_source_error(tmp_path):
    from services.executor.loader import ModelSourceError
    from services.executor.loader.gguf_index import gguf_tensors

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, gguf.GGMLQuantizationType.Q8_0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelSourceError, match="runs past the end"):
        gguf_tensors(path)


def test_a_converted_folder_knows_its_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, gguf.GGMLQuantizationType.Q4_0)
    cache = str(tmp_path / "cache")
    folder = resolve_model(str(path), download_dir=cache).path
    # `folio serve` hands its children the folder, not the file.
    assert resolve_model(str(folder), download_dir=cache).gguf_path == path.resolve()
    path.write_bytes(path.read_bytes()[:-64] + bytes(64))  # the file changed since
    assert resolve_model(str(folder), download_dir=cache).gguf_path is None
