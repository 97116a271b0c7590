"""POST /v1/responses through the OpenAI SDK's own Responses calls, against `folio serve`."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tests.services.gateway.conftest import MODEL

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]
MAX = 24
EVENTS = TypeAdapter(ResponseStreamEvent)
ORDER_HEAD = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
ORDER_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def _chat(client, messages, max_tokens=MAX):
    return client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens
    )


def _strict(event) -> None:
    """Validate (not just construct) the event against the SDK's types: every field right."""
    EVENTS.validate_python(event.model_dump(mode="json", exclude_unset=True, warnings=False))


def test_text_equals_chat_completions(client):
    resp = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input="Name three colours of the rainbow.",
        temperature=0,
        max_output_tokens=MAX,
    )
    chat = _chat(client, MESSAGES)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == chat.usage.total_tokens
    assert resp.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert resp.store is False


def test_message_items_equal_chat_completions(client):
    items = [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Name three colours"}]},
        {"role": "assistant", "content": "Which rainbow?"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "The usual one."}]},
    ]
    resp = client.responses.create(input=items, temperature=0, max_output_tokens=MAX, store=True)
    chat = _chat(
        client,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours"},
            {"role": "assistant", "content": "Which rainbow?"},
            {"role": "user", "content": "The usual one."},
        ],
    )
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.store is False  # accepted, not stored

    # Empty or neutral values of fields we do not support ask for nothing: accepted.
    neutral = client.responses.create(
        input=items, temperature=0, max_output_tokens=MAX, tools=[], tool_choice="auto", include=[]
    )
    assert neutral.output_text == resp.output_text


def test_max_output_tokens_is_incomplete(client):
    resp = client.responses.create(input="Tell me a long story.", temperature=0, max_output_tokens=3)
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3
    _strict_response(resp)


def _strict_response(resp) -> None:
    from openai.types.responses import Response

    Response.model_validate(resp.model_dump(mode="json", exclude_unset=True))


def test_stream_events_parse_in_order(client):
    kwargs = dict(
        instructions="You are terse.", input="Name three colours of the rainbow.", max_output_tokens=MAX
    )
    full = client.responses.create(temperature=0, **kwargs)
    events = list(client.responses.create(stream=True, temperature=0, **kwargs))
    for e in events:
        _strict(e)
    types = [e.type for e in events]
    assert types[:4] == ORDER_HEAD and types[-4:] == ORDER_TAIL
    deltas = types[4:-4]
    assert deltas and set(deltas) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == full.output_text == events[-4].text
    final = events[-1].response
    assert final.status == full.status
    assert final.output_text == text
    assert final.usage.input_tokens == full.usage.input_tokens
    assert final.usage.output_tokens == full.usage.output_tokens
    assert final.usage.total_tokens == full.usage.input_tokens + full.usage.output_tokens
    ids = {e.item_id for e in events if hasattr(e, "item_id")} | {events[2].item.id, final.output[0].id}
    assert len(ids) == 1


def test_sdk_stream_helper(client):
    with client.responses.stream(
        model=MODEL, input="Say hello.", temperature=0, max_output_tokens=MAX
    ) as stream:
        for e in stream:
            _strict(e)
        final = stream.get_final_response()
    full = client.responses.create(input="Say hello.", temperature=0, max_output_tokens=MAX)
    assert final.output_text == full.output_text
    assert final.usage.output_tokens == full.usage.output_tokens


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": 1}}}}, "text.format"),
        ({"text": {"stop": 1}}, "text"),
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": []}, "input"),
    ],
)
def test_unsupported_is_400(server, extra, param):
    body = {"model": server.model, "input": "hi", **extra}
    r = httpx.post(
        f"{server.url}/v1/responses",
        json=body,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_text_format_json_schema_constrains_the_output(client):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "colours": {
                "type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 3, "maxItems": 3
            }
        },
        "required": ["colours"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "colours", "schema": schema, "strict": True}
    resp = client.responses.create(
        model=MODEL, input=MESSAGES, max_output_tokens=64, temperature=0, text={"format": fmt}
    )
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "colours"
    obj = client.responses.create(
        model=MODEL, input=MESSAGES, max_output_tokens=32, temperature=0,
        text={"format": {"type": "json_object"}},
    )
    assert obj.output_text.startswith("{") and obj.text.format.type == "json_object"
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_previous_response_id_through_sdk(client):
    with pytest.raises(openai.BadRequestError, match="stores no responses"):
        client.responses.create(input="hi", previous_response_id="resp_abc")


def test_engine_failure_mid_stream_is_response_failed(monkeypatch):
    """FOLIO_FAULT_STEP=0:4: the executor fails its 4th step with work, after the first tokens
    went out: the stream ends with a response.failed event the SDK parses."""
    from openai import OpenAI

    from tests.services.gateway.conftest import run_server

    monkeypatch.setenv("FOLIO_FAULT_STEP", "0:4")
    with run_server() as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0, timeout=120)
        events = list(
            client.responses.create(model=MODEL, input="Count to ten.", stream=True, max_output_tokens=32)
        )
        for e in events:
            _strict(e)
        types = [e.type for e in events]
        assert types[:4] == ORDER_HEAD and "response.output_text.delta" in types
        assert types[-1] == "response.failed" and "response.completed" not in types
        assert events[-1].response.status == "failed"
        assert events[-1].response.error.code == "server_error" and events[-1].response.error.message
        # The server goes on serving.
        assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).usage.output_tokens == 2
