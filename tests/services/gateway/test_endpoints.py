"""/health, /v1/models, /tokenize, /detokenize, /version, /metrics on a real `folio serve`."""

from __future__ import annotations

import json

import pytest

from tests.services.gateway.http_util import get, metrics, raw_post, wait_metrics

pytestmark = pytest.mark.slow


def test_health_and_version_are_open(server):
    assert get(server.url, "/health")[0] == 200
    status, body = get(server.url, "/version")
    assert status == 200 and json.loads(body)["version"]


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert models[0].owned_by == "folio"
    assert models[0].model_extra["max_model_len"] == 1024
    assert client.models.retrieve(server.model).id == server.model


def test_tokenize_detokenize_round_trip(server, tokenizer):
    text = "Hello wörld 🙂 tokens"
    status, body = raw_post(server.url, "/tokenize", json.dumps({"prompt": text}).encode())
    assert status == 200
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    status, back = raw_post(server.url, "/detokenize", json.dumps({"tokens": body["tokens"]}).encode())
    assert status == 200 and back["prompt"] == text


def test_tokenize_messages_uses_chat_template(server, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    status, body = raw_post(server.url, "/tokenize", json.dumps({"messages": messages}).encode())
    assert status == 200
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=False)


def test_metrics_names_and_counters(client, server):
    before = metrics(server.url)
    for name in (
        "folio:num_requests_running",
        "folio:num_requests_waiting",
        "folio:kv_cache_usage_perc",
        "folio:prefix_cache_queries_total",
        "folio:prefix_cache_hits_total",
        "folio:num_preemptions_total",
        "folio:prompt_tokens_total",
        "folio:generation_tokens_total",
        "folio:request_success_total:length",
        "folio:time_to_first_token_seconds_count",
        "folio:inter_token_latency_seconds_count",
        "folio:e2e_request_latency_seconds_count",
    ):
        assert name in before, name
    r = client.completions.create(
        model=server.model, prompt="One two three", max_tokens=4, extra_body={"ignore_eos": True}
    )
    after = metrics(server.url)
    assert after["folio:prompt_tokens_total"] - before["folio:prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["folio:generation_tokens_total"] - before["folio:generation_tokens_total"] == 4
    assert after["folio:request_success_total:length"] - before["folio:request_success_total:length"] == 1
    assert (
        after["folio:time_to_first_token_seconds_count"] - before["folio:time_to_first_token_seconds_count"]
        == 1
    )
    assert (
        after["folio:inter_token_latency_seconds_count"] - before["folio:inter_token_latency_seconds_count"]
        == 3
    )
    # Engine counters arrive with its next stats (~0.5 s): the prompt was queried.
    queries = "folio:prefix_cache_queries_total"
    wait_metrics(server.url, lambda m: m[queries] - before[queries] == r.usage.prompt_tokens, what="a query")


def test_prefix_cache_hits_count_whole_cached_blocks(client, server):
    """Sent twice, a prompt of several blocks hits every whole block but the one holding its
    last token (block size 16, the default)."""
    # Words no other test sends, so nothing of it is cached yet.
    prompt = "Zebra quartz " + " ".join(f"w{i}x{i * 7}" for i in range(24))
    queries, hits = "folio:prefix_cache_queries_total", "folio:prefix_cache_hits_total"
    base = metrics(server.url)
    first = client.completions.create(model=server.model, prompt=prompt, max_tokens=1)
    p = first.usage.prompt_tokens
    assert p > 2 * 16, p
    m1 = wait_metrics(server.url, lambda m: m[queries] - base[queries] == p, what="the first query")
    assert m1[hits] == base[hits]
    second = client.completions.create(model=server.model, prompt=prompt, max_tokens=1)
    assert second.usage.prompt_tokens == p
    m2 = wait_metrics(server.url, lambda m: m[queries] - base[queries] == 2 * p, what="the second query")
    assert m2[hits] - m1[hits] == (p - 1) // 16 * 16
