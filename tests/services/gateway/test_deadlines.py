"""Per-request deadlines (the body's `request_timeout`) on the shared `folio serve`: the request
is aborted, its KV blocks freed, and the client gets a 504 (an error event when streaming)."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.services.gateway.http_util import metrics, open_stream, wait_metrics

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}  # far longer than the deadline


def _idle(baseline_kv: float):
    return lambda m: (m["folio:num_requests_running"] == 0 and m["folio:num_requests_waiting"] == 0
                      and m["folio:kv_cache_usage_perc"] == pytest.approx(baseline_kv))


def test_non_streaming_deadline_is_504_and_frees_kv(client, server):
    baseline = metrics(server.url)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=900,
                                  temperature=0, extra_body={"ignore_eos": True, "request_timeout": 1.0})
    took = time.monotonic() - t0
    assert info.value.status_code == 504
    err = info.value.response.json()["error"]
    assert err["type"] == "TimeoutError" and err["code"] == 504 and "deadline of 1s" in err["message"]
    assert 1.0 <= took < 9.0, took  # 900 tokens would take over a minute; slack for a loaded box
    wait_metrics(server.url, _idle(baseline["folio:kv_cache_usage_perc"]), 30, "KV freed after the deadline")
    expired = "folio:request_deadline_exceeded_total"
    assert metrics(server.url)[expired] == baseline[expired] + 1


def test_streaming_deadline_ends_with_an_error_event_and_frees_kv(server):
    baseline = metrics(server.url)
    payload = {"model": server.model, "messages": [{"role": "user", "content": "Tell me a story."}],
               "stream": True, "request_timeout": 1.5, **LONG}
    t0 = time.monotonic()
    conn = open_stream(server.url, "/v1/chat/completions", payload, server.api_key)
    resp = conn.getresponse()
    assert resp.status == 200  # the stream had begun: the deadline can only be an event now
    events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    took = time.monotonic() - t0
    conn.close()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "TimeoutError" and error["code"] == 504
    assert any("choices" in json.loads(e) for e in events[:-2])  # tokens came before the deadline
    assert 1.5 <= took < 9.5, took
    wait_metrics(server.url, _idle(baseline["folio:kv_cache_usage_perc"]), 30, "KV freed after the deadline")
    expired = "folio:request_deadline_exceeded_total"
    assert metrics(server.url)[expired] == baseline[expired] + 1


def test_a_request_within_its_deadline_is_untouched(client, server):
    out = client.completions.create(model=server.model, prompt="Hi", max_tokens=3, temperature=0,
                                    extra_body={"request_timeout": 60})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
