from __future__ import annotations

import argparse

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.gateway.server import add_cli_args, settings_from_args
from services.gateway.tracing import GatewayTracer
from shared.cli_args import add_bus_args, add_engine_args

INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_without_tracing_the_client_traceparent_passes_through():
    span, tp = GatewayTracer(None).start("cmpl-1", INCOMING, {})
    assert span is None and tp == INCOMING


def test_gateway_span_continues_the_client_trace():
    exporter = InMemorySpanExporter()
    tracer = GatewayTracer(None, processor=SimpleSpanProcessor(exporter))
    span, tp = tracer.start("cmpl-1", INCOMING, {"gen_ai.request.choice.count": 2})
    assert tp.split("-")[1] == INCOMING.split("-")[1]  # same trace id
    assert tp.split("-")[2] != INCOMING.split("-")[2]  # our own span as the parent downstream
    tracer.end(span, {"gen_ai.usage.output_tokens": 5})
    (s,) = exporter.get_finished_spans()
    assert (
        s.attributes["gen_ai.request.id"] == "cmpl-1" and s.attributes["gen_ai.usage.output_tokens"] == 5
    )
    tracer.shutdown()


def test_gateway_flags_alone():
    p = argparse.ArgumentParser()
    add_cli_args(p)
    args = p.parse_args(
        [
            "--redis-url",
            "unix:///tmp/r.sock",
            "--redis-namespace",
            "ns",
            "--host",
            "127.0.0.1",
            "--port",
            "9001",
            "--api-key",
            "k",
            "--model",
            "/models/x",
            "--served-model-name",
            "smol",
            "--max-model-len",
            "512",
            "--allowed-origins",
            "http://a,http://b",
        ]
    )
    s = settings_from_args(args)
    assert (s.model, s.served_model_name, s.redis_url, s.redis_namespace) == (
        "/models/x",
        "smol",
        "unix:///tmp/r.sock",
        "ns",
    )
    assert (s.api_key, s.max_model_len, s.allowed_origins) == ("k", 512, ["http://a", "http://b"])
    assert s.gateway_id.startswith("gw-") and args.port == 9001


def test_gateway_flags_compose_with_a_parser_that_has_engine_and_bus_flags(monkeypatch):
    monkeypatch.delenv("FOLIO_API_KEY", raising=False)
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="::")
    add_engine_args(p)
    add_bus_args(p)
    add_cli_args(p)  # must not clash
    args = p.parse_args(["--redis-url", "redis://x", "--model", "m", "--gateway-id", "g1"])
    s = settings_from_args(args)
    assert s.model == "m" and s.gateway_id == "g1" and s.api_key is None and args.host == "::"


def test_api_key_defaults_to_folio_api_key_env(monkeypatch):
    monkeypatch.setenv("FOLIO_API_KEY", "from-env")
    p = argparse.ArgumentParser()
    add_cli_args(p)  # the default is read when the flag is defined
    assert settings_from_args(p.parse_args(["--redis-url", "redis://x"])).api_key == "from-env"
    flag = p.parse_args(["--redis-url", "redis://x", "--api-key", "flag"])
    assert settings_from_args(flag).api_key == "flag"
    monkeypatch.setenv("FOLIO_API_KEY", "")  # empty: no key
    p = argparse.ArgumentParser()
    add_cli_args(p)
    assert settings_from_args(p.parse_args(["--redis-url", "redis://x"])).api_key is None
