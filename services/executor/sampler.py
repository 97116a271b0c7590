"""The sampler: one batch of last-position logits in, one token (and logprobs) per row out.

Per step, for the rows that need it (vLLM's semantics):

    logits ─▶ min_tokens mask ─▶ logit_bias ─▶ penalties ─▶ (processed logits: logprobs come from here)
                                                   │
                    greedy rows ◀── argmax ────────┤
                                                   ▼
          random rows: / temperature ─▶ top-k ─▶ top-p ─▶ min-p ─▶ softmax ─▶ argmax(p / q)

Random rows use the exponential race: with q ~ Exponential(1) drawn independently per
token, argmax(p / q) is a sample from p. A row with a seed draws its q from its own
generator (one draw of `vocab` values per token it samples), re-seeded before each draw
with `token_seed(seed, k)`, k the number of output tokens before this one. So the noise
of a seeded request's k-th token is a function of (seed, k) only: its tokens do not
depend on what else is in the batch, where it sits, or whether it was preempted and
recomputed (the runner then re-creates its state). Unseeded rows share one draw from
the engine-wide generator.

When every row is greedy with nothing to process or report, the whole call is one
argmax (the decode hot path).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from services.executor.sampling.penalties import add_bias, apply_penalties, mask_tokens
from services.executor.sampling.race import race
from services.executor.sampling.topk_topp import NUCLEUS_WINDOWS, apply_min_p, truncate
from shared.protocol import Logprobs
from shared.sampling_params import SamplingParams


@dataclass
class SamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step's token
    generator: torch.Generator | None = None  # per-request, set when params.seed is not None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[Logprobs | None]  # where params.logprobs is not None, else None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one seeded request; create it on the device the logits live on."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al.): a well-mixed 64-bit function of x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def token_seed(seed: int, index: int) -> int:
    """The generator seed for the draw of output token `index` of a request seeded with `seed`.

    Mixed twice so that nearby seeds (the n choices of one request get seed + i) and
    nearby indexes give unrelated streams: (s + 1, k) and (s, k + 1) share nothing.
    NOTE: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed; the mix
    makes those bits depend on all of (seed, index).
    """
    return splitmix64(splitmix64(seed & _MASK64) ^ index)


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class Sampler:
    def __init__(
        self, vocab_size: int, eos_token_ids: Collection[int], generator: torch.Generator | None = None
    ):
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        # Engine-wide generator for unseeded rows; None: torch's default generator.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        n = len(states)
        if logits.shape[0] != n:
            raise ValueError(f"{logits.shape[0]} logits rows for {n} sampling states")
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, : self.vocab_size]  # padded LM-head columns never sample
        params = [s.params for s in states]
        want_logprobs = any(p.logprobs is not None for p in params)
        if (
            all(p.greedy for p in params)
            and not want_logprobs
            and not any(has_penalties(p) or p.logit_bias for p in params)
            and not any(self._suppresses_stop(s) for s in states)
        ):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * n)

        processed = self.process_logits(logits, states)
        sampled = self.sample(processed, states)
        token_ids = sampled.tolist()
        if want_logprobs:
            logprobs = self.logprobs(processed, sampled, token_ids, params)
        else:
            logprobs = [None] * n
        return SamplerOutput(token_ids, logprobs)

    # ------------------------------------------------------------------ processing
    def _suppresses_stop(self, s: SamplingState) -> bool:
        return len(s.output_token_ids) < s.params.min_tokens

    def process_logits(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """min_tokens mask, then logit_bias, then penalties: the logits that logprobs and greedy use.

        As vLLM v1, the bias is a logits processor that runs before penalties and before
        temperature, top-k/top-p and min-p, so it moves greedy choices too; all biased
        (row, token) pairs of the batch are added in one scatter-add.

        Returns `logits` itself when there is nothing to do, else a float32 copy (the
        caller's tensor is never modified).

        NOTE: like vLLM, min_tokens suppresses EOS even with ignore_eos (vLLM keeps the
        model's EOS in `all_stop_token_ids`); check_stop cannot finish before then anyway.
        """
        vocab = logits.shape[1]
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, s in enumerate(states):
            if self._suppresses_stop(s):
                banned = sorted({*self.eos_token_ids, *s.params.stop_token_ids})
                ids = [t for t in banned if 0 <= t < vocab]
                mask_rows += [i] * len(ids)
                mask_cols += ids
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        for i, s in enumerate(states):
            for t, v in s.params.logit_bias.items():
                if 0 <= t < vocab:  # the gateway and LLM reject others; never index past the row
                    bias_rows.append(i)
                    bias_cols.append(t)
                    bias_vals.append(v)
        pen_rows = [i for i, s in enumerate(states) if has_penalties(s.params)]
        if not mask_rows and not pen_rows and not bias_rows:
            return logits

        out = logits.to(dtype=torch.float32, copy=True)
        mask_tokens(out, mask_rows, mask_cols)
        add_bias(out, bias_rows, bias_cols, bias_vals)
        if pen_rows:
            rows = [states[i] for i in pen_rows]
            apply_penalties(
                out,
                [s.prompt_token_ids for s in rows],
                [s.output_token_ids for s in rows],
                [s.params.presence_penalty for s in rows],
                [s.params.frequency_penalty for s in rows],
                [s.params.repetition_penalty for s in rows],
                rows=None if len(pen_rows) == len(states) else pen_rows,
            )
        return out

    # ------------------------------------------------------------------ sampling
    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """(num_rows,) int64 token ids of processed logits (process_logits)."""
        params = [s.params for s in states]
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rand_rows:
            return logits.argmax(dim=-1)
        dev = logits.device
        vocab = logits.shape[1]
        rp = [params[i] for i in rand_rows]
        gens = [states[i].generator for i in rand_rows]
        for i, g in zip(rand_rows, gens, strict=True):
            seed = params[i].seed
            if g is not None and seed is not None:  # this token's draw: from (seed, index) only
                g.manual_seed(token_seed(seed, len(states[i].output_token_ids)))
        all_random = len(rand_rows) == len(states)
        rand_idx = torch.tensor(rand_rows, dtype=torch.long, device=dev)
        x = logits if all_random else logits.index_select(0, rand_idx)
        temps = torch.tensor([p.temperature for p in rp], dtype=torch.float32, device=dev)
        # A fresh tensor: nothing below writes into the caller's logits.
        x = x.float() / temps.unsqueeze(1)

        picks = torch.empty(len(rand_rows), dtype=torch.long, device=dev)
        cut = [j for j, p in enumerate(rp) if 0 < p.effective_top_k < vocab or p.top_p < 1.0]
        plain = [j for j, p in enumerate(rp) if not (0 < p.effective_top_k < vocab or p.top_p < 1.0)]
        if plain:
            xp = x if len(plain) == len(rp) else x[plain]
            apply_min_p(xp, [rp[j].min_p for j in plain])
            self._put(picks, plain, race(xp, None, [gens[j] for j in plain], vocab, self.generator))
        if cut:
            # Top-p without top-k: on CPU growing windows before a full sort (topk_topp);
            # on GPU a full sort is cheap and a window would cost a host sync.
            xc = x if len(cut) == len(rp) else x[cut]
            for group in truncate(
                xc,
                [rp[j].effective_top_k for j in cut],
                [rp[j].top_p for j in cut],
                [rp[j].min_p for j in cut],
                windows=NUCLEUS_WINDOWS if dev.type == "cpu" else (),
            ):
                rows = [cut[r] for r in group.rows]
                self._put(
                    picks, rows, race(group.vals, group.ids, [gens[j] for j in rows], vocab, self.generator)
                )

        if all_random:
            return picks
        return logits.argmax(dim=-1).index_copy_(0, rand_idx, picks)

    @staticmethod
    def _put(picks: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
        if len(rows) == picks.shape[0]:
            picks.copy_(values)
        else:
            picks.index_copy_(0, torch.tensor(rows, dtype=torch.long, device=picks.device), values)

    # ------------------------------------------------------------------ logprobs
    def logprobs(
        self,
        logits: torch.Tensor,
        sampled: torch.Tensor,
        token_ids: list[int],
        params: list[SamplingParams],
    ) -> list[Logprobs | None]:
        """Logprob, rank and top-n of each sampled token, from the processed logits."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        dev = logits.device
        if len(rows) == len(params):
            lp = torch.log_softmax(logits.float(), dim=-1)
            tok = sampled
        else:
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
            tok = sampled.index_select(0, idx)
        tok_lp = lp.gather(1, tok.unsqueeze(1))
        # vLLM's rank: how many tokens are at least as likely (1 = the most likely).
        ranks = (lp >= tok_lp).sum(dim=-1).tolist()
        tok_lps = tok_lp.squeeze(1).tolist()
        max_n = min(max(params[i].logprobs or 0 for i in rows), lp.shape[1])
        top_ids: list[list[int]] = [[] for _ in rows]
        top_lps: list[list[float]] = [[] for _ in rows]
        if max_n > 0:
            vals, ids = lp.topk(max_n, dim=-1, sorted=True)
            top_ids, top_lps = ids.tolist(), vals.tolist()

        out: list[Logprobs | None] = [None] * len(params)
        for j, i in enumerate(rows):
            k = params[i].logprobs or 0
            out[i] = Logprobs(
                token_id=token_ids[i],
                logprob=tok_lps[j],
                rank=ranks[j],
                top_ids=top_ids[j][:k],
                top_logprobs=top_lps[j][:k],
            )
        return out
