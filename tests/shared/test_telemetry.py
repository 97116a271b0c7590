from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import GenAI, RequestSpans, extract_context, init_tracing, inject_traceparent


def _provider():
    exporter = InMemorySpanExporter()
    provider = init_tracing("test", None, processor=SimpleSpanProcessor(exporter), set_global=False)
    return provider, exporter


def test_traceparent_continues_the_trace():
    provider, exporter = _provider()
    tracer = provider.get_tracer("gateway")
    with tracer.start_as_current_span("gateway.request") as parent:
        tp = inject_traceparent()
    assert tp.startswith("00-") and len(tp.split("-")) == 4

    # Elsewhere (another process in real life): continue from the string alone.
    with tracer.start_as_current_span("scheduler.request", context=extract_context(tp)):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    child = spans["scheduler.request"]
    assert child.context.trace_id == parent.get_span_context().trace_id
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id


def test_no_traceparent_means_no_parent():
    assert inject_traceparent() == ""  # no current span
    assert extract_context("") is None
    ctx = extract_context("garbage")
    assert not trace.get_current_span(ctx).get_span_context().is_valid


def test_request_spans_carry_gen_ai_attributes():
    provider, exporter = _provider()
    with provider.get_tracer("gw").start_as_current_span("gw") as parent:
        tp = inject_traceparent()
    spans = RequestSpans(provider, "folio-scheduler", "folio.scheduler.request")
    spans.start("r1", tp, {GenAI.REQUEST_MAX_TOKENS: 8, GenAI.USAGE_INPUT_TOKENS: 5})
    spans.start("r2", "", {})  # untraced request: no span
    assert "r1" in spans and "r2" not in spans
    spans.end("r1", {GenAI.USAGE_OUTPUT_TOKENS: 8})
    spans.end("r2")
    [span] = [s for s in exporter.get_finished_spans() if s.name == "folio.scheduler.request"]
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes[GenAI.REQUEST_ID] == "r1"
    assert span.attributes[GenAI.REQUEST_MAX_TOKENS] == 8
    assert span.attributes[GenAI.USAGE_INPUT_TOKENS] == 5
    assert span.attributes[GenAI.USAGE_OUTPUT_TOKENS] == 8


def test_disabled_spans_are_noops():
    spans = RequestSpans(None, "x", "y")
    assert not spans.enabled
    spans.start("r", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", {})
    assert "r" not in spans
    spans.end("r")


def test_exporter_config_from_flag_and_standard_variables():
    from shared.telemetry import DEFAULT_EXPORT_TIMEOUT_S, exporter_config

    assert exporter_config(None, {}) is None  # nothing configured: nothing exported
    c = exporter_config("http://c:4318/v1/traces", {})
    assert (c.endpoint, c.protocol, c.timeout_s) == ("http://c:4318/v1/traces", "http/protobuf",
                                                     DEFAULT_EXPORT_TIMEOUT_S)
    # vLLM users pass the collector's root: the signal path is added for HTTP.
    assert exporter_config("http://c:4318", {}).endpoint == "http://c:4318/v1/traces"
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom"}
    assert exporter_config(None, env).endpoint == "http://t:4318/custom"  # as given
    assert exporter_config("http://flag:4318/v1/traces", env).endpoint == "http://flag:4318/v1/traces"
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318/", "OTEL_EXPORTER_OTLP_TIMEOUT": "5"}
    c = exporter_config(None, base)
    assert c.endpoint == "http://b:4318/v1/traces" and c.timeout_s is None  # the SDK reads the variable
    grpc = exporter_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4317",
                                  "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert (grpc.endpoint, grpc.protocol) == ("http://b:4317", "grpc")  # gRPC has no path
    assert exporter_config("http://c:4318", {"OTEL_SDK_DISABLED": "true"}) is None
    assert exporter_config("http://c:4318", {"OTEL_TRACES_EXPORTER": "none"}) is None
    try:
        exporter_config("http://c:4318", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
        raise AssertionError("http/json must be refused, not silently sent as protobuf")
    except ValueError as e:
        assert "http/json" in str(e)


def test_init_tracing_builds_the_configured_exporter():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert init_tracing("folio-gateway", None, set_global=False, env={}) is None
    for env, kind in (({}, Http), ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, Grpc)):
        provider = init_tracing("folio-gateway", "http://127.0.0.1:9", set_global=False, env=env)
        [processor] = provider._active_span_processor._span_processors
        assert isinstance(processor._batch_processor._exporter, kind)
        assert provider.resource.attributes["service.name"] == "folio-gateway"
        assert provider.resource.attributes["folio.component"] == "gateway"
        provider.shutdown()


def test_grpc_export_reaches_a_grpc_collector():
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: spans arrive at a real gRPC OTLP receiver."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    got: list = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (the service's method name)
            got.extend(s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        provider = init_tracing("folio-scheduler", None, set_global=False, env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
        with provider.get_tracer("t").start_as_current_span("over-grpc"):
            pass
        assert provider.force_flush(10_000)
        assert got == ["over-grpc"]
        provider.shutdown()
    finally:
        server.stop(None)


def test_otel_service_name_wins(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-prod")  # the SDK's Resource reads the process env
    provider = init_tracing("folio-gateway", "http://127.0.0.1:9", set_global=False)
    assert provider.resource.attributes["service.name"] == "llm-prod"
    assert provider.resource.attributes["folio.component"] == "gateway"
    provider.shutdown()
