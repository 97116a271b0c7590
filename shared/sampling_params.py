"""Sampling parameters: one typed struct, used in-process and on the wire."""

from __future__ import annotations

import msgspec

from shared.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """vLLM-compatible sampling parameters for one sequence.

    `n` is expanded into n independent requests before scheduling (gateway and LLM),
    so the engine core only ever sees n == 1.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs of each sampled token (0: only the sampled one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # {token id: bias} added to the logits before penalties and sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] = {}
    # A grammar the output must follow (JSON schema, regex, choice, EBNF); see structured_outputs.py.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        err = self.validate()
        if err is not None:
            raise ValueError(err[1])

    def validate(self) -> tuple[str, str] | None:
        """Return (param, message) for the first invalid field, or None."""
        if self.n < 1:
            return "n", f"n must be at least 1, got {self.n}."
        if self.temperature < 0:
            return "temperature", f"temperature must be non-negative, got {self.temperature}."
        if not 0 < self.top_p <= 1:
            return "top_p", f"top_p must be in (0, 1], got {self.top_p}."
        if self.top_k < -1:
            return "top_k", f"top_k must be -1 (disable), or at least 1, got {self.top_k}."
        if not 0 <= self.min_p <= 1:
            return "min_p", f"min_p must be in [0, 1], got {self.min_p}."
        if not -2 <= self.presence_penalty <= 2:
            return "presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}."
        if not -2 <= self.frequency_penalty <= 2:
            return "frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}."
        if self.repetition_penalty <= 0:
            return "repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}."
        if self.max_tokens is not None and self.max_tokens < 1:
            return "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}."
        if self.min_tokens < 0:
            return "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}."
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            return "min_tokens", "min_tokens must be less than or equal to max_tokens."
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            return "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}."
        bad = next((v for v in self.logit_bias.values() if not -100 <= v <= 100), None)
        if bad is not None:
            return "logit_bias", f"logit_bias values must be in [-100, 100], got {bad}."
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (0, -1) else self.top_k
