"""`--speculative-config`: vLLM's JSON object, validated into one frozen dataclass.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"model": "PATH_OR_BUNDLED_NAME", "num_speculative_tokens": 4}      (method "draft_model")

Unknown keys are an error (a typo must not silently turn speculation off). `backoff` is
folio's own key: on by default, it lets the proposer draft fewer tokens (or none) for a
request whose drafts keep being rejected, so speculation never costs much on text it
cannot predict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
_KEYS = {
    "method",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "model",
    "draft_tensor_parallel_size",
    "backoff",
}


class SpeculativeConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 0  # ngram only
    prompt_lookup_min: int = 0  # ngram only
    model: str | None = None  # draft_model only
    backoff: bool = True

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots the scheduler reserves beyond a step's tokens: a draft model writes the
        KV of its own drafts there right after the step (n-gram lookup writes nothing)."""
        return self.num_speculative_tokens if self.uses_draft_model else 0

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig:
        """From a dict or its JSON text; raises SpeculativeConfigError naming the bad key."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise SpeculativeConfigError(f"not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise SpeculativeConfigError(f"must be a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise SpeculativeConfigError(f"unknown key(s) {unknown}; known: {sorted(_KEYS)}")
        model = value.get("model")
        method = value.get("method") or ("draft_model" if model else None)
        if method == "draft" or method == "draft-model":
            method = "draft_model"
        if method not in METHODS:
            raise SpeculativeConfigError(
                f"method must be one of {METHODS} (or give a draft 'model'), got {value.get('method')!r}"
            )
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise SpeculativeConfigError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        backoff = value.get("backoff", True)
        if not isinstance(backoff, bool):
            raise SpeculativeConfigError(f"backoff must be true or false, got {backoff!r}")
        tp = value.get("draft_tensor_parallel_size")
        if tp not in (None, 1):
            raise SpeculativeConfigError(f"draft_tensor_parallel_size: only 1 is supported, got {tp!r}")
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise SpeculativeConfigError("method draft_model needs 'model': a path or a bundled name")
            for key in ("prompt_lookup_max", "prompt_lookup_min"):
                if key in value:
                    raise SpeculativeConfigError(f"{key} is for method ngram, not draft_model")
            return cls(method, k, model=model, backoff=backoff)
        if model is not None:
            raise SpeculativeConfigError("'model' is for a draft model, not method ngram")
        lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        # Either bound alone sets both (as vLLM); neither: [2, 4], short enough to find copies
        # in chat text, long enough that a one-token coincidence does not count as a match.
        if lo is None and hi is None:
            lo, hi = 2, 4
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        for key, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpeculativeConfigError(f"{key} must be an integer >= 1, got {v!r}")
        if lo > hi:
            raise SpeculativeConfigError(f"prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
        return cls(method, k, prompt_lookup_max=hi, prompt_lookup_min=lo, backoff=backoff)
