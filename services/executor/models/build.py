"""Build a model for a resolved checkpoint: construct it for this rank, then fill its weights.

One place for it, used by the target model runner and by a speculative draft model.
Weights load dense or packed (quant/choose.py decides); layers that hold packed or
load-time-quantized weights swap them in once everything is loaded (finalize_weights).
"""

from __future__ import annotations

import logging

import torch

from services.executor.attention.backend import AttentionBackend
from services.executor.loader import ResolvedModel, iter_weights
from services.executor.loader.gguf_weights import iter_gguf_weights
from services.executor.models.registry import get_model_class
from services.executor.quant.choose import choose_quantization
from services.executor.shm_allreduce import ShmAllReduce
from shared.config import EngineConfig

log = logging.getLogger(__name__)


def build_model(
    config: EngineConfig,
    resolved: ResolvedModel,
    *,
    max_model_len: int,
    attn_backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: object | None = None,
    tp_shm: ShmAllReduce | None = None,
    draft: bool = False,
) -> torch.nn.Module:
    """`draft`: a speculative draft model, which shares the target's config: an explicit
    --quantization gguf then packs the draft only if it is a GGUF too (dense otherwise)."""
    requested = config.quantization
    if draft and requested == "gguf" and resolved.gguf_path is None:
        requested = None
    spec, why = choose_quantization(requested, config.dtype, resolved.gguf_path, dtype, device)
    model = get_model_class(resolved.architecture)(
        resolved.hf_config,
        max_model_len=max_model_len,
        attn_backend=attn_backend,
        dtype=dtype,
        device=device,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tp_group=tp_group,
        tp_shm=tp_shm,
    ).eval()
    if resolved.load_format == "dummy":
        model.init_dummy_weights(config.seed)
    elif spec.method == "gguf":
        assert resolved.gguf_path is not None
        args = model.args
        model.load_weights(iter_gguf_weights(resolved.gguf_path, args.num_heads, args.num_kv_heads))
    else:
        model.load_weights(iter_weights(resolved.path))
    if spec.method != "none":
        with torch.no_grad():
            for module in model.modules():
                finalize = getattr(module, "finalize_weights", None)
                if finalize is not None:
                    finalize(spec)
            for module in model.modules():
                # An embedding that kept dense rows looks up those; its codes were only
                # needed to build a tied LM head.
                dense_rows = getattr(module, "weight", None) is not None
                if dense_rows and getattr(module, "qweight", None) is not None:
                    module.qweight = None
    if tp_rank == 0:
        log.info(
            "%sweights: %s, %.0f MB on this rank (%s)",
            "draft model " if draft else "", spec.method, weight_bytes(model) / 1e6, why,
        )  # fmt: skip
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights held: parameters, packed kernels, dense copies and codes (each once)."""
    seen: set[tuple[int, int]] = set()  # by storage: a tied head's dense copy is the embedding's
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if (t.data_ptr(), t.numel()) not in seen:
            seen.add((t.data_ptr(), t.numel()))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is not None:
            total += sum(k.nbytes() for k in packed.kernels)
            if packed.dense is not None:
                add(packed.dense)
        codes = getattr(module, "qweight", None)
        if codes is not None:
            for t in (codes.codes, codes.scale, codes.min):
                add(t)
    return total
