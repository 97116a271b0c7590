"""The gateway's request spans: the root of each request's trace.

With an OTLP endpoint, each HTTP request gets a span (continuing the client's
`traceparent` header when there is one) whose context rides to the scheduler and
executors in GenerateRequest.traceparent. Without one, no span is made and an incoming
traceparent is simply passed along.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor

from shared.telemetry import GenAI, extract_context, init_tracing, inject_traceparent


class GatewayTracer:
    def __init__(self, otlp_endpoint: str | None, processor: SpanProcessor | None = None) -> None:
        """`processor`: an extra span processor (tests pass one over an in-memory exporter)."""
        self.provider = None
        if otlp_endpoint or processor is not None:
            self.provider = init_tracing(
                "folio-gateway", otlp_endpoint, processor=processor, set_global=False
            )
        self._tracer = self.provider.get_tracer("folio-gateway") if self.provider else None

    def start(self, request_id: str, incoming: str, attributes: dict) -> tuple[trace.Span | None, str]:
        """(span or None, the traceparent to send downstream)."""
        if self._tracer is None:
            return None, incoming
        span = self._tracer.start_span(
            "folio.gateway.request",
            context=extract_context(incoming),
            kind=trace.SpanKind.SERVER,
            attributes={GenAI.REQUEST_ID: request_id, **attributes},
        )
        return span, inject_traceparent(trace.set_span_in_context(span))

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
