"""OpenTelemetry tracing: one trace per request across gateway → scheduler → executor.

The gateway starts the request's span and sends its W3C `traceparent` with the request;
the scheduler and executors continue that trace with their own spans, carrying vLLM's
`gen_ai.*` attributes. Spans go to an OTLP/HTTP endpoint when one is configured, else a
provider with no processors drops them, and services build `RequestSpans(None, ...)` so
the per-token path pays nothing when tracing is off.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()


class GenAI:
    """Span attribute names (vLLM's SpanAttributes)."""

    REQUEST_ID = "gen_ai.request.id"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    REQUEST_TOP_P = "gen_ai.request.top_p"
    REQUEST_N = "gen_ai.request.n"
    RESPONSE_MODEL = "gen_ai.response.model"
    RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    LATENCY_E2E = "gen_ai.latency.e2e"


def init_tracing(
    service_name: str,
    otlp_endpoint: str | None = None,
    *,
    processor: SpanProcessor | None = None,
    set_global: bool = True,
) -> TracerProvider:
    """A tracer provider for this process.

    `otlp_endpoint` (e.g. http://collector:4318/v1/traces) adds a batching OTLP/HTTP
    exporter; `processor` adds any other (tests pass a SimpleSpanProcessor over an
    in-memory exporter). With neither, spans are created but exported nowhere.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter(endpoint=otlp_endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("exporting traces to %s", otlp_endpoint)
    if processor is not None:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def inject_traceparent(ctx: otel_context.Context | None = None) -> str:
    """The W3C traceparent of the current span (or of `ctx`); "" when there is none."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=ctx)
    return carrier.get("traceparent", "")


def extract_context(traceparent: str) -> otel_context.Context | None:
    """A context whose current span is the remote parent named by `traceparent` (None if empty)."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


class RequestSpans:
    """One open span per in-flight request, parented on the request's traceparent.

    Requests that arrive without a traceparent get no span (nobody is tracing them).
    Pass `provider=None` when nothing exports spans: then every method is a no-op.
    """

    def __init__(self, provider: TracerProvider | None, service_name: str, span_name: str) -> None:
        self.enabled = provider is not None
        self._tracer = provider.get_tracer(service_name) if provider is not None else None
        self._span_name = span_name
        self._spans: dict[str, trace.Span] = {}

    def start(self, req_id: str, traceparent: str, attributes: dict, start_time: float | None = None) -> None:
        if not self.enabled or not traceparent or self._tracer is None:
            return
        start_ns = int(start_time * 1e9) if start_time else None
        span = self._tracer.start_span(
            self._span_name,
            context=extract_context(traceparent),
            kind=trace.SpanKind.SERVER,
            attributes={GenAI.REQUEST_ID: req_id, **attributes},
            start_time=start_ns,
        )
        self._spans[req_id] = span

    def set(self, req_id: str, attributes: dict) -> None:
        span = self._spans.get(req_id)
        if span is not None:
            span.set_attributes(attributes)

    def end(self, req_id: str, attributes: dict | None = None, error: str = "") -> None:
        span = self._spans.pop(req_id, None)
        if span is None:
            return
        if attributes:
            span.set_attributes(attributes)
        if error:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end(end_time=time.time_ns())

    def end_all(self, error: str = "") -> None:
        for req_id in list(self._spans):
            self.end(req_id, error=error)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._spans
