"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) on paged attention.

Differences between the architectures are flags in ModelArgs: q/k/v biases (Qwen2),
per-head q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings, rope scaling.

A step's input is the flattened batch (no padding): token ids and positions of every
scheduled token, one KV cache pair per layer, and the attention metadata.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.attention.backend import AttentionBackend, AttentionMetadata
from services.executor.models.embedding import ParallelLMHead, VocabParallelEmbedding
from services.executor.models.fused_ops import fused_ops_enabled
from services.executor.models.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from services.executor.models.model_config import ModelArgs
from services.executor.models.norm import RMSNorm
from services.executor.models.parallel import TPInfo
from services.executor.models.rotary import RotaryEmbedding
from services.executor.shm_allreduce import ShmAllReduce

KVCache = tuple[torch.Tensor, torch.Tensor]

# (our fused parameter, HF sub-module name, shard id) for fused projections.
_STACKED = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        kw = dict(tp=tp, dtype=dtype, device=device)
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, bias=args.qkv_bias, **kw
        )
        self.o_proj = RowParallelLinear(
            args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias, **kw
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype=dtype, device=device)
        self.qk_norm = args.qk_norm
        # Shared with the other layers; not registered as sub-modules (no parameters).
        self._rotary = rotary
        self._backend = backend

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        if not self.qk_norm and not self._rotary.in_place:
            # q and k rotated as one (tokens, heads + kv_heads, d) view: half the small ops.
            qk = self._rotary.rotate(qkv[:, : q_size + kv_size].view(n, -1, self.head_dim))
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, q_size + kv_size :].view(n, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(n, self.num_heads, self.head_dim)
            k = k.view(n, self.num_kv_heads, self.head_dim)
            v = v.view(n, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self._rotary(positions, q, k)
        out = self._backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(n, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPInfo, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        kw = dict(tp=tp, dtype=dtype, device=device)
        inter = args.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            args.hidden_size, [inter, inter], bias=args.mlp_bias, **kw
        )
        self.down_proj = RowParallelLinear(inter, args.hidden_size, bias=args.mlp_bias, **kw)
        self._silu_and_mul = None
        if fused_ops_enabled(device):
            from services.executor.kernels.activation import silu_and_mul

            self._silu_and_mul = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self._silu_and_mul is not None:
            return self.down_proj(self._silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, rotary, backend, tp, dtype, device)
        self.mlp = LlamaMLP(args, tp, dtype, device)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(
            args.hidden_size, args.rms_norm_eps, dtype=dtype, device=device
        )

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_and_norm(h, residual)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        max_positions: int,
        backend: AttentionBackend,
        tp: TPInfo,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            args.vocab_size, args.hidden_size, tp=tp, dtype=dtype, device=device
        )
        self.rotary = RotaryEmbedding(
            args.head_dim, max_positions, args.rope_theta, args.rope_scaling, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, self.rotary, backend, tp, dtype, device) for _ in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=dtype, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        self.rotary.prepare(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, positions, kv_cache, meta)
        h, _ = self.norm.add_and_norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    """The Llama family; subclasses below only name their architecture (ModelArgs turns
    the name and the config into flags)."""

    architecture = "LlamaForCausalLM"

    def __init__(
        self,
        hf_config: Any,
        *,
        max_model_len: int | None = None,
        attn_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: torch.distributed.ProcessGroup | None = None,
        tp_shm: ShmAllReduce | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.args = ModelArgs.from_hf(hf_config, self.architecture)
        self.tp = TPInfo(tp_rank, tp_size, tp_group, shm=tp_shm)
        self.dtype = dtype
        self.device = device
        self.attn_backend = attn_backend
        self.max_model_len = max_model_len or self.args.max_position_embeddings
        self.num_kv_heads = self.args.num_kv_heads  # total; per rank: kv_head_range
        self.model = LlamaModel(self.args, self.max_model_len, attn_backend, self.tp, dtype, device)
        self.lm_head = ParallelLMHead(
            self.args.vocab_size, self.args.hidden_size, tp=self.tp, dtype=dtype, device=device
        )
        if self.args.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @property
    def num_local_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.num_kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """(num_tokens,) ids and positions -> (num_tokens, hidden) final hidden states."""
        self.attn_backend.prepare(meta)
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Hidden states of the positions that sample -> float32 logits (rows, vocab), on
        rank 0 only: other tensor-parallel ranks take part in the gather and get None."""
        logits = self.lm_head.compute_logits(hidden)
        return None if logits is None else logits.float()

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a full Hugging Face checkpoint (HF names), slicing it for this rank."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # some tied checkpoints still store it; the embedding is the source
            name, shard_id = hf_name, None
            for fused, part, shard in _STACKED:
                if part in hf_name:
                    name, shard_id = hf_name.replace(part, fused), shard
                    break
            param = params.get(name)
            if param is None:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no parameter in {self.args.architecture}")
            loader = getattr(param, "weight_loader", default_weight_loader)
            with torch.no_grad():
                loader(param, tensor, shard_id)
            loaded.add(f"{name}:{shard_id}")
        expected = {f"{n}:{s}" for n in params for s in _shard_ids(n)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:4]}")

    def init_dummy_weights(self, seed: int) -> None:
        """Random weights of the right shapes (load_format dummy): N(0, 0.02) matrices and
        biases, unit norms, so activations stay finite at any depth."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)


class MistralForCausalLM(LlamaForCausalLM):
    architecture = "MistralForCausalLM"


class Qwen2ForCausalLM(LlamaForCausalLM):
    architecture = "Qwen2ForCausalLM"


class Qwen3ForCausalLM(LlamaForCausalLM):
    architecture = "Qwen3ForCausalLM"


def _shard_ids(param_name: str) -> tuple[object, ...]:
    if ".qkv_proj." in param_name:
        return ("q", "k", "v")
    if ".gate_up_proj." in param_name:
        return (0, 1)
    return (None,)
