"""The model runner: one executor rank's model, KV cache and sampler, driven by step plans.

    execute(plan):  drop finished ─▶ add new ─▶ update cached ─▶ build batch
                    ─▶ [TP > 1: agree that every rank got this far]
                    ─▶ forward (a CUDA graph replay for decode steps on GPU)
                    ─▶ logits of sampling rows only ─▶ sample ─▶ finish decisions ─▶ StepResult

The runner keeps its own copy of each request's tokens (prompt + sampled so far), so
plans only carry diffs (see shared/protocol.py).

Tensor parallelism (tp_group given; every rank runs `execute` on every plan, in lock-step):
- The KV cache holds this rank's KV heads; all ranks take the smallest block count (one
  all-reduce at start-up), so the scheduler sees one number.
- Logits of the sampling rows are gathered on rank 0 only, which samples once with the
  same seeded generators as at TP=1, then broadcasts the token ids: every rank appends them
  to its own request state, since the next plan is a diff that does not carry them.
- Step failure agreement: an exception while applying the plan or building the batch (or
  `fail_step`, for a rank that could not even decode its plan) is not raised; every rank
  all-reduces a failed-rank vector before the forward, and if any rank failed they all
  return `StepResult(step_id, error=...)` and skip the forward, so they stay in lock-step
  and usable: the scheduler aborts the step's requests and the next plan frees them. The
  failed rank may have applied part of the plan; what it holds of those requests is freed
  with them. An exception inside the forward or sampling (after the agreement) cannot be
  recovered in lock-step: it is raised, the peers' next collective fails or hits the group
  timeout, and the engine ends (its ranks are restarted together).
- Only rank 0's StepResult counts (its logprobs, its errors); other ranks return the same
  token ids without logprobs.

Fault injection (tests of the service layer): FOLIO_FAULT_STEP="RANK:N", read at
construction, makes rank RANK raise in its N-th step that has work (counting from 1), once,
before the agreement, as a failure to apply the plan would.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from services.executor.attention import AttentionMetadata, get_attention_backend
from services.executor.cuda_graphs import DecodeGraphs, graph_sizes
from services.executor.distributed import TPGroup
from services.executor.input_batch import InputBatch, ModelInputs, RequestState
from services.executor.kv_cache import KVCacheSpec, allocate_kv_cache, determine_num_blocks
from services.executor.loader import ResolvedModel, load_tokenizer, resolve_model
from services.executor.models.build import build_model
from services.executor.models.model_config import ModelArgs, resolve_dtype
from services.executor.models.parallel import TPInfo, all_reduce, broadcast_from_first
from services.executor.sampler import Sampler, make_generator
from services.executor.shm_allreduce import ShmAllReduce
from services.executor.spec_decode.draft_model import DraftModelProposer
from services.executor.spec_decode.speculator import Speculator
from services.executor.spec_decode.verify import Verified
from services.executor.structured.compiler import GrammarCache
from services.executor.structured.matchers import GrammarMatchers
from shared.config import ConfigError, EngineConfig
from shared.protocol import StepPlan, StepResult
from shared.stop import check_stop

log = logging.getLogger(__name__)

FAULT_ENV = "FOLIO_FAULT_STEP"


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        resolved: ResolvedModel | None = None,
        *,
        tp_rank: int = 0,
        tp_group: TPGroup | None = None,
    ) -> None:
        """`tp_group` (from `form_tp_group`) is required when config.tensor_parallel_size > 1;
        the rank's device is then the group's."""
        self.config = config
        if (config.tensor_parallel_size > 1) != (tp_group is not None):
            raise ValueError("a tensor-parallel group is needed exactly when tensor_parallel_size > 1")
        tp_size = config.tensor_parallel_size
        if tp_group is not None and (tp_group.rank, tp_group.size) != (tp_rank, tp_size):
            raise ValueError(f"rank {tp_rank} of {config.tensor_parallel_size} given the group of {tp_group}")
        resolved = resolved or resolve_model(config.model, config.load_format, config.download_dir)
        self.device = tp_group.device if tp_group is not None else pick_device(config.device)
        self._fault_step = _read_fault_step(tp_rank)
        self._num_work_steps = 0
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
        self.model = build_model(
            config,
            resolved,
            max_model_len=self.max_model_len,
            attn_backend=self.attn_backend,
            dtype=self.dtype,
            device=self.device,
            tp_rank=tp_rank,
            tp_size=config.tensor_parallel_size,
            tp_group=None if tp_group is None else tp_group.group,
            tp_shm=self._shm_all_reduce(tp_group, args.hidden_size),
        )
        self.tp: TPInfo = self.model.tp  # its stats count the time spent in collectives

        spec = KVCacheSpec(
            num_layers=args.num_layers,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=args.head_dim,
            dtype=self.dtype,
            block_size=self.block_size,
        )
        # A draft model is built before the cache is sized: its weights count on a GPU, and
        # its KV cache (same block ids) shares the budget.
        self.draft_model = self._make_draft_model(resolved)
        num_blocks = determine_num_blocks(
            config,
            spec,
            self.device,
            lambda: self._profile_run(spec),
            extra_bytes_per_block=0 if self.draft_model is None else self.draft_model.kv_spec.bytes_per_block,
        )
        # Every rank must hold every block id the scheduler hands out: the smallest count.
        agreed = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        if self.tp.size > 1:
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=self.tp.group)
            log.info("KV cache: %d blocks here, %d on every rank", num_blocks, int(agreed.item()))
        self.num_blocks = int(agreed.item())
        self.kv_caches = allocate_kv_cache(spec, self.num_blocks, self.device)
        if self.draft_model is not None:
            self.draft_model.allocate(self.num_blocks)
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
        # Structured outputs: grammars live on rank 0, the rank that samples.
        tokenizer = config.tokenizer or self.model_path
        self.grammars = GrammarMatchers(
            GrammarCache(lambda: load_tokenizer(tokenizer), self.vocab_size, self.eos_token_ids)
        )
        spec_config = config.speculative()
        self.speculator = None
        if spec_config is not None:
            log.info("speculative decoding: %s", spec_config)
            self.speculator = Speculator(spec_config, self.max_model_len, self.draft_model)

    def _make_draft_model(self, resolved: ResolvedModel) -> DraftModelProposer | None:
        spec = self.config.speculative()
        if spec is None or not spec.uses_draft_model:
            return None
        return DraftModelProposer(
            self.config,
            spec,
            target=resolved,
            target_vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            device=self.device,
            dtype=self.dtype,
            attn_backend=self.attn_backend,
        )

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. At TP > 1 call it on every rank for every plan, in the same order;
        a failure before the forward is agreed on and returned as the step's error."""
        failure = None
        try:
            with record_function("folio::prepare"):
                inputs = self._apply(plan)
        except Exception as e:
            if self.tp.size == 1:
                raise
            log.exception("step %d: applying the plan failed on rank %d", plan.step_id, self.tp.rank)
            failure, inputs = f"{type(e).__name__}: {e}", None
        if self.tp.size > 1:
            failed = self._agree(failure is not None)
            if failed:
                return _failed_step(plan.step_id, failed, failure)
        if inputs is None:
            return StepResult(step_id=plan.step_id)
        return self._forward_and_sample(plan.step_id, inputs)

    def fail_step(self, step_id: int, reason: str) -> StepResult:
        """This rank could not even decode step `step_id`'s plan: take part in the step's
        failure agreement (instead of `execute`) so every rank returns the error together."""
        log.error("step %d failed on rank %d: %s", step_id, self.tp.rank, reason)
        failed = self._agree(True) if self.tp.size > 1 else [self.tp.rank]
        return _failed_step(step_id, failed, reason)

    def _apply(self, plan: StepPlan) -> ModelInputs | None:
        """Apply the plan's diffs to the input batch; the step's inputs, or None without work."""
        has_work = any(n > 0 for n in plan.num_scheduled_tokens.values())
        if has_work:
            self._num_work_steps += 1
            if self._num_work_steps == self._fault_step:
                raise RuntimeError(f"injected fault ({FAULT_ENV}) in step {plan.step_id}")
        batch = self.input_batch
        for req_id in plan.finished_req_ids:
            batch.remove(req_id)
            self.grammars.remove(req_id)
            if self.speculator is not None:
                self.speculator.remove(req_id)
        for new in plan.new_requests:
            # Unseeded requests get None: the sampler then draws for them, in one batch,
            # from self.generator (seeded from config.seed).
            seed = new.sampling_params.seed
            state = batch.add(new, None if seed is None else make_generator(seed, self.device))
            if self.tp.rank == 0:  # compiling starts now, overlapping the request's prefill
                self.grammars.add(new.req_id, new.sampling_params, new.output_token_ids)
            if self.draft_model is not None:  # its prefix-cache hit is valid draft KV too
                self.draft_model.add(state)
        for cached in plan.cached_requests:
            batch.update(cached)
        batch.set_drafts(plan.scheduled_spec_tokens)
        return batch.prepare(plan.num_scheduled_tokens) if has_work else None

    def _agree(self, failed_here: bool) -> list[int]:
        """Ranks that failed this step (the same list on every rank): one small all-reduce,
        before any rank enters the forward's collectives."""
        flags = torch.zeros(self.tp.size, dtype=torch.int32, device=self.device)
        flags[self.tp.rank] = int(failed_here)
        all_reduce(flags, self.tp)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def _forward_and_sample(self, step_id: int, inputs: ModelInputs) -> StepResult:
        started = time.perf_counter()
        graphs = self.decode_graphs
        with record_function("folio::forward"):
            if graphs is not None and graphs.can_run(inputs.meta):
                hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        requests = inputs.sampling_requests
        if not requests:  # only mid-prompt chunks this step
            return StepResult(step_id=step_id)
        with record_function("folio::logits"):
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # None on ranks > 0
        with record_function("folio::sample"):
            sampled = self._sample(logits, requests)
        with record_function("folio::finish"):
            return self._finish(step_id, started, inputs, requests, sampled)

    def _sample(self, logits: torch.Tensor | None, requests: list[RequestState]) -> list[Verified]:
        sampled: list[Verified] = []
        if logits is not None:  # rank 0 samples, once, for all ranks
            # A request whose grammar is still compiling takes no token this step: the
            # scheduler computes its last token again next step (a deferral, like a
            # rejected draft), so a new schema never holds up the rest of the batch.
            grammars = self.grammars
            waiting = {r.req_id for r in requests if r.req_id in grammars and not grammars.ready(r.req_id)}
            if self.grammars:
                self._mask_grammars(logits, requests, waiting)
            if self.speculator is not None:
                sampled = self.speculator.sample(self.sampler, logits, requests)
            else:
                out = self.sampler(logits, [r.sampling for r in requests])
                sampled = [
                    Verified([t], 0, [] if lp is None else [lp])
                    for t, lp in zip(out.token_ids, out.logprobs, strict=True)
                ]
            for i, r in enumerate(requests):
                if r.req_id in waiting:
                    sampled[i] = Verified([], 0, [])
        return sampled

    def _finish(
        self,
        step_id: int,
        started: float,
        inputs: ModelInputs,
        requests: list[RequestState],
        sampled: list[Verified],
    ) -> StepResult:
        """Append the step's tokens, decide finishes, propose the next drafts."""
        if self.speculator is not None and sampled:  # the host has the tokens: the step is done
            self.speculator.record_step(
                inputs.meta.num_tokens, inputs.meta.max_query_len, time.perf_counter() - started
            )
        token_ids = [v.token_ids for v in sampled]
        if self.tp.size > 1:
            # Every rank keeps its request state in sync: the next plan will not carry these.
            token_ids = self._broadcast_tokens(token_ids, requests)
        finish_reasons = []
        for request, tokens in zip(requests, token_ids, strict=True):
            code = 0
            constrained = request.req_id in self.grammars
            for n, token_id in enumerate(tokens, 1):
                request.append_token(token_id)
                terminated = constrained and self.grammars.accept(request.req_id, token_id)
                # The one place a token-level finish is decided (the scheduler applies it);
                # inside an accepted run of drafts it cuts the run there.
                reason = check_stop(
                    request.sampling.output_token_ids,
                    request.num_prompt_tokens,
                    request.sampling.params,
                    self.eos_token_ids,
                    self.max_model_len,
                    grammar_terminated=terminated,
                )
                if reason is not None:
                    del tokens[n:]
                    code = int(reason)
                    break
            finish_reasons.append(code)
        result = StepResult(
            step_id=step_id,
            req_ids=[r.req_id for r in requests],
            sampled_token_ids=token_ids,
            finish_reasons=finish_reasons,
        )
        if any(v.logprobs for v in sampled):
            result.logprobs = [v.logprobs[: len(t)] for v, t in zip(sampled, token_ids, strict=True)]
        if self.speculator is not None and sampled:  # rank 0: its result is the one that counts
            result.num_accepted = [
                min(v.num_accepted, len(t)) for v, t in zip(sampled, token_ids, strict=True)
            ]
            live = [i for i, code in enumerate(finish_reasons) if not code and token_ids[i]]
            drafts = self.speculator.propose([requests[i] for i in live])
            result.draft_token_ids = [[] for _ in requests]
            for i, d in zip(live, drafts, strict=True):
                result.draft_token_ids[i] = d
        return result

    def _mask_grammars(self, logits: torch.Tensor, requests: list[RequestState], waiting: set[str]) -> None:
        """Mask the constrained requests' rows (each request has 1 + len(drafts) rows)."""
        rows, row = [], 0
        for r in requests:
            if r.req_id in self.grammars and r.req_id not in waiting:
                rows.append((row, r.req_id, r.spec_token_ids))
            row += 1 + len(r.spec_token_ids)
        self.grammars.mask(logits, rows)

    def _broadcast_tokens(self, token_ids: list[list[int]], requests: list[RequestState]) -> list[list[int]]:
        """Rank 0's tokens of each request, on every rank: one (requests, 1 + max drafts)
        tensor padded with -1 (a step with drafts emits 1 to 1 + k tokens per request)."""
        width = 1 + max(len(r.spec_token_ids) for r in requests)
        if token_ids:
            ids = torch.tensor([t + [-1] * (width - len(t)) for t in token_ids], device=self.device)
        else:
            ids = torch.empty((len(requests), width), dtype=torch.int64, device=self.device)
        return [[t for t in row if t >= 0] for row in broadcast_from_first(ids, self.tp).tolist()]

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
    def _shm_all_reduce(self, tp_group: TPGroup | None, hidden_size: int) -> ShmAllReduce | None:
        """Ranks on one host all-reduce through shared memory, sized for the largest
        activation: a full token budget of hidden states (larger ones fall back to gloo)."""
        if tp_group is None:
            return None
        max_bytes = self.max_num_batched_tokens * hidden_size * self.dtype.itemsize
        return tp_group.shm_all_reduce(max_bytes)

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


def _failed_step(step_id: int, failed_ranks: list[int], reason: str | None) -> StepResult:
    """The same message on every rank, plus this rank's own reason where it failed itself
    (a peer's reason is in that peer's log)."""
    error = f"step {step_id} failed on tensor-parallel rank(s) {failed_ranks}"
    return StepResult(step_id=step_id, error=f"{error}: {reason}" if reason else error)


def _read_fault_step(tp_rank: int) -> int | None:
    """FOLIO_FAULT_STEP="RANK:N": this rank's N-th step with work raises (None: no fault)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    rank, _, n = spec.partition(":")
    if not (rank.isdigit() and n.isdigit() and int(n) >= 1):
        raise ConfigError(f"{FAULT_ENV} must look like RANK:N (N >= 1), got {spec!r}")
    return int(n) if int(rank) == tp_rank else None


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
