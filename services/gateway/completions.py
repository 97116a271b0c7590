"""POST /v1/completions: prompts (text or token ids, one or a batch) → text_completion."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from services.gateway.errors import BadRequestError
from services.gateway.generation import Generation, Update, stream_usage_flags
from services.gateway.openai_protocol import CompletionRequest
from services.gateway.requests import admit, check_model, require_engine
from services.gateway.sampling import (
    build_params,
    check_openai_ranges,
    check_token_ids,
    requested_max_tokens,
    resolve_max_tokens,
)
from services.gateway.sse import event, stream_response, with_disconnect_abort
from services.gateway.state import GatewayState


def _prompts(state: GatewayState, prompt) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text where the client sent text."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise BadRequestError("prompt must not be empty.", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(state.tokenizer.encode(p))
            texts.append(p)
        else:
            check_token_ids(p, state.vocab_size, "prompt")
            ids.append(list(p))
            texts.append(None)
        if not ids[-1]:
            raise BadRequestError("The prompt is empty: it must contain at least one token.", "prompt")
    return ids, texts


async def create_completion(state: GatewayState, req: CompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    check_openai_ranges(req)
    params = build_params(req, req.logprobs, state.vocab_size, state.sampling_defaults)
    prompts, texts = _prompts(state, req.prompt)
    max_model_len = await require_engine(state)
    requested = requested_max_tokens(req)
    default = state.sampling_defaults.get("max_tokens")
    max_tokens = [resolve_max_tokens(requested, len(p), max_model_len, "prompt", default) for p in prompts]
    admit(prompts, params.n, req.request_timeout)
    gen = Generation(
        state, f"cmpl-{uuid.uuid4().hex}", prompts, params, max_tokens, raw.headers.get("traceparent", "")
    )
    # Echo: the prompt's text leads each choice (decoded when the prompt came as ids).
    echo = [
        (t if t is not None else state.decode_fn(p, False)) if req.echo else ""
        for p, t in zip(prompts, texts, strict=True)
    ]
    n = params.n
    await gen.start()
    if req.stream:
        return stream_response(gen, lambda: _stream(state, gen, req, echo, n))
    return await with_disconnect_abort(raw, gen, _full(state, gen, req, echo, n))


def _logprobs(
    state: GatewayState, gen: Generation, req: CompletionRequest, u: Update, echo_ids
) -> dict | None:
    if req.logprobs is None:
        return None
    c = u.choice
    out, c.text_offset = state.logprobs.completion(u.logprobs, req.logprobs, c.text_offset, echo_ids)
    return out


async def _full(
    state: GatewayState, gen: Generation, req: CompletionRequest, echo: list[str], n: int
) -> Response:
    while not gen.done:
        await gen.next_update()
    choices = []
    for c in gen.choices:
        prompt_idx = c.index // n
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = state.logprobs.completion(
                c.logprobs, req.logprobs, 0, c.prompt_ids if req.echo else None
            )
        choices.append(
            {
                "index": c.index,
                "text": echo[prompt_idx] + c.text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    body = {
        "id": gen.request_id,
        "object": "text_completion",
        "created": gen.created,
        "model": state.model_name,
        "choices": choices,
        "usage": gen.usage(),
    }
    return JSONResponse(body)


async def _stream(
    state: GatewayState, gen: Generation, req: CompletionRequest, echo: list[str], n: int
) -> AsyncIterator[bytes]:
    include_usage, continuous_usage = stream_usage_flags(req.stream_options)
    head = {
        "id": gen.request_id,
        "object": "text_completion",
        "created": gen.created,
        "model": state.model_name,
    }

    def chunk(index: int, text: str, logprobs, finish_reason, stop_reason=None) -> bytes:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        if continuous_usage:
            return event({**head, "choices": [choice], "usage": gen.choice_usage(gen.choices[index])})
        return event({**head, "choices": [choice]})

    if req.echo:
        for c in gen.choices:
            lp = None
            if req.logprobs is not None:
                lp, c.text_offset = state.logprobs.completion([], req.logprobs, 0, c.prompt_ids)
            yield chunk(c.index, echo[c.index // n], lp)
    buf: list[bytes] = []
    while not gen.done:
        u = await gen.next_update()
        if u.text or u.finished or u.logprobs:
            c = u.choice
            lp = _logprobs(state, gen, req, u, None)
            buf.append(chunk(c.index, u.text, lp, c.finish_reason, c.stop_reason))
        if not gen.has_pending() and buf:
            yield b"".join(buf)
            buf.clear()
    if buf:
        yield b"".join(buf)
    if include_usage:
        yield event({**head, "choices": [], "usage": gen.usage()})
