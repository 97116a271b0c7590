"""Tensor-parallel linear layers with per-parameter weight loaders.

Each parameter carries `weight_loader(param, full_tensor, shard_id=None)` that slices a
full (unsharded) checkpoint tensor for this rank, so the model's `load_weights` never
needs to know how a layer is split:

    ColumnParallelLinear   W[out/tp, in]         output sharded, no communication
    RowParallelLinear      W[out, in/tp]         input sharded, all-reduce of the output
    QKVParallelLinear      [q | k | v] rows      fused projections; KV heads may be replicated
    MergedColumnParallel   [gate | up] rows      fused gate/up of the MLP

Quantized weights: a loader may also be handed a packed GroupAffine (a GGUF's own
blocks). It is sliced the same way (a column slice only on group boundaries, else a
ValueError naming the tensor-parallel split) and staged; `finalize_weights` then swaps
the dense parameter for a PackedLinear. Load-time int8/int4 quantize the loaded dense
shard there instead, so every rank quantizes only its own slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.models.parallel import TPInfo, all_reduce, divide, kv_head_range
from services.executor.quant.group_affine import GroupAffine
from services.executor.quant.load_time import quantize_int4
from services.executor.quant.packed_linear import PackedLinear
from services.executor.quant.spec import QuantSpec


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"{what}: checkpoint shard has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)


def _narrow(loaded: torch.Tensor, dim: int, full: int, start: int, length: int, what: str) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor, after checking the full size."""
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(
            f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, expected {full} along dim {dim}"
        )
    return loaded.narrow(dim, start, length)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Replicated parameters (norms, biases of row-parallel layers): copy as is."""
    _copy_checked(param.data, loaded, "replicated parameter")


class _PackableLinear(nn.Module):
    """Staging of packed checkpoint tensors and the switch to a PackedLinear."""

    weight: nn.Parameter | None
    packed: PackedLinear | None = None

    def _stage(self, param: torch.Tensor, row_offset: int, src: object, what: str) -> bool:
        """Keep a packed tensor for finalize_weights; False for a dense one (copy it)."""
        if not isinstance(src, GroupAffine):
            return False
        if self.weight is None or param is not self.weight:
            raise ValueError(f"{what}: only weights can be packed, not biases")
        if src.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"{what}: packed shard has shape {tuple(src.shape)}, expected (*, {self.weight.shape[1]})"
            )
        self.__dict__.setdefault("_staged", []).append((row_offset, src))
        return True

    def finalize_weights(self, spec: QuantSpec) -> None:
        staged = sorted(self.__dict__.pop("_staged", []), key=lambda s: s[0])
        if self.weight is None:
            return
        if staged:
            rows, expected = 0, self.weight.shape[0]
            for offset, block in staged:
                if offset != rows:
                    raise ValueError(f"packed weight rows {rows}..{offset} were not loaded")
                rows += block.shape[0]
            if rows != expected:
                raise ValueError(f"packed weight has {rows} rows, expected {expected}")
            self.packed = PackedLinear.from_blocks(
                [b for _, b in staged], spec.dtype, keep_dense=spec.keep_dense, dense_above=spec.dense_above
            )
        elif spec.method == "int8":
            self.packed = PackedLinear.int8(self.weight.data, spec.dtype)
        elif spec.method == "int4":
            self.packed = PackedLinear.from_blocks(
                [quantize_int4(self.weight.data)],
                spec.dtype,
                keep_dense=spec.keep_dense,
                dense_above=spec.dense_above,
            )
        else:
            return
        self.weight = None  # frees the dense parameter (never written for packed loads)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        out = self.packed(x)
        return out if bias is None else out + bias


class ColumnParallelLinear(_PackableLinear):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, tp.size, "output size")
        self.weight = _param((self.output_size_per_partition, input_size), dtype, device)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param((self.output_size_per_partition,), dtype, device) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = self.output_size_per_partition
        src = _narrow(loaded, 0, self.output_size, self.tp.rank * n, n, "column-parallel weight")
        if not self._stage(param, 0, src, "column-parallel weight"):
            _copy_checked(param.data, src, "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul; each rank holds its slice of each part."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, tp=tp, dtype=dtype, device=device)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"merged linear needs an integer shard id, got {shard_id!r}")
        n = divide(self.output_sizes[shard_id], self.tp.size, "output size")
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        what = f"merged shard {shard_id}"
        src = _narrow(loaded, 0, self.output_sizes[shard_id], self.tp.rank * n, n, what)
        if not self._stage(param, offset, src, what):
            _copy_checked(param.data.narrow(0, offset, n), src, what)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Rows are [q heads of this rank | k heads | v heads]."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        *,
        bias: bool,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.head_dim = head_dim
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp.size, "num_attention_heads")
        self.kv_head_start, self.num_kv_heads = kv_head_range(total_num_kv_heads, tp)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # Sized per rank already, so build as if unsharded and override the partition size.
        super().__init__(
            hidden_size, self.q_size + 2 * self.kv_size, bias=bias, tp=TPInfo(), dtype=dtype, device=device
        )
        self.tp = tp

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        d = self.head_dim
        if shard_id == "q":
            offset, size = 0, self.q_size
            full = self.q_size * self.tp.size
            src = _narrow(loaded, 0, full, self.tp.rank * self.q_size, self.q_size, "q_proj")
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size = self.kv_size
            full = self.total_num_kv_heads * d
            src = _narrow(loaded, 0, full, self.kv_head_start * d, self.kv_size, f"{shard_id}_proj")
        else:
            raise ValueError(f"qkv shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        if not self._stage(param, offset, src, f"qkv shard {shard_id}"):
            _copy_checked(param.data.narrow(0, offset, size), src, f"qkv shard {shard_id}")


class RowParallelLinear(_PackableLinear):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_partition = divide(input_size, tp.size, "input size")
        self.weight = _param((output_size, self.input_size_per_partition), dtype, device)
        self.weight.weight_loader = self.weight_loader
        # The bias is added once, after the reduction, so every rank holds it whole.
        self.bias = _param((output_size,), dtype, device) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = self.input_size_per_partition
        src = _narrow(loaded, 1, n * self.tp.size, self.tp.rank * n, n, "row-parallel weight")
        if not self._stage(param, 0, src, "row-parallel weight"):
            _copy_checked(param.data, src, "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._matmul(x, self.bias)
        out = all_reduce(self._matmul(x, None), self.tp)
        return out if self.bias is None else out + self.bias
