"""/v1/completions through the OpenAI SDK against a real `folio serve`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_non_streaming_usage_matches_tokenizer(client, server, tokenizer):
    r = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == server.model
    (c,) = r.choices
    assert c.text and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_respected_with_length(client, server):
    r = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_n2_logprobs3_echo(client, server, tokenizer):
    r = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=4,
        n=2,
        logprobs=3,
        echo=True,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    prompt_ids = tokenizer.encode(PROMPT)
    for c in r.choices:
        assert c.text.startswith(PROMPT) and len(c.text) > len(PROMPT)
        lp = c.logprobs
        assert len(lp.tokens) == len(prompt_ids) + 4
        assert lp.token_logprobs[: len(prompt_ids)] == [None] * len(prompt_ids)
        gen_lps = lp.token_logprobs[len(prompt_ids) :]
        assert all(isinstance(x, float) and x <= 0 for x in gen_lps)
        for entry, tok, x in zip(
            lp.top_logprobs[len(prompt_ids) :], lp.tokens[len(prompt_ids) :], gen_lps, strict=True
        ):
            assert 3 <= len(entry) <= 4  # top 3, plus the sampled token when outside them
            assert entry[tok] == pytest.approx(x)
        assert "".join(lp.tokens) == c.text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert r.usage.prompt_tokens == len(prompt_ids)  # n choices count the prompt once
    assert r.usage.completion_tokens == 8


def test_seeded_choices_differ_and_repeat(client, server):
    kw = dict(
        model=server.model,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=1.0,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choice i uses seed + i


def test_stop_string_ends_text_and_is_not_included(client, server):
    base = (
        client.completions.create(
            model=server.model,
            prompt="Count: 1, 2, 3,",
            max_tokens=20,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    # Stop on a piece of the greedy continuation that lies past its first few characters.
    stop = base[6:9]
    assert stop.strip(), base
    r = client.completions.create(
        model=server.model,
        prompt="Count: 1, 2, 3,",
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.text == base[: base.index(stop)]
    assert stop not in c.text
    assert r.usage.completion_tokens < 20


def test_streaming_text_equals_non_streaming(client, server):
    kw = dict(
        model=server.model, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(ch.id == chunks[0].id for ch in chunks)


def test_batch_prompts_and_token_id_prompts(client, server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=server.model, prompt=[PROMPT, "Hello"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert r.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Hello"))


def test_greedy_output_equals_in_process_engine(client, server):
    from services.engine import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    server_out = [
        client.completions.create(model=server.model, prompt=p, max_tokens=24, temperature=0).choices[0]
        for p in prompts
    ]
    llm = LLM(server.model, max_model_len=1024, dtype="float32")  # as the server (conftest)
    local = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    for s, lo in zip(server_out, local, strict=True):
        assert s.text == lo.outputs[0].text
        assert s.finish_reason == lo.outputs[0].finish_reason
