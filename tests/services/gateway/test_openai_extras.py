"""logit_bias, chat echo, suffix and unsupported tool requests through the OpenAI SDK (real `folio serve`)."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MSGS = [{"role": "user", "content": "Name a fruit."}]


def _token(tokenizer, word: str) -> int:
    [t] = tokenizer.encode(word, add_special_tokens=False)
    return t


def _bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    return e.value


def test_logit_bias_plus_100_forces_a_token_with_n_and_streaming(client, server, tokenizer):
    t = _token(tokenizer, " banana")
    want = tokenizer.decode([t] * 3)
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=3, temperature=0, n=2, logit_bias={str(t): 100}
    )
    assert [c.text for c in out.choices] == [want, want]
    stream = client.chat.completions.create(
        model=server.model, messages=MSGS, max_tokens=3, temperature=0, stream=True, logit_bias={str(t): 100}
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want


def test_logit_bias_minus_100_on_the_greedy_token_changes_it(client, server, tokenizer):
    def first(bias):
        out = client.completions.create(
            model=server.model, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias=bias
        )
        return out.choices[0].text

    greedy = first(None)
    t = _token(tokenizer, greedy)
    assert tokenizer.decode([t]) == greedy
    assert first({str(t): -100}) not in ("", greedy)


@pytest.mark.parametrize(
    "bias, words",
    [
        ({"49152": 1}, "out of vocabulary"),
        ({"-1": 1}, "out of vocabulary"),
        ({"5": 101}, "[-100, 100]"),
        ({"x": 1}, "token ids"),
        ({str(i): 1 for i in range(301)}, "at most 300"),
    ],
)
def test_bad_logit_bias_is_a_400(client, server, bias, words):
    e = _bad_request(
        lambda: client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1, logit_bias=bias)
    )
    assert e.body["param"] == "logit_bias" and words in e.body["message"]


def test_chat_echo_prepends_the_final_assistant_message(client, server):
    msgs = [*MSGS, {"role": "assistant", "content": "My favourite fruit is"}]
    kw = dict(
        model=server.model,
        messages=msgs,
        max_tokens=4,
        temperature=0,
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True},
    )
    out = client.chat.completions.create(**kw)
    text = out.choices[0].message.content
    assert text.startswith("My favourite fruit is") and len(text) > len("My favourite fruit is")
    stream = client.chat.completions.create(**kw, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
    # The last message is the user's: nothing to echo.
    plain = client.chat.completions.create(
        model=server.model, messages=MSGS, max_tokens=4, temperature=0, extra_body={"echo": True}
    )
    assert not plain.choices[0].message.content.startswith("Name a fruit.")


def test_suffix_is_a_clear_400(client, server):
    e = _bad_request(
        lambda: client.completions.create(model=server.model, prompt=PROMPT, suffix="!", max_tokens=1)
    )
    assert e.body["param"] == "suffix" and "suffix is not currently supported" in e.body["message"]


F = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(
    "kw, param, words",
    [
        ({"tool_choice": "required"}, "tool_choice", "tool_choice needs `tools`"),
        (
            {"tools": [F], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
            "'g'",
        ),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "tools[0] must be"),
    ],
)
def test_tool_requests_we_cannot_honour_are_400s(client, server, kw, param, words):
    e = _bad_request(
        lambda: client.chat.completions.create(model=server.model, messages=MSGS, max_tokens=1, **kw)
    )
    assert e.body["param"] == param and words in e.body["message"], e.body
    ok = client.chat.completions.create(
        model=server.model, messages=MSGS, max_tokens=1, tools=[F], tool_choice="none"
    )
    assert ok.choices[0].finish_reason == "length" and ok.choices[0].message.tool_calls is None
