"""POST /v1/chat/completions: messages → chat.completion (or chat.completion.chunk events)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from services.gateway.chat import content_text, render_chat
from services.gateway.generation import Generation, stream_usage_flags
from services.gateway.openai_protocol import ChatCompletionRequest
from services.gateway.requests import admit, check_model, require_engine
from services.gateway.sampling import (
    build_params,
    check_openai_ranges,
    requested_max_tokens,
    resolve_max_tokens,
)
from services.gateway.sse import event, stream_response, with_disconnect_abort
from services.gateway.state import GatewayState
from services.gateway.tool_stream import ToolStream
from services.gateway.tools import ToolPlan, tool_plan


async def create_chat_completion(state: GatewayState, req: ChatCompletionRequest, raw: Request) -> Response:
    check_model(state, req.model)
    check_openai_ranges(req)
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    tools = tool_plan(req, state.settings.tool_call_parser)
    if tools is not None and tools.mode == "none":
        tools = None  # the template still sees req.tools
    constraint = tools.constraint() if tools is not None else None
    params = build_params(req, top_k, state.vocab_size, state.sampling_defaults, constraint)
    prompt = render_chat(
        state.tokenizer,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        tools=req.tools,
        chat_template_kwargs=req.chat_template_kwargs,
    )
    max_model_len = await require_engine(state)
    default = state.sampling_defaults.get("max_tokens")
    max_tokens = [
        resolve_max_tokens(requested_max_tokens(req), len(prompt), max_model_len, "messages", default)
    ]
    admit([prompt], params.n, req.request_timeout)
    gen = Generation(
        state,
        f"chatcmpl-{uuid.uuid4().hex}",
        [prompt],
        params,
        max_tokens,
        raw.headers.get("traceparent", ""),
    )
    echo = echo_text(req)
    await gen.start()
    if req.stream:
        include_usage, continuous_usage = stream_usage_flags(req.stream_options)
        return stream_response(
            gen, lambda: _stream(state, gen, top_k, include_usage, continuous_usage, echo, tools)
        )
    return await with_disconnect_abort(raw, gen, _full(state, gen, top_k, echo, tools))


def echo_text(req: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's content when its role is the reply's role
    ("assistant" with a generation prompt, else the last message's own role), else ""."""
    if not req.echo or not req.messages:
        return ""
    last = req.messages[-1]
    role = "assistant" if req.add_generation_prompt else last.role
    return content_text(last, len(req.messages) - 1) if last.role == role else ""


async def _full(
    state: GatewayState, gen: Generation, top_k: int | None, echo: str, tools: ToolPlan | None
) -> Response:
    while not gen.done:
        await gen.next_update()
    choices = []
    for c in gen.choices:
        reply = tools.reply(c.text, c.finish_reason) if tools is not None else None
        message = {"role": "assistant", "content": echo + c.text}
        finish_reason = c.finish_reason
        if reply is not None:
            content, calls, finish_reason = reply
            message = {"role": "assistant", "content": content, "tool_calls": calls}
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": None if top_k is None else {"content": state.logprobs.chat(c.logprobs, top_k)},
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    body = {
        "id": gen.request_id,
        "object": "chat.completion",
        "created": gen.created,
        "model": state.model_name,
        "choices": choices,
        "usage": gen.usage(),
    }
    return JSONResponse(body)


async def _stream(
    state: GatewayState,
    gen: Generation,
    top_k: int | None,
    include_usage: bool,
    continuous_usage: bool,
    echo: str,
    tools: ToolPlan | None = None,
) -> AsyncIterator[bytes]:
    head = {
        "id": gen.request_id,
        "object": "chat.completion.chunk",
        "created": gen.created,
        "model": state.model_name,
    }

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        if continuous_usage:
            return event({**head, "choices": [choice], "usage": gen.choice_usage(gen.choices[index])})
        return event({**head, "choices": [choice]})

    # The role comes first, in a chunk of its own (as OpenAI and vLLM send it).
    yield b"".join(chunk(c.index, {"role": "assistant", "content": ""}) for c in gen.choices)
    if echo:  # as vLLM: the echoed content in a chunk of its own per choice
        yield b"".join(chunk(c.index, {"content": echo}) for c in gen.choices)
    calls = None if tools is None else ToolStream(tools)
    buf: list[bytes] = []
    while not gen.done:
        u = await gen.next_update()
        if u.text or u.finished or u.logprobs:
            c = u.choice
            lp = None if top_k is None else {"content": state.logprobs.chat(u.logprobs, top_k)}
            if calls is not None:
                delta = calls.delta(c)
                if delta or lp is not None:
                    buf.append(chunk(c.index, delta, lp))
                if u.finished:
                    delta, reason = calls.finish(c)
                    buf.append(chunk(c.index, delta, None, reason, c.stop_reason))
            else:
                delta = {"content": u.text} if u.text or not u.finished else {}
                buf.append(chunk(c.index, delta, lp, c.finish_reason, c.stop_reason))
        if not gen.has_pending() and buf:
            yield b"".join(buf)
            buf.clear()
    if buf:
        yield b"".join(buf)
    if include_usage:
        yield event({**head, "choices": [], "usage": gen.usage()})
