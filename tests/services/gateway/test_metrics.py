from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import NO_ENGINE, GatewayMetrics
from shared.metric_buckets import ENGINE_HISTOGRAMS, Histograms
from shared.protocol import EngineStats


def _series(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value, parsed as Prometheus parses it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_engine_series_per_engine():
    m = GatewayMetrics("m")
    h = Histograms()
    h.observe("request_queue_time_seconds", 0.4)
    h.observe("request_queue_time_seconds", 0.3)  # le="0.3" holds 0.3 (Prometheus buckets are <=)
    h.observe("iteration_tokens_total", 20000)  # past the last bound: +Inf only
    stats = [
        EngineStats(engine_id="a", num_running=2, num_waiting=1, kv_cache_usage=0.5, prefix_cache_queries=10,
                    prefix_cache_hits=4, num_preemptions=1, num_blocks=100, histograms=h.snapshot()),
        EngineStats(engine_id="b", num_running=3, kv_cache_usage=0.0, prefix_cache_queries=5, num_blocks=300,
                    stream_unclaimed=0),
    ]
    s = _series(m.render(stats).decode())
    a = (("engine", "a"), ("model_name", "m"))
    b = (("engine", "b"), ("model_name", "m"))
    assert s[("folio:num_requests_running", a)] == 2 and s[("folio:num_requests_running", b)] == 3
    assert s[("folio:num_requests_waiting", a)] == 1
    assert s[("folio:kv_cache_usage_perc", a)] == 0.5
    assert s[("folio:prefix_cache_queries_total", b)] == 5
    assert s[("folio:prefix_cache_hits_total", a)] == 4
    assert s[("folio:num_preemptions_total", a)] == 1
    q = "folio:request_queue_time_seconds"
    assert s[(q + "_count", a)] == 2 and abs(s[(q + "_sum", a)] - 0.7) < 1e-9
    assert s[(q + "_bucket", (("engine", "a"), ("le", "0.3"), ("model_name", "m")))] == 1
    assert s[(q + "_bucket", (("engine", "a"), ("le", "0.5"), ("model_name", "m")))] == 2
    it = "folio:iteration_tokens_total"
    assert s[(it + "_bucket", (("engine", "a"), ("le", "16384.0"), ("model_name", "m")))] == 0
    assert s[(it + "_bucket", (("engine", "a"), ("le", "+Inf"), ("model_name", "m")))] == 1
    assert (q + "_count", b) not in s  # an engine without the histogram (older scheduler): none
    assert set(ENGINE_HISTOGRAMS) == {"request_queue_time_seconds", "request_prefill_time_seconds",
                                      "request_decode_time_seconds", "request_inference_time_seconds",
                                      "iteration_tokens_total"}
    # The stream's backlog is not per engine: the freshest report (b's), once.
    assert s[("folio:num_requests_unclaimed", (("model_name", "m"),))] == 0  # -1 (unknown) skipped
    stats[0].stream_unclaimed, stats[0].timestamp = 5, 2.0
    stats[1].stream_unclaimed, stats[1].timestamp = 7, 1.0
    assert _series(m.render(stats).decode())[("folio:num_requests_unclaimed", (("model_name", "m"),))] == 5
    # No engine: no engine series (there is nothing to label them with).
    assert not [k for k in _series(m.render([]).decode()) if k[0] == "folio:num_requests_running"]
    # Not the lease holder (None): no engine series at all, not even the stream's backlog.
    assert not [k for k in _series(m.render(None).decode())
                if k[0] in ("folio:num_requests_running", "folio:num_requests_unclaimed")]


def test_request_metrics_and_separate_registries():
    a, b = GatewayMetrics("m", max_model_len=1024), GatewayMetrics("m")
    a.of("e0").prompt_tokens.inc(7)
    a.finished("stop", 0.2, num_prompt_tokens=7, num_generation_tokens=5, decode_s=0.4, max_tokens=5,
               engine="e0")
    a.finished("abort", 0.1)  # never reached an engine: no lengths, engine="none"
    a.finished("length", 0.3, num_prompt_tokens=3, num_generation_tokens=1, decode_s=0.0, max_tokens=1,
               engine="e1")
    a.of("e0").ttft.observe(0.05)
    s = _series(a.render(None).decode())
    e0, e1 = (("engine", "e0"), ("model_name", "m")), (("engine", "e1"), ("model_name", "m"))
    none = (("engine", NO_ENGINE), ("model_name", "m"))

    def ok(name, labels, reason):
        return (name, tuple(sorted(labels + (("finished_reason", reason),))))

    assert s[("folio:prompt_tokens_total", e0)] == 7
    assert s[ok("folio:request_success_total", e0, "stop")] == 1
    assert s[ok("folio:request_success_total", none, "abort")] == 1
    assert s[ok("folio:request_success_total", e1, "length")] == 1
    assert s[ok("folio:request_success_total", e1, "stop")] == 0  # every reason, from the start
    # Every request series has the same label names, whatever served the request.
    names = {k[0].rsplit("_bucket", 1)[0] for k in s}
    for (name, labels) in s:
        if name.startswith("folio:"):
            keys = {k for k, _ in labels} - {"le", "finished_reason"}
            assert keys == {"model_name", "engine"}, (name, labels)
    assert "folio:num_requests_running" not in names  # None: another gateway exports engines
    total = sum(v for (n, _), v in s.items() if n == "folio:e2e_request_latency_seconds_count")
    assert total == 3 and s[("folio:e2e_request_latency_seconds_count", none)] == 1
    assert s[("folio:time_to_first_token_seconds_count", e0)] == 1
    assert s[("folio:request_prompt_tokens_count", e0)] == 1
    assert s[("folio:request_prompt_tokens_count", e1)] == 1
    assert s[("folio:request_prompt_tokens_count", none)] == 0
    assert s[("folio:request_prompt_tokens_sum", e0)] + s[("folio:request_prompt_tokens_sum", e1)] == 10
    assert s[("folio:request_generation_tokens_sum", e0)] == 5
    # decode time over the tokens after the first; a one-token request has no such time.
    assert s[("folio:request_time_per_output_token_seconds_count", e0)] == 1
    assert s[("folio:request_time_per_output_token_seconds_count", e1)] == 0
    assert abs(s[("folio:request_time_per_output_token_seconds_sum", e0)] - 0.1) < 1e-9
    # Token-count buckets are vLLM's 1-2-5 series up to max_model_len.
    les = [dict(k[1])["le"] for k in s
           if k[0] == "folio:request_prompt_tokens_bucket" and ("engine", "e0") in k[1]]
    assert les[-2:] == ["1000.0", "+Inf"]
    # Before any request every request series is there, at 0, under engine="none".
    fresh = _series(b.render([]).decode())
    assert fresh[("folio:prompt_tokens_total", none)] == 0
    assert fresh[("folio:request_success_total", (("engine", NO_ENGINE), ("finished_reason", "length"),
                                                  ("model_name", "m")))] == 0
    assert [k for k in fresh if k[0] == "folio:prompt_tokens_total"] == [("folio:prompt_tokens_total", none)]
