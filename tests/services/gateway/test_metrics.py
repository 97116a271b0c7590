from __future__ import annotations

from services.gateway.metrics import GatewayMetrics
from shared.protocol import EngineStats


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def test_engine_stats_summed_and_kv_usage_block_weighted():
    m = GatewayMetrics("m")
    stats = [
        EngineStats(
            engine_id="a",
            num_running=2,
            num_waiting=1,
            kv_cache_usage=0.5,
            prefix_cache_queries=10,
            prefix_cache_hits=4,
            num_preemptions=1,
            num_blocks=100,
        ),
        EngineStats(engine_id="b", num_running=3, kv_cache_usage=0.0, prefix_cache_queries=5, num_blocks=300),
    ]
    s = _series(m.render(stats).decode())
    assert s['folio:num_requests_running{model_name="m"}'] == 5
    assert s['folio:num_requests_waiting{model_name="m"}'] == 1
    assert s['folio:kv_cache_usage_perc{model_name="m"}'] == 0.125
    assert s['folio:prefix_cache_queries_total{model_name="m"}'] == 15
    assert s['folio:prefix_cache_hits_total{model_name="m"}'] == 4
    assert s['folio:num_preemptions_total{model_name="m"}'] == 1
    # No engine: zeros, not missing series.
    s = _series(m.render([]).decode())
    assert s['folio:num_requests_running{model_name="m"}'] == 0


def test_request_metrics_and_separate_registries():
    a, b = GatewayMetrics("m"), GatewayMetrics("m")
    a.prompt_tokens.inc(7)
    a.finished("stop", 0.2)
    a.ttft.observe(0.05)
    s = _series(a.render([]).decode())
    assert s['folio:prompt_tokens_total{model_name="m"}'] == 7
    assert s['folio:request_success_total{finished_reason="stop",model_name="m"}'] == 1
    assert s['folio:e2e_request_latency_seconds_count{model_name="m"}'] == 1
    assert s['folio:time_to_first_token_seconds_count{model_name="m"}'] == 1
    assert _series(b.render([]).decode())['folio:prompt_tokens_total{model_name="m"}'] == 0
