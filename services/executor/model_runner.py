"""The model runner: one executor rank's model, KV cache and sampler, driven by step plans.

    execute(plan):  drop finished ─▶ add new ─▶ update cached ─▶ build batch
                    ─▶ forward (a CUDA graph replay for decode steps on GPU)
                    ─▶ logits of sampling rows only ─▶ sample ─▶ finish decisions ─▶ StepResult

The runner keeps its own copy of each request's tokens (prompt + sampled so far), so
plans only carry diffs (see shared/protocol.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.executor.attention import AttentionMetadata, get_attention_backend
from services.executor.cuda_graphs import DecodeGraphs, graph_sizes
from services.executor.input_batch import InputBatch
from services.executor.kv_cache import KVCacheSpec, allocate_kv_cache, determine_num_blocks
from services.executor.loader import ResolvedModel, iter_weights, resolve_model
from services.executor.models.model_config import ModelArgs, resolve_dtype
from services.executor.models.registry import get_model_class
from services.executor.sampler import Sampler, make_generator
from shared.config import ConfigError, EngineConfig
from shared.protocol import StepPlan, StepResult
from shared.stop import check_stop

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        resolved: ResolvedModel | None = None,
        *,
        tp_rank: int = 0,
        tp_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        self.config = config
        resolved = resolved or resolve_model(config.model, config.load_format, config.download_dir)
        self.device = pick_device(config.device)
        self.model_path: Path = resolved.path
        self.hf_config = resolved.hf_config
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        args = ModelArgs.from_hf(self.hf_config, resolved.architecture)
        self.max_model_len = resolve_max_model_len(config.max_model_len, args)
        self.block_size = config.block_size
        self.vocab_size = args.vocab_size
        self.eos_token_ids = read_eos_token_ids(self.hf_config, self.model_path)
        self.max_num_batched_tokens = config.resolved_max_num_batched_tokens(self.device.type == "cuda")

        self.attn_backend = get_attention_backend(config.attention_backend, self.device)
        self.model = get_model_class(resolved.architecture)(
            self.hf_config,
            max_model_len=self.max_model_len,
            attn_backend=self.attn_backend,
            dtype=self.dtype,
            device=self.device,
            tp_rank=tp_rank,
            tp_size=config.tensor_parallel_size,
            tp_group=tp_group,
        ).eval()
        if resolved.load_format == "dummy":
            self.model.init_dummy_weights(config.seed)
        else:
            self.model.load_weights(iter_weights(resolved.path))

        spec = KVCacheSpec(
            num_layers=args.num_layers,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=args.head_dim,
            dtype=self.dtype,
            block_size=self.block_size,
        )
        self.num_blocks = determine_num_blocks(config, spec, self.device, lambda: self._profile_run(spec))
        self.kv_caches = allocate_kv_cache(spec, self.num_blocks, self.device)
        # After the KV cache: graph memory is small, and the profile run must not see it.
        self.decode_graphs: DecodeGraphs | None = None
        sizes, why_not = graph_sizes(config, self.device, self.attn_backend)
        if sizes:
            self.decode_graphs = self.build_decode_graphs(sizes)
            self.decode_graphs.capture()
        elif self.device.type == "cuda":
            log.info("decode steps run eagerly: %s", why_not)

        self.generator = make_generator(config.seed, self.device)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, generator=self.generator)
        self.input_batch = InputBatch(self.block_size, self.device)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        batch = self.input_batch
        for req_id in plan.finished_req_ids:
            batch.remove(req_id)
        for new in plan.new_requests:
            # Unseeded requests get None: the sampler then draws for them, in one batch,
            # from self.generator (seeded from config.seed).
            seed = new.sampling_params.seed
            batch.add(new, None if seed is None else make_generator(seed, self.device))
        for cached in plan.cached_requests:
            batch.update(cached)
        if not any(n > 0 for n in plan.num_scheduled_tokens.values()):
            return StepResult(step_id=plan.step_id)

        inputs = batch.prepare(plan.num_scheduled_tokens)
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(inputs.meta):
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        requests = inputs.sampling_requests
        if not requests:  # only mid-prompt chunks this step
            return StepResult(step_id=plan.step_id)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        out = self.sampler(logits, [r.sampling for r in requests])
        finish_reasons = []
        for request, token_id in zip(requests, out.token_ids, strict=True):
            request.append_token(token_id)
            # The one place a token-level finish is decided (the scheduler applies it).
            reason = check_stop(request.sampling.output_token_ids, request.num_prompt_tokens,
                                request.sampling.params, self.eos_token_ids, self.max_model_len)
            finish_reasons.append(0 if reason is None else int(reason))
        logprobs = []
        if any(lp is not None for lp in out.logprobs):
            logprobs = [[lp] if lp is not None else [] for lp in out.logprobs]
        return StepResult(
            step_id=plan.step_id,
            req_ids=[r.req_id for r in requests],
            sampled_token_ids=[[t] for t in out.token_ids],
            logprobs=logprobs,
            finish_reasons=finish_reasons,
        )

    def build_decode_graphs(self, sizes: list[int], capture: bool = True) -> DecodeGraphs:
        """Graphs (not captured yet) over this runner's model and KV cache; capture=False
        gives the same padded decode path without graphs (CPU tests)."""
        return DecodeGraphs(
            self.model,
            self.kv_caches,
            sizes,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            device=self.device,
            capture=capture,
        )

    # ------------------------------------------------------------------ profiling
    @torch.inference_mode()
    def _profile_run(self, spec: KVCacheSpec) -> int:
        """A worst-case step (max_num_batched_tokens tokens, logits for max_num_seqs rows)
        on a temporary KV cache just big enough; returns that cache's size in bytes."""
        total = self.max_num_batched_tokens
        seq_len = min(total, self.max_model_len)
        q_lens = [seq_len] * (total // seq_len) + ([total % seq_len] if total % seq_len else [])
        blocks_per_seq = -(-seq_len // self.block_size)
        num_blocks = blocks_per_seq * len(q_lens)
        caches = allocate_kv_cache(spec, num_blocks, self.device)
        dev = self.device
        starts = np.concatenate([[0], np.cumsum(q_lens)])
        positions = np.concatenate([np.arange(n) for n in q_lens])
        seq_idx = np.repeat(np.arange(len(q_lens)), q_lens)
        table = np.arange(num_blocks, dtype=np.int32).reshape(len(q_lens), blocks_per_seq)
        slots = table[seq_idx, positions // self.block_size].astype(np.int64) * self.block_size
        meta = AttentionMetadata(
            num_tokens=total,
            num_seqs=len(q_lens),
            slot_mapping=torch.from_numpy(slots + positions % self.block_size).to(dev),
            block_tables=torch.from_numpy(table).to(dev),
            query_start_loc=torch.from_numpy(starts.astype(np.int32)).to(dev),
            seq_lens=torch.tensor(q_lens, dtype=torch.int32, device=dev),
            max_query_len=max(q_lens),
            max_seq_len=max(q_lens),
            query_lens_cpu=q_lens,
            seq_lens_cpu=q_lens,
            block_size=self.block_size,
        )
        ids = torch.zeros(total, dtype=torch.int64, device=dev)
        hidden = self.model(ids, torch.from_numpy(positions).to(dev), caches, meta)
        rows = min(self.config.max_num_seqs, total)
        self.model.compute_logits(hidden[:rows])
        return spec.bytes_per_block * num_blocks


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def resolve_max_model_len(requested: int | None, args: ModelArgs) -> int:
    """The model's own limit (max_position_embeddings; the sliding window where there is
    one, since attention here is always full) or the requested length, if not above it."""
    limit = args.max_position_embeddings
    why = f"max_position_embeddings={limit}"
    if args.sliding_window is not None and args.sliding_window < limit:
        limit, why = args.sliding_window, f"sliding_window={args.sliding_window} (not implemented)"
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"max_model_len: {requested} is more than the model supports ({why})")
    return requested


def read_eos_token_ids(hf_config: Any, model_path: Path) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json (chat models often add ids there)."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    gen_path = Path(model_path) / "generation_config.json"
    if gen_path.is_file():
        add(json.loads(gen_path.read_text()).get("eos_token_id"))
    return frozenset(ids)
