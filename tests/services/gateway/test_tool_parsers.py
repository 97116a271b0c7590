"""Tool-call parsers (tool_choice "auto") and the streaming split, on text: no model."""

from __future__ import annotations

import json

import pytest

from services.gateway.errors import BadRequestError
from services.gateway.generation import Choice
from services.gateway.openai_protocol import ChatCompletionRequest
from services.gateway.tool_parsers import HermesParser, Llama3JsonParser
from services.gateway.tool_stream import ToolStream
from services.gateway.tools import tool_plan

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_hermes_finds_every_call_and_the_content_before():
    text = (
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    )
    content, calls = HermesParser().parse(text)
    assert content == "Let me check.\n"
    assert [(n, json.loads(a)) for n, a in calls] == [("f", {"a": 1}), ("g", {})]
    assert HermesParser().parse("no calls here") is None
    assert HermesParser().parse("<tool_call>{not json</tool_call>") is None


def test_llama3_json_parses_whole_replies_only():
    _, calls = Llama3JsonParser().parse(
        '<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; {"name": "g", "parameters": {}}'
    )
    assert [(n, json.loads(a)) for n, a in calls] == [("f", {"x": "y"}), ("g", {})]
    assert Llama3JsonParser().parse('Sure: {"name": "f", "parameters": {}}') is None
    assert Llama3JsonParser().parse('{"answer": 42}') is None


def _stream(plan, pieces: list[str], finish: str = "stop") -> tuple[str, dict, str | None]:
    c = Choice(0, "r-0", [], detok=None)
    s, sent = ToolStream(plan), ""
    for p in pieces:
        c.text += p
        sent += s.delta(c).get("content", "")
    c.finish_reason = finish
    sent += s.delta(c).get("content", "")
    delta, reason = s.finish(c)
    return sent, delta, reason


def _auto(parser: str):
    return tool_plan(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=[TOOL]), parser)


def test_streaming_holds_back_a_possible_marker_and_sends_calls_whole():
    plan = _auto("hermes")
    sent, delta, reason = _stream(
        plan, ["Hi <tool", '_call>{"name": "f", ', '"arguments": {"a": 1}}</tool_call>']
    )
    assert sent == "Hi " and reason == "tool_calls"
    (call,) = delta["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["function"]["name"] == "f"
    assert json.loads(call["function"]["arguments"]) == {"a": 1}
    # Text that only looked like a marker's start goes out in the end, as content.
    sent, delta, reason = _stream(plan, ["a <tool", "box"])
    assert sent + delta["content"] == "a <toolbox" and reason == "stop"


def _named_deltas(pieces: list[str], finish: str) -> tuple[list[dict], str | None]:
    plan = tool_plan(
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "x"}],
            tools=[TOOL],
            tool_choice={"type": "function", "function": {"name": "f"}},
        )
    )
    c = Choice(0, "r-0", [], detok=None)
    s, deltas = ToolStream(plan), []
    for p in pieces:
        c.text += p
        deltas.append(s.delta(c))
    c.finish_reason = finish
    last, reason = s.finish(c)
    return [d for d in [*deltas, last] if d], reason


def test_a_named_call_streams_its_arguments_as_they_are_decoded():
    deltas, reason = _named_deltas(['{"a"', ":1,", '"b":[2]}'], "stop")
    calls = [d["tool_calls"][0] for d in deltas]
    assert reason == "tool_calls" and len(calls) == 3 and all(c["index"] == 0 for c in calls)
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "f"
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"a":1,"b":[2]}'
    # Cut by max_tokens: the partial arguments, "length" (the non-streamed reply says the same).
    deltas, reason = _named_deltas(['{"a"', ":1,"], "length")
    assert reason == "length"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"a":1,'


def test_auto_without_a_parser_is_a_400():
    with pytest.raises(BadRequestError, match="--tool-call-parser"):
        _auto(None)
