"""When a request stops at a token: one pure function, applied where tokens are sampled.

The model runner calls it right after sampling and reports the reason in its StepResult,
so the executor streams a token together with its finish reason and the scheduler frees
the request's blocks on that report, never deciding the same thing again. It is pure
Python (no torch) so the scheduler tests' fake runner decides finishes the same way.
Stop *strings* are checked where text exists (gateway, in-process engine).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.protocol import FinishReason
from shared.sampling_params import SamplingParams


def check_stop(
    output_token_ids: Sequence[int],
    num_prompt_tokens: int,
    params: SamplingParams,
    eos_token_ids: Sequence[int] | frozenset[int],
    max_model_len: int,
    grammar_terminated: bool = False,
) -> FinishReason | None:
    """Finish reason after the last token of `output_token_ids` was appended, or None.

    `grammar_terminated`: the request's structured-output grammar accepted its end (a stop
    token after a complete match), so nothing more may follow, even with ignore_eos."""
    n = len(output_token_ids)
    if n == 0:
        return None
    last = output_token_ids[-1]
    if n > params.min_tokens:
        if not params.ignore_eos and last in eos_token_ids:
            return FinishReason.STOP
        if last in params.stop_token_ids:
            return FinishReason.STOP
    if grammar_terminated:
        return FinishReason.STOP
    if params.max_tokens is not None and n >= params.max_tokens:
        return FinishReason.LENGTH
    if num_prompt_tokens + n >= max_model_len:
        return FinishReason.LENGTH
    return None
