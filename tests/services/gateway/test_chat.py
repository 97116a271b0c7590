"""/v1/chat/completions through the OpenAI SDK against a real `folio serve`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_non_streaming(client, server, tokenizer):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=16, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt_ids, add_special_tokens=False))
    assert 1 <= r.usage.completion_tokens <= 16


def test_chat_streaming_matches_non_streaming(client, server):
    kw = dict(model=server.model, messages=MESSAGES, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_logprobs(client, server):
    r = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
        # Greedy: the sampled token is the most likely one.
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
    assert "".join(i.token for i in content) == r.choices[0].message.content


def test_chat_content_parts_and_n(client, server, tokenizer):
    r = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        max_tokens=4,
        n=2,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 8
    # The part's text reached the prompt: the same tokens as the message as a plain string
    # (counted once for the n choices, as OpenAI's usage does).
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                         tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_max_completion_tokens(client, server):
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_completion_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_a_conversation_that_renders_to_no_tokens_is_a_400():
    """Found by the fuzz test (tests/chaos/test_fuzz.py): a template that renders nothing
    for a message without content gave an empty prompt, which the engine rejected: a 500."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from services.gateway.chat import render_chat
    from services.gateway.errors import BadRequestError
    from services.gateway.openai_protocol import ChatCompletionRequest

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] or '' }}{% endfor %}"
    empty = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": ""}])
    with pytest.raises(BadRequestError) as e:
        render_chat(fast, empty.messages)
    assert (e.value.status, e.value.param) == (400, "messages")
    hi = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert render_chat(fast, hi.messages) == [1]
