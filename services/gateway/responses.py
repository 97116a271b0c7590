"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat generation path.

    input (str | message items) + instructions ─▶ chat messages ─▶ render_chat ─▶ Generation
    non-streaming: one `response` object (output: one assistant message, one output_text)
    streaming:     response.created → response.in_progress → response.output_item.added →
                   response.content_part.added → response.output_text.delta … →
                   response.output_text.done → response.content_part.done →
                   response.output_item.done → response.completed (or response.failed)

Nothing is stored: as vLLM does when its response store is off, `store: true` is accepted
and answered with `"store": false`; `previous_response_id` (which needs a stored response)
is a 400. `text.format` json_object and json_schema constrain the output as
`response_format` does on chat completions (structured.py). Fields we cannot honour
(tools, reasoning, background mode, ...) are 400s naming the field, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from services.gateway.chat import render_chat
from services.gateway.errors import APIError, BadRequestError
from services.gateway.generation import Generation
from services.gateway.openai_protocol import ChatCompletionRequest, ChatMessage
from services.gateway.requests import admit, check_model, require_engine
from services.gateway.sampling import build_params, check_openai_ranges, resolve_max_tokens
from services.gateway.sse import dumps, with_disconnect_abort
from services.gateway.state import GatewayState

# vLLM's sampling extensions, passed through as on the other endpoints.
# (request_timeout is not sampling, but rides along the same way: the deadline, see admission.py.)
_EXTRA_SAMPLING = ("top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "request_timeout")
# Accepted and ignored (or echoed): they change nothing a stateless text model does.
_IGNORED = (
    "metadata",
    "user",
    "service_tier",
    "stream_options",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    truncation: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None


def _check_supported(req: ResponsesRequest) -> dict[str, Any]:
    """400 for what a stateless text-only server cannot do; returns the sampling extras."""
    if req.previous_response_id is not None:
        raise BadRequestError(
            "previous_response_id is not supported: this server stores no responses (store is "
            "always false); send the whole conversation in `input` instead.",
            "previous_response_id",
        )
    if req.tools:
        raise BadRequestError("tools are not supported by /v1/responses on this server.", "tools")
    if req.tool_choice not in (None, "auto", "none"):
        raise BadRequestError("tool_choice is not supported (there are no tools).", "tool_choice")
    if set(req.text or {}) - {"format", "verbosity"}:
        raise BadRequestError("text: only format and verbosity are supported.", "text")
    if req.truncation not in (None, "disabled"):
        raise BadRequestError("truncation 'auto' is not supported.", "truncation")
    if req.background:
        raise BadRequestError("background mode is not supported (nothing is stored).", "background")
    extras = {}
    for key, value in (req.model_extra or {}).items():
        if key in _EXTRA_SAMPLING:
            extras[key] = value
        elif key not in _IGNORED and value not in (None, [], {}):  # empty: nothing asked
            raise BadRequestError(f"{key} is not supported by /v1/responses on this server.", key)
    return extras


def text_format(req: ResponsesRequest) -> dict[str, Any]:
    """`text.format` (text, json_object, or json_schema with name/schema/strict at its top
    level, as the Responses API spells it)."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequestError(
            "text.format.type must be 'text', 'json_object' or 'json_schema'.", "text.format"
        )
    if kind == "json_schema" and not isinstance(fmt.get("schema"), dict):
        raise BadRequestError('text.format of type "json_schema" needs a schema object.', "text.format")
    return fmt


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """The chat completions `response_format` for a Responses `text.format`."""
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    schema.setdefault("name", "response")
    return {"type": "json_schema", "json_schema": schema}


def _item_text(item: dict[str, Any], i: int) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequestError(f"input[{i}].content must be a string or a list of text parts.", "input")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRequestError(
                f"input[{i}]: only input_text/output_text content parts are supported, got {kind!r}.", "input"
            )
        parts.append(str(part.get("text", "")))
    return "\n".join(parts)


def to_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """instructions (a system message, first) + input as chat messages."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        return [*messages, ChatMessage(role="user", content=req.input)]
    if not req.input:
        raise BadRequestError("input must not be empty.", "input")
    for i, item in enumerate(req.input):
        if item.get("type", "message") != "message" or "role" not in item:
            raise BadRequestError(
                f"input[{i}]: only message items (role + content) are supported, got {item.get('type')!r}.",
                "input",
            )
        role = item["role"]
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequestError(f"input[{i}]: unknown role {role!r}.", "input")
        messages.append(
            ChatMessage(role="system" if role == "developer" else role, content=_item_text(item, i))
        )
    return messages


async def create_response(state: GatewayState, req: ResponsesRequest, raw: Request) -> Response:
    check_model(state, req.model)
    extras = _check_supported(req)
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise BadRequestError("max_output_tokens must be at least 1.", "max_output_tokens")
    chat = ChatCompletionRequest(
        messages=to_messages(req),
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        response_format=_response_format(text_format(req)),
        **extras,
    )
    check_openai_ranges(chat)
    # The model's generation_config.json defaults apply as on the other endpoints.
    try:
        params = build_params(chat, None, state.vocab_size, state.sampling_defaults)
    except BadRequestError as e:
        if e.param == "response_format":  # a bad schema: name the field this API has
            e.param = "text.format"
        raise
    prompt = render_chat(state.tokenizer, chat.messages)
    max_model_len = await require_engine(state)
    default = state.sampling_defaults.get("max_tokens")
    max_tokens = [resolve_max_tokens(req.max_output_tokens, len(prompt), max_model_len, "input", default)]
    admit([prompt], 1, chat.request_timeout)
    gen = Generation(
        state, f"resp_{uuid.uuid4().hex}", [prompt], params, max_tokens, raw.headers.get("traceparent", "")
    )
    await gen.start()
    shape = _Shape(state, req, gen)
    if req.stream:
        return StreamingResponse(
            _stream(shape, gen), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await with_disconnect_abort(raw, gen, _full(shape, gen))


class _Shape:
    """Builds the `response` object and its output message at each stage."""

    def __init__(self, state: GatewayState, req: ResponsesRequest, gen: Generation) -> None:
        self.state, self.req, self.gen = state, req, gen
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = time.time()

    def text_part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, status: str, parts: list[dict]) -> dict:
        return {"id": self.msg_id, "type": "message", "role": "assistant", "status": status, "content": parts}

    def response(self, status: str, output: list[dict], error: dict | None = None) -> dict:
        req, gen = self.req, self.gen
        incomplete = status == "incomplete"
        usage = None
        if status in ("completed", "incomplete"):
            p, c = gen.prompt_tokens, gen.completion_tokens
            usage = {
                "input_tokens": p,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": c,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": p + c,
            }
        return {
            "id": gen.request_id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": time.time() if usage else None,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata,
            "model": self.state.model_name,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "store": False,
            "temperature": gen.params.temperature,
            "top_p": gen.params.top_p,
            "text": {"format": text_format(req)},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "user": req.model_extra.get("user") if req.model_extra else None,
            "usage": usage,
        }

    def final_status(self) -> str:
        return "incomplete" if self.gen.choices[0].finish_reason == "length" else "completed"


async def _full(shape: _Shape, gen: Generation) -> Response:
    while not gen.done:
        await gen.next_update()
    status = shape.final_status()
    text = gen.choices[0].text
    msg_status = "incomplete" if status == "incomplete" else "completed"
    return JSONResponse(shape.response(status, [shape.message(msg_status, [shape.text_part(text)])]))


async def _stream(shape: _Shape, gen: Generation) -> AsyncIterator[bytes]:
    seq = 0

    def ev(kind: str, **fields) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"

    where = {"item_id": shape.msg_id, "output_index": 0, "content_index": 0}
    error = ""
    try:
        yield ev("response.created", response=shape.response("in_progress", []))
        yield ev("response.in_progress", response=shape.response("in_progress", []))
        yield ev("response.output_item.added", output_index=0, item=shape.message("in_progress", []))
        yield ev("response.content_part.added", **where, part=shape.text_part(""))
        buf: list[bytes] = []
        while not gen.done:
            u = await gen.next_update()
            if u.text:
                buf.append(ev("response.output_text.delta", **where, delta=u.text, logprobs=[]))
            if not gen.has_pending() and buf:
                yield b"".join(buf)
                buf.clear()
        if buf:
            yield b"".join(buf)
        text = gen.choices[0].text
        status = shape.final_status()
        part = shape.text_part(text)
        item = shape.message("incomplete" if status == "incomplete" else "completed", [part])
        yield ev("response.output_text.done", **where, text=text, logprobs=[])
        yield ev("response.content_part.done", **where, part=part)
        yield ev("response.output_item.done", output_index=0, item=item)
        # Always response.completed (the SDK's stream helpers wait for it, and vLLM sends it),
        # with status "incomplete" inside when max_output_tokens cut the text.
        yield ev("response.completed", response=shape.response(status, [item]))
    except APIError as e:
        error = e.message
        failed = shape.response("failed", [], {"code": "server_error", "message": e.message})
        yield ev("response.failed", response=failed)
    finally:
        gen.close(error)
