"""Structured outputs through a real `folio serve` and the OpenAI SDK: every constrained
output parses and validates (jsonschema), regex and choice outputs match, constrained
requests leave their unconstrained batch-mates' greedy tokens alone, bad specs are 400s."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "city": {
                "type": "object",
                "properties": {
                    "name": NAME,
                    "population": {"type": "integer", "minimum": 1, "maximum": 10**9},
                },
                "required": ["name", "population"],
            }
        },
        "required": ["city"],
    },
    {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["temperature"],
    },
    {
        "type": "object",
        "properties": {"done": {"type": "boolean"}, "note": NAME},
        "required": ["done"],
    },
    {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -99, "maximum": 99},
                        "y": {"type": "integer", "minimum": -99, "maximum": 99},
                    },
                    "required": ["x", "y"],
                },
                "maxItems": 2,
            }
        },
        "required": ["points"],
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error"]},
            "code": {"type": "integer", "minimum": 100, "maximum": 599},
        },
        "required": ["status", "code"],
    },
    {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
        },
        "required": ["id", "score"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "first": NAME,
                    "last": NAME,
                    "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2},
                },
                "required": ["first", "roles"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
]
PROMPTS = [
    "Give me an example as JSON.",
    "Reply in JSON.",
    "Make up some data.",
    "JSON please:",
    "Fill this in.",
]


def _chat(client, server, content: str, max_tokens: int, **kw):
    return client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


async def test_fifty_json_schema_outputs_all_validate(aclient, server):
    jobs = [(s, p) for s in SCHEMAS for p in PROMPTS]
    assert len(jobs) == 50 and len(SCHEMAS) >= 10

    async def one(schema: dict, prompt: str):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return await _chat(aclient, server, prompt, 96, response_format=fmt)

    replies = await asyncio.gather(*(one(s, p) for s, p in jobs))
    bad = []
    for (schema, _), r in zip(jobs, replies, strict=True):
        c = r.choices[0]
        try:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            bad.append((c.message.content, repr(e)[:200]))
    assert not bad, bad
    await aclient.close()


async def test_regex_and_choice_outputs_match(aclient, server):
    regexes = [r"\d{3}-\d{4}", r"(yes|no), because [a-z ]{1,20}\.", r"[A-Z][a-z]{2,8}"]
    choices = ["Paris", "London", "Rome"]
    questions = ["Phone number?", "Is the sky green?", "A name?"]
    reg = [
        _chat(aclient, server, q, 24, extra_body={"structured_outputs": {"regex": rx}})
        for rx in regexes
        for q in questions
    ]
    cho = [_chat(aclient, server, q, 8, extra_body={"guided_choice": choices}) for q in questions]
    replies = await asyncio.gather(*reg, *cho)
    for i, r in enumerate(replies[: len(reg)]):
        assert re.fullmatch(regexes[i // len(questions)], r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"
    assert all(r.choices[0].message.content in choices for r in replies[len(reg) :])
    await aclient.close()


async def test_constraints_leave_unconstrained_greedy_tokens_alone(aclient, server):
    plain = ["Name three fruits.", "What is 2 + 2?", "Say hello."]
    alone = await asyncio.gather(*(_chat(aclient, server, p, 16) for p in plain))
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[0]}}
    mixed = await asyncio.gather(
        *(_chat(aclient, server, p, 16) for p in plain),
        *(_chat(aclient, server, p, 24, response_format=fmt) for p in PROMPTS[:3]),
        *(_chat(aclient, server, p, 8, extra_body={"guided_regex": "[a-z]+"}) for p in plain),
    )
    assert [r.choices[0].message.content for r in mixed[: len(plain)]] == [
        r.choices[0].message.content for r in alone
    ]
    await aclient.close()


@pytest.mark.parametrize(
    "extra, param, words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
            "nope",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
        ({"guided_grammar": 'root ::= "a" |'}, "guided_grammar", "grammar"),
        ({"guided_choice": []}, "guided_choice", "choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one"),
        ({"structured_outputs": {"json": "{", "x": 1}}, "structured_outputs", "unknown"),
    ],
)
def test_invalid_specs_are_400s(client, server, extra, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, server, "hi", 4, extra_body=extra)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err
