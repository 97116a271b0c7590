"""Draft-model proposals: a small model of the target's tokenizer drafts k tokens greedily.

The draft model has its own paged KV cache with the SAME block ids as the target's: it
reads the target's block tables, so one block manager (the scheduler's) serves both, and
a prefix-cache hit covers both caches. The scheduler reserves k lookahead slots beyond
each step's tokens; the draft writes its own drafts' KV there.

One `propose` after a step, for all requests that want drafts, batched:

    token_ids (L known):  p0 p1 ... p9 | t10 t11           t11 = just sampled by the target
    draft KV valid for:   0 .. 9           (`valid`, from what it was fed before)
    catch-up forward:     t10 t11 at positions 10, 11 ─▶ argmax = d1   (varlen, all requests)
    decode forward j:     d_{j-1} at position L + j - 2 ─▶ d_j          (one token each)

so after it the draft KV holds token_ids[:L] + d1 .. d_{k-1} (d_k is never fed). The next
call compares those fed drafts with what the target kept and recomputes from the first
position that differs: no extra protocol, the proposer rolls itself back.

NOTE: a request's token_ids only ever grow while the runner holds it (a preempted request
is `remove`d and comes back as new), so positions below `base` never need re-checking.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.executor.attention.backend import AttentionBackend, AttentionMetadata
from services.executor.input_batch import RequestState
from services.executor.kv_cache import KVCaches, KVCacheSpec, allocate_kv_cache
from services.executor.loader import ModelSourceError, ResolvedModel, load_tokenizer, resolve_model
from services.executor.models.build import build_model
from services.executor.models.model_config import ModelArgs
from shared.config import ConfigError, EngineConfig
from shared.speculative_config import SpeculativeConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _DraftState:
    """What one request's draft KV holds: token_ids[:base] at positions 0..base-1, then
    `drafts` (fed draft tokens) at positions base.. (they may since have been rejected)."""

    base: int
    drafts: list[int] = field(default_factory=list)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """Positions whose draft KV matches token_ids: base plus the fed drafts the target kept."""
        kept = token_ids[self.base : self.base + len(self.drafts)]
        n = 0
        for fed, got in zip(self.drafts, kept, strict=False):  # at most k - 1 tokens
            if fed != got:
                break
            n += 1
        return self.base + n


class DraftModelProposer:
    def __init__(
        self,
        config: EngineConfig,
        spec: SpeculativeConfig,
        *,
        target: ResolvedModel,
        target_vocab_size: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        attn_backend: AttentionBackend,
    ) -> None:
        if spec.model is None:
            raise ValueError("DraftModelProposer needs a speculative config with a draft 'model'")
        # A dummy target (benchmarks at real sizes) gets a dummy draft; any other load
        # format names the target's source, so the draft's own is found by path ("auto").
        load_format = "dummy" if config.load_format == "dummy" else "auto"
        try:
            self.resolved = resolve_model(spec.model, load_format, config.download_dir)
        except ModelSourceError as e:
            raise ConfigError(f"speculative_config: draft model {spec.model!r}: {e}") from e
        args = ModelArgs.from_hf(self.resolved.hf_config, self.resolved.architecture)
        check_same_tokenizer(
            target_name=config.model,
            target_tokenizer=Path(config.tokenizer) if config.tokenizer else target.path,
            target_vocab_size=target_vocab_size,
            draft_name=spec.model,
            draft_tokenizer=self.resolved.path,
            draft_vocab_size=args.vocab_size,
        )
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        # The catch-up forward is cut into pieces of the target's token budget, so a long
        # prompt never costs the draft more activation memory than a target step.
        self.max_tokens_per_forward = config.resolved_max_num_batched_tokens(device.type == "cuda")
        # The same backend object as the target is fine: prepare() is called per forward,
        # and draft and target forwards never interleave.
        self.model = build_model(
            config,
            self.resolved,
            max_model_len=max_model_len,
            attn_backend=attn_backend,
            dtype=dtype,
            device=device,
        )
        self._kv_spec = KVCacheSpec(
            num_layers=args.num_layers,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=args.head_dim,
            dtype=dtype,
            block_size=block_size,
        )
        self.kv_caches: KVCaches | None = None
        self._states: dict[str, _DraftState] = {}
        # Tokens run through the draft model (catch-up + fed drafts): its cost, for benchmarks.
        self.num_computed_tokens = 0

    @property
    def kv_spec(self) -> KVCacheSpec:
        return self._kv_spec

    def allocate(self, num_blocks: int) -> None:
        """The draft's KV cache: as many blocks as the target's, addressed by the same ids."""
        self.kv_caches = allocate_kv_cache(self._kv_spec, num_blocks, self.device)

    def add(self, request: RequestState) -> None:
        """Optional: call when the runner receives a request (new or resumed), before its
        first step. Its num_computed_tokens is then exactly the prefix-cache hit, whose draft
        KV this trusts (the draft wrote those blocks too, at the same slots, for the request
        that filled them; were it wrong, drafts would be worse, never the output). A request
        first seen in `propose` trusts nothing and feeds the draft its whole history: by
        then num_computed_tokens also counts prompt chunks the draft never saw."""
        self._states[request.req_id] = _DraftState(base=request.num_computed_tokens)

    def remove(self, req_id: str) -> None:
        """Request finished or preempted: forget its draft state."""
        self._states.pop(req_id, None)

    # ------------------------------------------------------------------ proposals
    @torch.inference_mode()
    def propose(self, requests: Sequence[RequestState], max_drafts: Sequence[int]) -> list[list[int]]:
        """Up to max_drafts[i] greedy draft tokens for each request ([] where 0)."""
        if self.kv_caches is None:
            raise RuntimeError("DraftModelProposer.allocate(num_blocks) was not called")
        out: list[list[int]] = [[] for _ in requests]
        picked, lens, valid, want, caps = [], [], [], [], []
        for i, (req, k) in enumerate(zip(requests, max_drafts, strict=True)):
            if k <= 0:
                continue
            num = len(req.token_ids)
            state = self._states.get(req.req_id)
            if state is None:
                state = self._states[req.req_id] = _DraftState(base=0)  # see add()
            picked.append(i)
            lens.append(num)
            # The last token is always fed again: its logits give d1 (rewriting KV is harmless).
            valid.append(min(state.valid_prefix(req.token_ids), num - 1))
            want.append(k)
            caps.append(len(req.block_ids) * self.block_size)
        if not picked:
            return out
        asking = [requests[i] for i in picked]
        L = np.asarray(lens, dtype=np.int64)
        start = np.asarray(valid, dtype=np.int64)
        cap = np.asarray(caps, dtype=np.int64)
        if np.any(cap < L):
            i = int(np.argmax(cap < L))
            raise ValueError(
                f"request {asking[i].req_id!r}: {len(asking[i].block_ids)} blocks cannot hold its "
                f"{int(L[i])} tokens (the scheduler must reserve lookahead slots for the draft)"
            )
        # Draft j (1-based) is the token at position L + j - 1, and the draft writes KV up to
        # position L + n - 2: stay below max_model_len and inside the request's blocks.
        n = np.minimum(np.asarray(want, dtype=np.int64), self.max_model_len - L)
        n = np.minimum(n, cap - L + 1)
        live = np.flatnonzero(n > 0)
        if live.size == 0:
            return out
        seqs = [asking[i] for i in live.tolist()]
        L, start, n = L[live], start[live], n[live]
        table = self._block_table(seqs, L + n - 1)

        drafts = torch.empty((len(seqs), int(n.max())), dtype=torch.int64, device=self.device)
        drafts[:, 0] = self._catch_up(seqs, table, start, L)
        # Decode forwards: requests that want fewer drafts drop out (rows where n >= j).
        for j in range(2, int(n.max()) + 1):
            rows = np.flatnonzero(n >= j)
            idx = torch.from_numpy(rows).to(self.device)
            pos = L[rows] + j - 2
            meta = self._metadata(table[rows], pos, np.ones_like(pos))
            drafts[idx, j - 1] = self._greedy(drafts[idx, j - 2], torch.from_numpy(pos), meta)

        rows_out = drafts.tolist()  # the one device-to-host copy of the drafts
        for row, req, num, m, i in zip(rows_out, seqs, L.tolist(), n.tolist(), live.tolist(), strict=True):
            out[picked[i]] = row[:m]
            self._states[req.req_id] = _DraftState(base=num, drafts=row[: m - 1])
        return out

    def _catch_up(
        self, seqs: list[RequestState], table: np.ndarray, start: np.ndarray, L: np.ndarray
    ) -> torch.Tensor:
        """Feed each request's tokens start..L-1 (in pieces of the token budget); d1 per request."""
        q = L - start
        ids: list[int] = []
        for req, s in zip(seqs, start.tolist(), strict=True):
            ids.extend(req.token_ids[s:])
        token_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        seq_of_token = np.repeat(np.arange(len(seqs)), q)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(q, out=offsets[1:])
        positions = np.arange(len(ids)) - np.repeat(offsets[:-1] - start, q)
        d1 = torch.empty(len(seqs), dtype=torch.int64, device=self.device)
        budget = self.max_tokens_per_forward
        for lo in range(0, len(ids), budget):
            hi = min(lo + budget, len(ids))
            # A piece holds whole or cut runs of consecutive sequences, each contiguous.
            seq = seq_of_token[lo:hi]
            first = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
            rows = seq[first]
            piece_q = np.diff(np.r_[first, hi - lo])
            meta = self._metadata(table[rows], positions[lo:hi][first], piece_q)
            # Rows whose last token (position L-1) is in this piece give that request's d1.
            ends = first + piece_q - 1
            done = positions[lo:hi][ends] == L[rows] - 1
            logits_at = torch.from_numpy(ends[done]).to(self.device)
            tokens = self._greedy(token_ids[lo:hi], torch.from_numpy(positions[lo:hi]), meta, logits_at)
            d1[torch.from_numpy(rows[done]).to(self.device)] = tokens
        return d1

    def _greedy(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft forward; argmax at rows `logits_at` (None: every row)."""
        hidden = self.model(input_ids, positions.to(self.device), self.kv_caches, meta)
        self.num_computed_tokens += meta.num_tokens
        if logits_at is not None:
            hidden = hidden[logits_at]
        if hidden.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden).argmax(dim=-1)

    # ------------------------------------------------------------------ batch building
    def _block_table(self, seqs: list[RequestState], seq_lens: np.ndarray) -> np.ndarray:
        """Each request's blocks for its first seq_lens[i] positions, padded with 0."""
        bs = self.block_size
        need = -(-seq_lens // bs)
        table = np.zeros((len(seqs), int(need.max())), dtype=np.int32)
        for i, (req, w) in enumerate(zip(seqs, need.tolist(), strict=True)):
            table[i, :w] = req.block_ids[:w]
        return table

    def _metadata(self, table: np.ndarray, first_pos: np.ndarray, q_lens: np.ndarray) -> AttentionMetadata:
        """Metadata of one forward: sequence i computes q_lens[i] tokens from position first_pos[i]."""
        bs = self.block_size
        num_seqs = len(q_lens)
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        num_tokens = int(query_start[-1])
        positions = np.arange(num_tokens) - np.repeat(query_start[:-1] - first_pos, q_lens)
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        slots = table[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = first_pos + q_lens
        width = int(-(-seq_lens.max() // bs))
        dev = self.device
        return AttentionMetadata(
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(np.ascontiguousarray(table[:, :width])).to(dev),
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_lens_cpu=q_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=bs,
        )


# ---------------------------------------------------------------------- tokenizer check
def check_same_tokenizer(
    *,
    target_name: str,
    target_tokenizer: Path,
    target_vocab_size: int,
    draft_name: str,
    draft_tokenizer: Path,
    draft_vocab_size: int,
) -> None:
    """Raise ConfigError unless the draft's token ids mean what the target's mean: the same
    vocab size and, where both folders have a tokenizer, the same vocab and merges."""
    what = f"speculative_config: draft model {draft_name!r} and target model {target_name!r}"
    if draft_vocab_size != target_vocab_size:
        raise ConfigError(
            f"{what} have different vocab sizes ({draft_vocab_size} vs {target_vocab_size}); "
            "a draft model must use the target's tokenizer"
        )
    target_model, draft_model = _tokenizer_model(target_tokenizer), _tokenizer_model(draft_tokenizer)
    if target_model is None or draft_model is None:
        if (target_model is None) != (draft_model is None):
            log.warning("%s: only one has a tokenizer; checked the vocab size only", what)
        return
    diff = _tokenizer_difference(target_model, draft_model)
    if diff:
        raise ConfigError(
            f"{what} have different tokenizers: {diff}; a draft model must use the target's tokenizer"
        )


def _tokenizer_model(folder: Path) -> dict | None:
    """The folder's tokenizer model (type, vocab, merges) as `tokenizers` serializes it; None
    without a tokenizer (tiny test models carry none)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif any((folder / f).is_file() for f in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
        # sentencepiece / slow formats: transformers converts them to a fast tokenizer
        try:
            tok = getattr(load_tokenizer(folder), "backend_tokenizer", None)
        except ModelSourceError as e:
            log.warning("%s", e)
            tok = None
        if tok is None:
            return None
    else:
        return None
    return json.loads(tok.to_str()).get("model", {})


def _tokenizer_difference(target: dict, draft: dict) -> str | None:
    """What differs (type, vocab, merges), in words, or None."""
    if target.get("type") != draft.get("type"):
        return f"tokenizer type {draft.get('type')} vs {target.get('type')}"
    tv, dv = target.get("vocab"), draft.get("vocab")
    if tv != dv:
        if isinstance(tv, dict) and isinstance(dv, dict):
            token = next((t for t in sorted(tv.keys() | dv.keys()) if tv.get(t) != dv.get(t)), None)
            return (
                f"vocab differs ({len(dv)} vs {len(tv)} entries; token {token!r} has id "
                f"{dv.get(token)} in the draft, {tv.get(token)} in the target)"
            )
        return "vocab differs"
    tm, dm = target.get("merges") or [], draft.get("merges") or []
    if tm != dm:
        i = next((i for i, (a, b) in enumerate(zip(tm, dm, strict=False)) if a != b), min(len(tm), len(dm)))
        return (
            f"merges differ ({len(dm)} vs {len(tm)}; merge #{i} is {_nth(dm, i)!r} in the draft, "
            f"{_nth(tm, i)!r} in the target)"
        )
    return None


def _nth(items: list, i: int) -> object:
    return items[i] if i < len(items) else "(none)"
