"""Forced tool calls (tool_choice "required" and a named function) through a real
`folio serve` and the OpenAI SDK: arguments validate against the tool's parameters,
streamed deltas reassemble to the non-streamed call, tool results render in the template;
tool_choice "auto" through the session server's hermes parser (SmolLM2 writes no calls of
its own: the parsers are tested on text in test_tool_parsers.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTIONS = ["What is the weather in Paris?", "What time is it in Berlin?", "Is it raining in Rome?"]


def _ask(client, server, q: str, **kw):
    kw = {"max_tokens": 60, **kw}
    return client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": q}], tools=TOOLS, temperature=0, **kw
    )


def _check(r, names) -> list[tuple[str, str]]:
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c.message.content
    calls = c.message.tool_calls
    assert calls and all(t.id.startswith("call_") and t.type == "function" for t in calls)
    for t in calls:
        assert t.function.name in names
        jsonschema.validate(json.loads(t.function.arguments), SCHEMAS[t.function.name])
    return [(t.function.name, t.function.arguments) for t in calls]


@pytest.mark.parametrize(
    "choice, names",
    [("required", set(SCHEMAS)), ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})],
)
def test_forced_calls_validate_and_stream_the_same(client, server, choice, names):
    for q in QUESTIONS:
        full = _check(_ask(client, server, q, tool_choice=choice), names)
        parts: dict[int, dict] = {}
        finish, num_deltas = None, 0
        for ch in _ask(client, server, q, tool_choice=choice, stream=True):
            if not ch.choices:
                continue
            finish = ch.choices[0].finish_reason or finish
            for d in ch.choices[0].delta.tool_calls or []:
                num_deltas += 1
                p = parts.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                p["id"] = p["id"] or d.id
                p["name"] += d.function.name or ""
                p["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls"
        assert [(p["name"], p["arguments"]) for _, p in sorted(parts.items())] == full
        assert all(p["id"].startswith("call_") for p in parts.values())
        if choice != "required":  # a named call's arguments stream as they are decoded
            assert num_deltas > 2


def test_one_call_without_parallel_tool_calls(client, server):
    r = _ask(
        client, server, "Weather in Paris and time in UTC?", tool_choice="required", parallel_tool_calls=False
    )
    assert len(_check(r, set(SCHEMAS))) == 1


def test_tool_results_render_through_the_chat_template(client, server, tokenizer):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
    }
    messages = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0)
    conv = [{**m, "content": m["content"] or ""} for m in messages]
    text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert "12:00" in text
    assert r.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def _stream_reply(client, server, q: str, **kw) -> tuple[str, list[tuple[str, str]], str | None]:
    text, parts, finish = [], {}, None
    for ch in _ask(client, server, q, stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        text.append(d.content or "")
        finish = ch.choices[0].finish_reason or finish
        for t in d.tool_calls or []:
            parts[t.index] = (t.function.name, t.function.arguments)
    return "".join(text), [parts[i] for i in sorted(parts)], finish


def test_auto_without_a_call_is_plain_text(client, server):
    r = _ask(client, server, "Say hello to my friend Bob.", max_tokens=12)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.message.content and c.finish_reason in ("stop", "length")
    text, calls, finish = _stream_reply(client, server, "Say hello to my friend Bob.", max_tokens=12)
    assert (text, calls, finish) == (c.message.content, [], c.finish_reason)



def test_auto_finds_a_hermes_call_in_the_models_text(client, server):
    """The whole "auto" path on a real reply: SmolLM2 does not choose to call tools by
    itself, so a regex constraint makes its text a Hermes-style call (with text before it);
    the server's --tool-call-parser hermes must find it, streamed and not."""
    regex = r'Checking\. <tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'
    kw = {"max_tokens": 60, "extra_body": {"structured_outputs": {"regex": regex}}}
    r = _ask(client, server, "What time is it in Berlin?", **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking. "
    ((name, args),) = [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert name == "get_time" and json.loads(args)["zone"] in ("UTC", "CET")
    text, calls, finish = _stream_reply(client, server, "What time is it in Berlin?", **kw)
    assert (text, calls, finish) == ("Checking. ", [(name, args)], "tool_calls")
