"""`folio gateway`: flags and the blocking uvicorn entry point.

python -m services.cli gateway --redis-url URL [--redis-namespace NS] [--host H] [--port P]
    [--api-key K] [--gateway-id G] [MODEL / --model M] [--served-model-name N] [--tokenizer T] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid

from services.gateway.state import GatewaySettings
from services.gateway.tool_parsers import PARSERS
from shared.cli_args import add_bus_args, add_engine_args, add_telemetry_args, model_from_args

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
        "--tool-call-parser",
        choices=sorted(PARSERS),
        default=None,
        help='parse tool calls out of free text, enabling tool_choice "auto" (see tool_parsers.py)',
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
        tool_call_parser=getattr(args, "tool_call_parser", None),
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    from services.gateway.app import build_app

    if not getattr(args, "redis_url", None):
        raise SystemExit("folio gateway: error: --redis-url (or FOLIO_REDIS_URL) is required")
    settings = settings_from_args(args)
    app = build_app(settings)
    log.info("gateway %s starting on http://%s:%d", settings.gateway_id, args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=getattr(args, "log_level", "info"),
        access_log=getattr(args, "access_log", False),
        timeout_graceful_shutdown=5,
    )
    return 0
