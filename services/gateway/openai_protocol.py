"""OpenAI request bodies (pydantic, as FastAPI validates them), with vLLM's extensions.

Fields follow the OpenAI API; vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens,
include_stop_str_in_output) ride in the same body (the SDK's `extra_body`). Unknown
fields are accepted and ignored, as vLLM does. Range checks that need the model (context
length, vocabulary) happen in `sampling.py`; responses are built as plain dicts on the
hot path (see `responses.py`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Base(BaseModel):
    # NaN/inf would slip through every range check (NaN < 0 is False).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Base):
    name: str | None = None
    description: str | None = None
    # "schema" would shadow a pydantic BaseModel attribute: stored under an alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class _SamplingRequest(_Base):
    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Output constraints (see structured.py); vLLM's guided_* fields ride in model_extra.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    # folio: this request's deadline in seconds (extra_body); it can only shorten the server's
    # --request-timeout. Past it the request is aborted with a 504 (an error event if streaming).
    request_timeout: float | None = None


class CompletionRequest(_SamplingRequest):
    # One prompt (text or token ids) or a batch of them.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextContent(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: str
    content: str | list[TextContent | dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM: prepend the last message's content to the reply when its role is the reply's.
    echo: bool = False


class TokenizeRequest(_Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)
