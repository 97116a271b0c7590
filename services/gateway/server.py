"""`folio gateway`: flags and the blocking uvicorn entry point.

python -m services.cli gateway --redis-url URL [--redis-namespace NS] [--host H] [--port P]
    [--api-key K] [--gateway-id G] [MODEL / --model M] [--served-model-name N] [--tokenizer T] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import uuid

import uvicorn

from services.gateway.state import GatewaySettings
from services.gateway.tool_parsers import PARSERS, auto_tool_parser
from shared.cli_args import add_bus_args, add_engine_args, add_telemetry_args, model_from_args
from shared.health import DEFAULT_STALL_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


def _has(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions  # argparse has no public lookup


def _origins(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return list(json.loads(value))
    return [v.strip() for v in value.split(",") if v.strip()]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Gateway flags; engine, bus and telemetry flags too unless the caller added them already.

    Every flag is added only if absent, so a caller's parser that already has some of
    them (say --host, or the engine flags) composes with this one without conflicts.
    """
    g = parser.add_argument_group("gateway")

    def add(flag: str, **kw) -> None:
        if not _has(parser, flag):
            g.add_argument(flag, **kw)

    add("--host", default="0.0.0.0")
    add("--port", type=int, default=8000)
    add(
        "--api-key",
        default=os.environ.get("FOLIO_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (env FOLIO_API_KEY)",
    )
    add(
        "--gateway-id",
        default=os.environ.get("FOLIO_GATEWAY_ID"),
        help="this replica's id on the bus (default: random; must be unique per replica)",
    )
    add(
        "--allowed-origins",
        type=_origins,
        default=[],
        help='CORS origins: a JSON list or comma-separated ("*" for any)',
    )
    add(
        "--resume-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a request whose engine failed waits to be resumed before it fails",
    )
    add(
        "--engine-metrics-lease-ttl",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="the lease that lets exactly one gateway export the engine series on /metrics: "
        "how long it outlives a holder that died (a stopping holder hands it over at once)",
    )
    add(
        "--tool-call-parser",
        choices=sorted(PARSERS),
        default=None,
        help='parse tool calls out of free text, enabling tool_choice "auto" (see tool_parsers.py)',
    )
    add(
        "--enable-auto-tool-choice",
        action="store_true",
        default=False,
        help="vLLM's flag for tool_choice \"auto\"; needs --tool-call-parser (which enables it by itself)",
    )
    add(
        "--max-request-body-size",
        type=int,
        default=16 * 1024 * 1024,
        metavar="BYTES",
        help="a larger request body gets a 413 (default 16 MiB)",
    )
    add(
        "--engine-stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        metavar="SECONDS",
        help="/health fails when an engine with requests has not finished a step for this long",
    )
    add("--access-log", action="store_true", help="log every HTTP request")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    if not _has(parser, "--max-model-len"):
        add_engine_args(parser, model_positional=True)
    if not _has(parser, "--redis-url"):
        add_bus_args(parser, required=True)
    if not _has(parser, "--otlp-traces-endpoint"):
        add_telemetry_args(parser)


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    model = model_from_args(args, DEFAULT_MODEL)
    return GatewaySettings(
        model=model,
        redis_url=args.redis_url,
        redis_namespace=getattr(args, "redis_namespace", "folio"),
        served_model_name=getattr(args, "served_model_name", None),
        tokenizer=getattr(args, "tokenizer", None),
        download_dir=getattr(args, "download_dir", None),
        load_format=getattr(args, "load_format", None) or "auto",
        gateway_id=getattr(args, "gateway_id", None) or f"gw-{uuid.uuid4().hex[:12]}",
        api_key=getattr(args, "api_key", None) or None,
        max_model_len=getattr(args, "max_model_len", None),
        allowed_origins=getattr(args, "allowed_origins", None) or [],
        otlp_traces_endpoint=getattr(args, "otlp_traces_endpoint", None),
        resume_timeout_s=getattr(args, "resume_timeout", None) or 30.0,
        generation_config=getattr(args, "generation_config", None) or "auto",
        tool_call_parser=auto_tool_parser(args),
        max_num_queued_reqs=getattr(args, "max_num_queued_reqs", None),
        max_num_queued_tokens=getattr(args, "max_num_queued_tokens", None),
        request_timeout_s=getattr(args, "request_timeout", None),
        shutdown_timeout_s=_or(getattr(args, "shutdown_timeout", None), 30.0),
        max_request_body_bytes=_or(getattr(args, "max_request_body_size", None), 16 * 1024 * 1024),
        engine_stall_timeout_s=_or(getattr(args, "engine_stall_timeout", None), DEFAULT_STALL_TIMEOUT_S),
        engine_metrics_lease_ttl_s=_or(getattr(args, "engine_metrics_lease_ttl", None), 10.0),
    )


def _or(value, default):
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (blocking)."""
    from services.gateway.app import build_app

    if not getattr(args, "redis_url", None):
        raise SystemExit("folio gateway: error: --redis-url (or FOLIO_REDIS_URL) is required")
    settings = settings_from_args(args)
    app = build_app(settings)
    log.info("gateway %s starting on http://%s:%d", settings.gateway_id, args.host, args.port)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=getattr(args, "log_level", "info"),
        access_log=getattr(args, "access_log", False),
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, app.state.drain).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before uvicorn's own shutdown.

    uvicorn on SIGTERM closes its listening socket at once: a load balancer that has not yet
    seen the pod leave would get connection errors. Here the socket stays open while the
    app drains (/ready 503, new requests 503, in-flight ones finish up to --shutdown-timeout,
    then end with an error); only then does uvicorn stop. A second signal stops at once.
    """

    def __init__(self, config, drain) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("signal %d: draining before shutdown", sig)
        # A signal handler: schedule the drain on the loop (this runs between its callbacks).
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True
