"""compose-check's collector stand-in (scripts/otlp_receiver.py) receives what folio's real
OTLP/HTTP exporter sends, and the check finds one trace across the three services."""

from __future__ import annotations

import importlib.util
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_standin_receives_one_trace_from_three_services():
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    receiver, cc = _load("otlp_receiver"), _load("compose_check")
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        def tracer(service: str):
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(SimpleSpanProcessor(
                OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces")))
            return provider.get_tracer("t")

        gw, sched, ex = (tracer(f"folio-{s}") for s in ("gateway", "scheduler", "executor"))
        with gw.start_as_current_span("chat m") as root:
            root.set_attribute("gen_ai.response.id", "chatcmpl-1")
            ctx = trace.set_span_in_context(root)
            with sched.start_as_current_span("folio.scheduler.request", context=ctx):
                pass
        # the executor's batch is missing: the trace is incomplete and the check says so
        with pytest.raises(AssertionError, match="folio-executor"):
            cc.trace_reached_standin(port, "chatcmpl-1", timeout=1.0)
        with ex.start_as_current_span("folio.executor.request", context=ctx):
            pass
        cc.trace_reached_standin(port, "chatcmpl-1", timeout=5)
        spans = {s["name"]: s for s in receiver.SPANS}
        assert spans["folio.executor.request"]["parent_span_id"] == spans["chat m"]["span_id"]
        assert len({s["trace_id"] for s in receiver.SPANS}) == 1
    finally:
        server.shutdown()
