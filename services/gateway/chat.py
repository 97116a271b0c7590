"""Chat messages → prompt token ids, through the tokenizer's own chat template."""

from __future__ import annotations

from services.gateway.errors import BadRequestError
from services.gateway.openai_protocol import ChatMessage


def content_text(msg: ChatMessage, i: int) -> str:
    content = msg.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else part.type
        if kind != "text":
            raise BadRequestError(
                f"messages[{i}]: only text content parts are supported, got {kind!r}.", "messages"
            )
        parts.append(part["text"] if isinstance(part, dict) else part.text)
    return "\n".join(parts)


def to_conversation(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise BadRequestError("messages must contain at least one message.", "messages")
    conv = []
    for i, m in enumerate(messages):
        d = {k: v for k, v in (m.model_extra or {}).items()}  # tool_calls, tool_call_id, ...
        d["role"] = m.role
        d["content"] = content_text(m, i)
        if m.name is not None:
            d["name"] = m.name
        conv.append(d)
    return conv


def render_chat(
    tokenizer,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    """Prompt token ids for a conversation (the template writes any special tokens itself)."""
    conv = to_conversation(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequestError("This model has no chat template; use /v1/completions.", "messages")
    # As vLLM: chat_template_kwargs go to the template last, so they may override the
    # request's own flags (e.g. {"add_generation_prompt": false}).
    kwargs: dict = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
    }
    if tools:
        kwargs["tools"] = tools
    kwargs.update(chat_template_kwargs or {})
    if kwargs["add_generation_prompt"] and kwargs["continue_final_message"]:
        raise BadRequestError(
            "add_generation_prompt and continue_final_message cannot both be true.", "continue_final_message"
        )
    try:
        text = tokenizer.apply_chat_template(conv, tokenize=False, **kwargs)
    except Exception as e:  # jinja errors: the template rejected this conversation
        raise BadRequestError(f"Cannot apply the chat template: {e}", "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        # Otherwise the engine rejects it and the client gets a 500 (found by the fuzz test).
        raise BadRequestError("The conversation renders to an empty prompt through the chat template: "
                              "it must contain at least one token.", "messages")
    return ids
