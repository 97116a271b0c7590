"""Histogram buckets of folio's Prometheus metrics (vLLM v1's, so dashboards carry over),
and the accumulator a scheduler publishes its histograms with.

The scheduler measures a request's phases (queue, prefill, decode, inference) and each
step's size; gateways export them (services/gateway/metrics.py). Both sides take the
buckets from here, so a published count always lands in the bucket it was counted in.
"""

from __future__ import annotations

import bisect

from shared.protocol import HistogramCounts

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# Inter-token latency and time per output token.
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# End-to-end latency and the request phases (queue, prefill, decode, inference).
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


# The histograms a scheduler publishes in EngineStats.histograms: name → (buckets, help).
ENGINE_HISTOGRAMS: dict[str, tuple[tuple[float, ...], str]] = {
    "request_queue_time_seconds": (
        REQUEST_LATENCY_BUCKETS,
        "Histogram of time spent in WAITING phase for request (from the gateway's arrival "
        "to the first step that schedules it)."),
    "request_prefill_time_seconds": (
        REQUEST_LATENCY_BUCKETS,
        "Histogram of time spent in PREFILL phase for request (first scheduled to first token)."),
    "request_decode_time_seconds": (
        REQUEST_LATENCY_BUCKETS,
        "Histogram of time spent in DECODE phase for request (first token to last token)."),
    "request_inference_time_seconds": (
        REQUEST_LATENCY_BUCKETS,
        "Histogram of time spent in RUNNING phase for request (first scheduled to last token)."),
    "iteration_tokens_total": (
        ITERATION_TOKENS_BUCKETS,
        "Histogram of number of tokens per engine_step."),
}


class Histograms:
    """The scheduler's side: observations into fixed buckets, snapshotted for EngineStats."""

    def __init__(self, spec: dict[str, tuple[tuple[float, ...], str]] = ENGINE_HISTOGRAMS) -> None:
        self._buckets = {name: b for name, (b, _) in spec.items()}
        self._counts = {name: [0] * (len(b) + 1) for name, b in self._buckets.items()}
        self._totals = dict.fromkeys(self._buckets, 0.0)

    def observe(self, name: str, value: float) -> None:
        # Prometheus buckets are "le": a value equal to a bound belongs to that bucket.
        self._counts[name][bisect.bisect_left(self._buckets[name], value)] += 1
        self._totals[name] += value

    def snapshot(self) -> dict[str, HistogramCounts]:
        return {n: HistogramCounts(counts=list(c), total=self._totals[n]) for n, c in self._counts.items()}
