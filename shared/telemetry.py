"""OpenTelemetry tracing: one trace per request across gateway → scheduler → executor.

The gateway starts the request's span and sends its W3C `traceparent` with the request;
the scheduler and executors continue that trace with their own spans. Attributes follow
the OpenTelemetry GenAI semantic conventions (`gen_ai.*`, `GenAI` below); the scheduler's
span carries the request's life as events (queued, first scheduled, preempted, first
token, finished).

Export: OTLP over HTTP/protobuf (default) or gRPC, configured like any OpenTelemetry SDK
(`exporter_config` below reads `--otlp-traces-endpoint` and the standard `OTEL_*`
variables). Spans leave through a BatchSpanProcessor (a background thread with a bounded
queue; a full queue drops spans) and each export has a short timeout, so a collector that
is slow or gone never slows a request. With no endpoint there is no provider at all and
services build `RequestSpans(None, ...)`, so the per-token path pays nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()

# Seconds one export may take when OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT is not set (the SDK's
# default is 10). It bounds the exporter's retries too, and only ever blocks the batch
# thread, never a request; short means spans of a dead collector are dropped sooner and
# shutdown's final flush cannot hold a stopping process long.
DEFAULT_EXPORT_TIMEOUT_S = 2.0
PROTOCOLS = ("http/protobuf", "grpc")


class GenAI:
    """Span attribute names: the OpenTelemetry GenAI semantic conventions, plus vLLM's
    request id and latency attributes (which have no semconv equivalent)."""

    OPERATION_NAME = "gen_ai.operation.name"  # "chat" | "text_completion"
    SYSTEM = "gen_ai.system"
    REQUEST_MODEL = "gen_ai.request.model"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    REQUEST_TOP_P = "gen_ai.request.top_p"
    REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"  # n
    RESPONSE_ID = "gen_ai.response.id"
    RESPONSE_MODEL = "gen_ai.response.model"
    RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    # vLLM's (no semconv name): the engine's request id and its latency breakdown.
    REQUEST_ID = "gen_ai.request.id"
    LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    LATENCY_E2E = "gen_ai.latency.e2e"


class Event:
    """Span event names for a request's life (timestamps are when it happened)."""

    QUEUED = "queued"  # the scheduler took it from the request stream
    FIRST_SCHEDULED = "first_scheduled"  # its first step was planned
    PREEMPTED = "preempted"  # its blocks were freed; it will be recomputed
    FIRST_TOKEN = "first_token"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    endpoint: str
    protocol: str  # one of PROTOCOLS
    timeout_s: float | None  # None: the SDK reads OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT


def exporter_config(flag_endpoint: str | None, env: dict[str, str] | None = None) -> ExporterConfig | None:
    """Where to send spans, from `--otlp-traces-endpoint` and the standard variables; None:
    export nothing.

    Endpoint: the flag, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT
    (a base URL: /v1/traces is appended for HTTP, as the spec says). A signal endpoint
    without a path gets /v1/traces too for HTTP (vLLM users pass http://collector:4318).
    Protocol: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else
    http/protobuf. OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn export off.
    """
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported (use one of {', '.join(PROTOCOLS)})")
    endpoint = flag_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = False
    if not endpoint:
        endpoint, base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT"), True
    if not endpoint:
        return None
    if protocol == "http/protobuf":
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        path = urlsplit(endpoint).path
        if base or path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    has_timeout = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    return ExporterConfig(endpoint, protocol, None if has_timeout else DEFAULT_EXPORT_TIMEOUT_S)


def _exporter(cfg: ExporterConfig) -> SpanExporter:
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        # An http:// endpoint means plaintext, https:// TLS (the exporter reads the scheme).
        return GrpcExporter(endpoint=cfg.endpoint, timeout=cfg.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=cfg.endpoint, timeout=cfg.timeout_s)


def init_tracing(
    service_name: str,
    otlp_endpoint: str | None = None,
    *,
    processor: SpanProcessor | None = None,
    set_global: bool = True,
    env: dict[str, str] | None = None,
) -> TracerProvider | None:
    """A tracer provider for this process, or None when nothing would receive its spans.

    `otlp_endpoint` is `--otlp-traces-endpoint`; the OTEL_* variables complete it (see
    `exporter_config`). `processor` adds any other processor (tests pass a
    SimpleSpanProcessor over an in-memory exporter). `service_name` (folio-gateway, ...)
    is the default service.name; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win, as
    platform teams expect, and `folio.component` keeps the three services apart anyway.
    """
    cfg = exporter_config(otlp_endpoint, env)
    if cfg is None and processor is None:
        return None
    env = dict(os.environ) if env is None else env
    attrs = {"folio.component": service_name.removeprefix("folio-")}
    if not env.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = service_name
    provider = TracerProvider(resource=Resource.create(attrs))
    if cfg is not None:
        provider.add_span_processor(BatchSpanProcessor(_exporter(cfg)))
        log.info("exporting traces to %s (OTLP %s)", cfg.endpoint, cfg.protocol)
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

    def event(
        self, req_id: str, name: str, when: float | None = None, attributes: dict | None = None
    ) -> None:
        """Add an event (`Event.*`) at wall-clock time `when` (seconds; default now)."""
        span = self._spans.get(req_id)
        if span is not None:
            span.add_event(name, attributes or {}, timestamp=int(when * 1e9) if when else None)

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
