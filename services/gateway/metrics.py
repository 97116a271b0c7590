"""Prometheus metrics with vLLM's meanings under a `folio:` prefix.

Engine state (running/waiting requests, KV cache usage, prefix cache, preemptions,
speculative decoding counters) is owned by the schedulers: it is read from their
published EngineStats at scrape time and summed over engines. Request-level metrics
(tokens, finish reasons, latencies) are measured here, where the client's clock is.

NOTE: with n > 1, `prompt_tokens` counts the prompt once per choice, as vLLM does (each
of the n choices is its own request in vLLM's output processor, which adds that
request's prompt_len to the counter), while the response's `usage` counts it once.

Each app gets its own registry, so several apps (tests, replicas in one process) never
collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.protocol import EngineStats

# vLLM's buckets.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineStatsCollector(Collector):
    """Exposes the last EngineStats snapshot (set just before each scrape)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: list[EngineStats] = []

    def collect(self):
        labels, values = ["model_name"], [self.model_name]
        s = self.stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        total_blocks = sum(e.num_blocks for e in s)
        if total_blocks:
            usage = sum(e.kv_cache_usage * e.num_blocks for e in s) / total_blocks
        else:
            usage = sum(e.kv_cache_usage for e in s) / len(s) if s else 0.0
        yield gauge(
            "folio:num_requests_running",
            "Number of requests in model execution batches.",
            sum(e.num_running for e in s),
        )
        yield gauge(
            "folio:num_requests_waiting",
            "Number of requests waiting to be processed.",
            sum(e.num_waiting for e in s),
        )
        yield gauge("folio:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield counter(
            "folio:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            sum(e.prefix_cache_queries for e in s),
        )
        yield counter(
            "folio:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            sum(e.prefix_cache_hits for e in s),
        )
        yield counter(
            "folio:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            sum(e.num_preemptions for e in s),
        )
        yield counter(
            "folio:spec_decode_num_drafts",
            "Number of spec decoding drafts.",
            sum(e.spec_num_drafts for e in s),
        )
        yield counter(
            "folio:spec_decode_num_draft_tokens",
            "Number of draft tokens.",
            sum(e.spec_num_draft_tokens for e in s),
        )
        yield counter(
            "folio:spec_decode_num_accepted_tokens",
            "Number of accepted tokens.",
            sum(e.spec_num_accepted_tokens for e in s),
        )
        per_pos = CounterMetricFamily(
            "folio:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            labels=labels + ["position"],
        )
        width = max((len(e.spec_accepted_tokens_per_pos) for e in s), default=0)
        for pos in range(width):
            counts = (e.spec_accepted_tokens_per_pos for e in s)
            per_pos.add_metric(values + [str(pos)], sum(c[pos] for c in counts if pos < len(c)))
        yield per_pos


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.engine = EngineStatsCollector(model_name)
        r.register(self.engine)
        self.prompt_tokens = Counter(
            "folio:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "folio:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        ).labels(model_name)
        success = Counter(
            "folio:request_success",
            "Count of finished requests by finish reason.",
            labels + ["finished_reason"],
            registry=r,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.ttft = Histogram(
            "folio:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "folio:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "folio:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model_name)

    def finished(self, reason: str, e2e_s: float) -> None:
        self.success.get(reason, self.success["error"]).inc()
        self.e2e.observe(e2e_s)

    def render(self, stats: list[EngineStats]) -> bytes:
        self.engine.stats = stats
        return generate_latest(self.registry)
