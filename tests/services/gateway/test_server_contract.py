"""What the shared `folio serve` promises beyond single endpoints: the API key on every /v1
route, seeded streams whatever they are batched with, metric values (not just names), and
request fields that change what is generated or sent."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.services.gateway.http_util import metrics, request

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- API key
def test_api_key_guards_every_v1_route_and_only_those(server):
    chat = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    routes = [
        ("POST", "/v1/completions", {"model": server.model, "prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", chat),
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{server.model}", None),
    ]
    good = {"Authorization": f"Bearer {server.api_key}"}
    for method, path, body in routes:
        assert request(server.url, method, path, body) == 401, path
        assert request(server.url, method, path, body, {"Authorization": "Bearer wrong"}) == 401, path
        assert request(server.url, method, path, body, {"Authorization": server.api_key}) == 401, path
        assert request(server.url, method, path, body, good) == 200, path
    # Probes, scrapes and the tokenizer endpoints stay open (as in vLLM).
    for method, path, body in [
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/version", None),
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
    ]:
        assert request(server.url, method, path, body) == 200, path


# ---------------------------------------------------------------- seeded streams
SEEDED = [(f"Seeded story {i} begins:", 1000 + i) for i in range(4)]


async def _seeded(aclient, model: str, prompt: str, seed: int | None) -> str:
    r = await aclient.completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=1.0, top_p=0.95, seed=seed,
        extra_body={"ignore_eos": True},
    )
    return r.choices[0].text


async def test_seeded_streams_do_not_depend_on_the_batch(aclient, server):
    """Each seeded request of a concurrent mix (with unseeded ones) gives what it gives alone."""
    alone = [await _seeded(aclient, server.model, p, s) for p, s in SEEDED]
    noise = [_seeded(aclient, server.model, f"Unseeded noise {i}:", None) for i in range(4)]
    together = await asyncio.gather(*noise[:2], *(_seeded(aclient, server.model, p, s) for p, s in SEEDED),
                                    *noise[2:])
    assert together[2:6] == alone
    assert len(set(alone)) == len(alone)


# ---------------------------------------------------------------- metric values
def test_prompt_tokens_metric_counts_each_choice_as_vllm(client, server):
    """n=3: usage counts the prompt once (OpenAI), /metrics once per choice (vLLM: each of the
    n child requests is its own request in its output processor and adds its prompt_len)."""
    before = metrics(server.url)
    r = client.completions.create(model=server.model, prompt="Count me thrice", max_tokens=2, n=3, seed=1,
                                  extra_body={"ignore_eos": True})
    after = metrics(server.url)
    p = r.usage.prompt_tokens
    assert len(r.choices) == 3 and p > 0
    assert after["folio:prompt_tokens_total"] - before["folio:prompt_tokens_total"] == 3 * p
    assert after["folio:generation_tokens_total"] - before["folio:generation_tokens_total"] == 6
    assert after["folio:request_success_total:length"] - before["folio:request_success_total:length"] == 3


def test_latency_histogram_sums(client, server):
    """The sums are latencies of this request: within what the client measured, and TTFT plus
    the inter-token gaps make up the end-to-end time."""
    names = [f"folio:{n}_seconds_{s}" for n in ("time_to_first_token", "inter_token_latency",
                                                "e2e_request_latency") for s in ("sum", "count")]
    before = metrics(server.url)
    t0 = time.perf_counter()
    stream = client.completions.create(model=server.model, prompt="Time me", max_tokens=5, stream=True,
                                       extra_body={"ignore_eos": True})
    for _ in stream:
        pass
    wall = time.perf_counter() - t0
    after = metrics(server.url)
    d = {n: after[n] - before[n] for n in names}
    ttft, itl, e2e = (d[f"folio:{n}_seconds_sum"] for n in ("time_to_first_token", "inter_token_latency",
                                                              "e2e_request_latency"))
    assert d["folio:time_to_first_token_seconds_count"] == 1
    assert d["folio:inter_token_latency_seconds_count"] == 4
    assert d["folio:e2e_request_latency_seconds_count"] == 1
    print(f"client {wall:.3f}s, e2e {e2e:.3f}s, ttft {ttft:.3f}s, itl sum {itl:.3f}s")
    assert 0 < ttft < e2e <= wall
    assert 0 < itl < e2e
    assert ttft + itl == pytest.approx(e2e, abs=0.05)


# ---------------------------------------------------------------- request fields
def test_include_stop_str_in_output(client, server):
    base = dict(model=server.model, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = client.completions.create(**base).choices[0].text
    stop = full.strip().split()[1]
    cut = client.completions.create(**base, stop=[stop]).choices[0]
    kept = client.completions.create(**base, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert cut.finish_reason == kept.choices[0].finish_reason == "stop"
    assert stop not in cut.text
    assert kept.choices[0].text == cut.text + stop
    assert full.startswith(kept.choices[0].text)


def test_continue_final_message_and_chat_template_kwargs(client, server, tokenizer):
    convo = [{"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "My favourite is"}]

    cont = client.chat.completions.create(
        model=server.model, messages=convo, max_tokens=3, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    # The prompt ends inside the assistant's message (no end-of-turn, no new turn) ...
    text = tokenizer.apply_chat_template(convo, tokenize=False, continue_final_message=True,
                                         add_generation_prompt=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert cont.usage.prompt_tokens == len(ids) < n_tokens_of(tokenizer, convo, add_generation_prompt=True)
    # ... and the model continues it as a completion of those ids would.
    same = client.completions.create(model=server.model, prompt=ids, max_tokens=3, temperature=0)
    assert cont.choices[0].message.content == same.choices[0].text
    # chat_template_kwargs reach the template, after (so over) the request's own flags, as in vLLM.
    kw = client.chat.completions.create(
        model=server.model, messages=convo[:1], max_tokens=1,
        extra_body={"chat_template_kwargs": {"add_generation_prompt": False}},
    )
    plain = client.chat.completions.create(model=server.model, messages=convo[:1], max_tokens=1)
    assert plain.usage.prompt_tokens == n_tokens_of(tokenizer, convo[:1], add_generation_prompt=True)
    assert kw.usage.prompt_tokens == n_tokens_of(tokenizer, convo[:1], add_generation_prompt=False)
    assert kw.usage.prompt_tokens < plain.usage.prompt_tokens


def n_tokens_of(tokenizer, convo, **kw) -> int:
    text = tokenizer.apply_chat_template(convo, tokenize=False, **kw)
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_stats(client, server, endpoint):
    """stream_options.continuous_usage_stats: every chunk carries the usage so far (vLLM)."""
    kw = dict(model=server.model, max_tokens=4, stream=True, extra_body={"ignore_eos": True})

    def run(opts):
        if endpoint == "chat":
            return list(client.chat.completions.create(
                messages=[{"role": "user", "content": "Go"}], stream_options=opts, **kw))
        return list(client.completions.create(prompt="Go on", stream_options=opts, **kw))

    chunks = run({"include_usage": True, "continuous_usage_stats": True})
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert all(c.usage is not None for c in body)
    assert {c.usage.prompt_tokens for c in body} == {last.usage.prompt_tokens}
    counts = [c.usage.completion_tokens for c in body]
    assert counts == sorted(counts) and counts[-1] == 4
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in body)
    # Without it, only the final chunk has usage.
    *body, last = run({"include_usage": True})
    assert last.usage.completion_tokens == 4 and all(c.usage is None for c in body)
