"""Prometheus metrics with vLLM's v1 names and meanings under a `folio:` prefix.

Who exports what (docs/architecture.md, "Metrics", has the table): every series comes from
exactly one process, so a plain `sum` over gateways is the true value.

- Request series, labels `model_name, engine`: measured here, where the client's clock is,
  for the requests this gateway served, labelled with the engine that served each one
  (NO_ENGINE when none did): prompt/generation tokens, request_success by finished_reason,
  TTFT, inter-token latency, time per output token, e2e latency, prompt and generation
  lengths, max_tokens.
- Engine series, labels `model_name, engine`: owned by the schedulers, read from their
  published EngineStats at scrape time, and rendered only by the gateway holding the
  engine-metrics lease (engine_client.py; `render(None)` elsewhere): running/waiting
  requests, KV cache usage, prefix cache queries/hits, preemptions, spec decoding, tokens
  per step, the request phases only the scheduler sees (queue, prefill, decode, inference
  time), and `num_requests_unclaimed` (label `model_name`: requests in the shared stream
  no engine has claimed; engines claim only what they can run, so under overload the
  queue is there, not in num_requests_waiting).

- Admission series, label `model_name` (folio's own; vLLM has none): this gateway's
  requests refused before reaching an engine, `request_rejected` by `reason` (queue_full:
  the 429s past --max-num-queued-reqs/--max-num-queued-tokens; shutting_down: the 503s
  while draining), and `request_deadline_exceeded`, read at scrape time from the
  gateway's Admission (admission.py), which owns the counts.

NOTE: with n > 1, `prompt_tokens` counts the prompt once per choice, as vLLM does (each
of the n choices is its own request in vLLM's output processor, which adds that
request's prompt_len to the counter), while the response's `usage` counts it once.

Each app gets its own registry, so several apps (tests, replicas in one process) never
collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from services.gateway.admission import Admission
from shared.metric_buckets import (
    ENGINE_HISTOGRAMS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    buckets_1_2_5,
)
from shared.protocol import EngineStats, HistogramCounts

FINISH_REASONS = ("stop", "length", "abort", "error")
# The `engine` label of a request no engine sent anything (aborted or failed while queued).
NO_ENGINE = "none"
# Token-count buckets go up to max_model_len in vLLM; a gateway started without one uses this.
DEFAULT_MAX_MODEL_LEN = 131072

# Engine counters and gauges: (name, help, EngineStats field).
_ENGINE_GAUGES = (
    ("folio:num_requests_running", "Number of requests in model execution batches.", "num_running"),
    ("folio:num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
    ("folio:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
)
_ENGINE_COUNTERS = (
    ("folio:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries"),
    ("folio:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
     "prefix_cache_hits"),
    ("folio:num_preemptions", "Cumulative number of preemption from the engine.", "num_preemptions"),
    ("folio:spec_decode_num_drafts", "Number of spec decoding drafts.", "spec_num_drafts"),
    ("folio:spec_decode_num_draft_tokens", "Number of draft tokens.", "spec_num_draft_tokens"),
    ("folio:spec_decode_num_accepted_tokens", "Number of accepted tokens.", "spec_num_accepted_tokens"),
)


def _histogram_samples(buckets: tuple[float, ...], h: HistogramCounts) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs; a snapshot from a scheduler with other buckets (another
    version) is folded into +Inf rather than mislabelled."""
    out, running = [], 0
    if len(h.counts) == len(buckets) + 1:
        for bound, n in zip(buckets, h.counts, strict=False):
            running += n
            out.append((_le(bound), running))
    out.append(("+Inf", sum(h.counts)))
    return out


def _le(bound: float) -> str:
    # prometheus_client's own rendering of bucket bounds (1 → "1.0"), as its Histograms use.
    return floatToGoString(bound)


