"""The gateway's request spans: the root of each request's trace.

With an OTLP endpoint (`--otlp-traces-endpoint` or OTEL_*), each HTTP request gets a span
(continuing the client's `traceparent` header when there is one) whose context rides to
the scheduler and executors in GenerateRequest.traceparent. Without one, no span is made and an incoming
traceparent is simply passed along.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor

from shared.telemetry import GenAI, extract_context, init_tracing, inject_traceparent


class GatewayTracer:
    def __init__(self, otlp_endpoint: str | None, processor: SpanProcessor | None = None) -> None:
        """`processor`: an extra span processor (tests pass one over an in-memory exporter)."""
        # None unless the flag or the OTEL_* variables name a collector (or a test's processor).
        self.provider = init_tracing("folio-gateway", otlp_endpoint, processor=processor, set_global=False)
        self._tracer = self.provider.get_tracer("folio-gateway") if self.provider else None

    def start(
        self, request_id: str, incoming: str, attributes: dict, name: str = "folio.gateway.request"
    ) -> tuple[trace.Span | None, str]:
        """(span or None, the traceparent to send downstream). GenAI spans are named
        "{gen_ai.operation.name} {gen_ai.request.model}" (e.g. "chat smollm2")."""
        if self._tracer is None:
            return None, incoming
        span = self._tracer.start_span(
            name,
            context=extract_context(incoming),
            kind=trace.SpanKind.SERVER,
            attributes={GenAI.REQUEST_ID: request_id, **attributes},
        )
        return span, inject_traceparent(trace.set_span_in_context(span))

    @staticmethod
    def event(span: trace.Span | None, name: str) -> None:
        if span is not None:
            span.add_event(name)

    @staticmethod
    def end(span: trace.Span | None, attributes: dict, error: str = "") -> None:
        if span is None:
            return
        span.set_attributes(attributes)
        if error:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
