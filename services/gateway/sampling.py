"""From an OpenAI request to engine requests: parameter checks, context length, n expansion.

Every rejection is a BadRequestError naming the offending parameter, raised before
anything reaches the engines, so a bad request costs nothing downstream.
"""

from __future__ import annotations

import time

import msgspec

from services.gateway.errors import BadRequestError
from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.structured import structured_outputs
from shared.protocol import GenerateRequest
from shared.sampling_params import MAX_LOGPROBS, SamplingParams
from shared.structured_outputs import StructuredOutputsParams

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Input limits (docs/reliability.md). OpenAI's n is at most 128; stop strings are checked
# against the text at every token and held back up to their length, so their number and
# length are bounded (vLLM bounds neither; OpenAI allows 4, which would break vLLM clients).
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_LEN = 1024  # characters
MAX_STOP_TOKEN_IDS = 1024
MAX_PROMPTS = 1024  # prompts in one /v1/completions batch


def check_openai_ranges(req: CompletionRequest | ChatCompletionRequest) -> None:
    """OpenAI's documented ranges, stricter than the engine's own checks."""
    if not 1 <= req.n <= MAX_N:
        raise BadRequestError(f"n must be in [1, {MAX_N}], got {req.n}.", "n")
    if req.request_timeout is not None and not req.request_timeout > 0:
        raise BadRequestError(
            f"request_timeout must be a positive number of seconds, got {req.request_timeout}.",
            "request_timeout")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequestError(f"stop may have at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", "stop")
    if any(len(s) > MAX_STOP_LEN for s in stop):
        longest = max(len(s) for s in stop)
        raise BadRequestError(
            f"each stop string may be at most {MAX_STOP_LEN} characters, got one of {longest}.", "stop")
    if req.stop_token_ids is not None and len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise BadRequestError(
            f"stop_token_ids may have at most {MAX_STOP_TOKEN_IDS} entries, got "
            f"{len(req.stop_token_ids)}.", "stop_token_ids")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise BadRequestError(f"temperature must be in [0, 2], got {req.temperature}.", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise BadRequestError(f"top_p must be in (0, 1], got {req.top_p}.", "top_p")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise BadRequestError(f"max_tokens must be at least 1, got {req.max_tokens}.", "max_tokens")
    if req.seed is not None and not _INT64_MIN <= req.seed <= _INT64_MAX:
        raise BadRequestError("seed must fit in a signed 64-bit integer.", "seed")
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
            raise BadRequestError(
                f"max_completion_tokens must be at least 1, got {req.max_completion_tokens}.",
                "max_completion_tokens",
            )
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise BadRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}].", "top_logprobs")
            if not req.logprobs and req.top_logprobs > 0:
                raise BadRequestError(
                    "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
                )
    else:
        prompt = req.prompt
        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        if batch and len(prompt) > MAX_PROMPTS:
            raise BadRequestError(
                f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompt)}.", "prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise BadRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}.", "logprobs")
        if req.suffix:
            # As vLLM: no fill-in-the-middle templates, so a suffix cannot be honoured.
            raise BadRequestError("suffix is not currently supported.", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise BadRequestError("best_of is not supported (it must equal n).", "best_of")


def requested_max_tokens(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, param: str, default: int | None = None
) -> int:
    """max_tokens for one prompt; a request that cannot fit the context is rejected (vLLM's words).
    Unset, it is the rest of the context, capped by the model's `default` (max_new_tokens) as vLLM."""
    if prompt_len >= max_model_len:
        raise BadRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request "
            f"has {prompt_len} input tokens. Please reduce the length of the input messages.",
            param,
        )
    if requested is None:
        rest = max_model_len - prompt_len
        return rest if default is None else min(rest, default)
    if prompt_len + requested > max_model_len:
        raise BadRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the "
            f"completion). Please reduce the length of the messages or completion.",
            "max_tokens",
        )
    return requested


MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's `{"token id": bias}` → `{id: bias}`: ids in the vocabulary, biases in [-100, 100]."""
    if not bias:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequestError(
            f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(bias)}.", "logit_bias"
        )
    out = {}
    for key, value in bias.items():
        try:
            t = int(key)
        except ValueError:
            raise BadRequestError(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
        if not 0 <= t < vocab_size:
            raise BadRequestError(
                f"logit_bias: token id {t} is out of vocabulary (size {vocab_size}).", "logit_bias"
            )
        if not -100 <= value <= 100:
            raise BadRequestError(f"logit_bias values must be in [-100, 100], got {value}.", "logit_bias")
        out[t] = float(value)
    return out


def build_params(
    req: CompletionRequest | ChatCompletionRequest,
    logprobs: int | None,
    vocab_size: int | None = None,
    defaults: dict | None = None,
    tool_constraint: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams (n kept; max_tokens filled in per prompt later). `vocab_size` is needed
    only for a request with logit_bias; `defaults` (the model's generation_config.json) fill
    the sampling fields the request leaves unset (max_tokens is resolve_max_tokens's)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields = {
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "max_tokens": requested_max_tokens(req),
        "min_tokens": req.min_tokens,
        "stop": stop,
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "logit_bias": parse_logit_bias(req.logit_bias, vocab_size or 0) if req.logit_bias else None,
        "structured_outputs": structured_outputs(req, tool_constraint),
    }
    for k, v in (defaults or {}).items():
        if k != "max_tokens" and fields.get(k) is None:
            fields[k] = v
    kwargs = {k: v for k, v in fields.items() if v is not None or k in ("seed", "max_tokens", "logprobs")}
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        # SamplingParams.validate() messages start with the parameter's name.
        param = message.split(" ", 1)[0] if message.split(" ", 1)[0] in kwargs else None
        raise BadRequestError(message, param) from None


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise BadRequestError(f"token id {t} is out of vocabulary (size {vocab_size}).", param)


def expand(
    request_id: str,
    prompts: list[list[int]],
    params: SamplingParams,
    max_tokens: list[int],
    reply_to: str,
    traceparent: str = "",
) -> list[GenerateRequest]:
    """n choices per prompt as independent engine requests `{id}-{index}`.

    Seeded choices get seed + i so the n choices of one prompt differ, while the same
    prompt and seed give the same choices whatever else is in the batch.
    """
    now = time.time()
    out = []
    n = params.n
    for p, (prompt, mt) in enumerate(zip(prompts, max_tokens, strict=True)):
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            try:
                child = msgspec.structs.replace(params, n=1, seed=seed, max_tokens=mt)
            except ValueError as e:  # e.g. min_tokens above the max_tokens filled in here
                raise BadRequestError(str(e), str(e).split(" ", 1)[0]) from None
            out.append(
                GenerateRequest(
                    req_id=f"{request_id}-{p * n + i}",
                    prompt_token_ids=prompt,
                    sampling_params=child,
                    reply_to=reply_to,
                    arrival_time=now,
                    traceparent=traceparent,
                )
            )
    return out