class EngineStatsCollector(Collector):
    """Exposes the engines' last EngineStats snapshots (set just before each scrape), one
    series per engine."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: list[EngineStats] | None = None  # None: another gateway exports them

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            return
        labels = ["model_name", "engine"]
        engines = sorted(self.stats, key=lambda e: e.engine_id)
        for name, doc, field in _ENGINE_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for e in engines:
                g.add_metric([self.model_name, e.engine_id], getattr(e, field))
            yield g
        for name, doc, field in _ENGINE_COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            for e in engines:
                c.add_metric([self.model_name, e.engine_id], getattr(e, field))
            yield c
        per_pos = CounterMetricFamily(
            "folio:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            labels=labels + ["position"],
        )
        for e in engines:
            for pos, n in enumerate(e.spec_accepted_tokens_per_pos):
                per_pos.add_metric([self.model_name, e.engine_id, str(pos)], n)
        yield per_pos
        # Not per engine: the shared stream's backlog, as the freshest report saw it.
        unclaimed = GaugeMetricFamily(
            "folio:num_requests_unclaimed",
            "Requests in the shared request stream that no engine has claimed yet.",
            labels=["model_name"],
        )
        reports = [e for e in engines if e.stream_unclaimed >= 0]
        if reports:
            freshest = max(reports, key=lambda e: e.timestamp)
            unclaimed.add_metric([self.model_name], freshest.stream_unclaimed)
        yield unclaimed
        for short, (buckets, doc) in ENGINE_HISTOGRAMS.items():
            h = HistogramMetricFamily(f"folio:{short}", doc, labels=labels)
            for e in engines:
                counts = e.histograms.get(short)
                if counts is not None:
                    h.add_metric([self.model_name, e.engine_id], _histogram_samples(buckets, counts),
                                 sum_value=counts.total)
            yield h


class AdmissionCollector(Collector):
    """This gateway's refusals and expired deadlines, as its Admission counted them."""

    def __init__(self, model_name: str, admission: Admission) -> None:
        self.model_name = model_name
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        rejected = CounterMetricFamily(
            "folio:request_rejected",
            "Requests refused before reaching an engine: queue_full (429), shutting_down (503).",
            labels=["model_name", "reason"],
        )
        for reason, n in sorted(self.admission.refused.items()):
            rejected.add_metric([self.model_name, reason], n)
        yield rejected
        expired = CounterMetricFamily(
            "folio:request_deadline_exceeded",
            "Requests aborted at their deadline (--request-timeout or the body's request_timeout).",
            labels=["model_name"],
        )
        expired.add_metric([self.model_name], self.admission.deadlines_exceeded)
        yield expired


class _PerEngine:
    """The request series of one (model_name, engine), bound once."""

    __slots__ = ("prompt_tokens", "generation_tokens", "success", "ttft", "itl", "tpot", "e2e",
                 "prompt_len", "generation_len", "max_tokens")


class GatewayMetrics:
    def __init__(self, model_name: str, max_model_len: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name", "engine"]
        self.engine = EngineStatsCollector(model_name)
        r.register(self.engine)
        lengths = buckets_1_2_5(max_model_len or DEFAULT_MAX_MODEL_LEN)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self._families = {
            "prompt_tokens": counter("folio:prompt_tokens", "Number of prefill tokens processed."),
            "generation_tokens": counter("folio:generation_tokens", "Number of generation tokens processed."),
            "ttft": histogram("folio:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS),
            "itl": histogram("folio:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS),
            "tpot": histogram("folio:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.",
                              TOKEN_LATENCY_BUCKETS),
            "e2e": histogram("folio:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS),
            "prompt_len": histogram("folio:request_prompt_tokens", "Number of prefill tokens processed.",
                                    lengths),
            "generation_len": histogram("folio:request_generation_tokens",
                                        "Number of generation tokens processed.", lengths),
            "max_tokens": histogram("folio:request_params_max_tokens",
                                    "Histogram of the max_tokens request parameter.", lengths),
        }
        self._success = Counter(
            "folio:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=r,
        )
        self._engines: dict[str, _PerEngine] = {}
        # Every request series exists from the start (at 0), before any engine answered.
        self.of(NO_ENGINE)

    def watch(self, admission: Admission) -> None:
        """Export this gateway's admission counts."""
        self.registry.register(AdmissionCollector(self.model_name, admission))

    def of(self, engine: str | None) -> _PerEngine:
        """The request series of the engine that served the request (NO_ENGINE: none did)."""
        engine = engine or NO_ENGINE
        bound = self._engines.get(engine)
        if bound is None:
            bound = _PerEngine()
            for attr, family in self._families.items():
                setattr(bound, attr, family.labels(self.model_name, engine))
            # Every finish reason from the start, so rates over reasons begin at 0.
            bound.success = {reason: self._success.labels(self.model_name, engine, reason)
                             for reason in FINISH_REASONS}
            self._engines[engine] = bound
        return bound

    def finished(
        self,
        reason: str,
        e2e_s: float,
        num_prompt_tokens: int | None = None,
        num_generation_tokens: int = 0,
        decode_s: float = 0.0,
        max_tokens: int | None = None,
        engine: str | None = None,
    ) -> None:
        """One request (one choice of n) finished. Lengths and time per output token are
        observed for requests whose prompt reached the engine (`num_prompt_tokens` given);
        time per output token needs two tokens (decode time / (tokens - 1), as vLLM)."""
        m = self.of(engine)
        m.success.get(reason, m.success["error"]).inc()
        m.e2e.observe(e2e_s)
        if num_prompt_tokens is None:
            return
        m.prompt_len.observe(num_prompt_tokens)
        m.generation_len.observe(num_generation_tokens)
        if max_tokens:
            m.max_tokens.observe(max_tokens)
        if num_generation_tokens > 1:
            m.tpot.observe(decode_s / (num_generation_tokens - 1))

    def render(self, stats: list[EngineStats] | None) -> bytes:
        """The registry; with the engines' stats only on the gateway that holds the
        engine-metrics lease (None elsewhere: no engine series at all)."""
        self.engine.stats = stats
        return generate_latest(self.registry)
