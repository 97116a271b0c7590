"""`folio`: the command line.

    folio serve [MODEL]      everything in one command (private Redis + all services)
    folio gateway            OpenAI-compatible HTTP server        ┐ the entry points
    folio scheduler          one engine's batching loop           │ compose and k8s run
    folio engine             a scheduler + its executor ranks     │ (one engine per container/pod)
    folio executor           one tensor-parallel rank of an engine┘
    folio convert F.gguf DIR convert a GGUF file into a Hugging Face folder
    folio probe engine       liveness probe of one engine (exit 0: alive and making progress)

Heavy imports (torch, the gateway's web stack) happen inside the subcommand that needs
them, so `folio --help` is instant and works even if one service module is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

from services.gateway.tool_parsers import PARSERS, auto_tool_parser
from shared.cli_args import (
    add_bus_args,
    add_engine_args,
    add_telemetry_args,
    engine_config_from_args,
)
from shared.health import DEFAULT_STALL_TIMEOUT_S
from shared.openmp import set_openmp_waits

set_openmp_waits()  # before torch loads (shared/openmp.py says why)

log = logging.getLogger("folio")

DEFAULT_MODEL = "smollm2-135m-instruct"


def _setup_logging() -> None:
    level = os.environ.get("FOLIO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _require_redis(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.redis_url:
        parser.error("--redis-url (or FOLIO_REDIS_URL) is required")


# ---------------------------------------------------------------------- subcommands
def _scheduler(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_redis(args, parser)
    from services.scheduler.service import serve
    from shared.bus import Bus
    from shared.telemetry import RequestSpans, init_tracing

    config = engine_config_from_args(args, DEFAULT_MODEL)
    # None unless the flag or the OTEL_* variables name a collector.
    provider = init_tracing("folio-scheduler", args.otlp_traces_endpoint)
    spans = RequestSpans(provider, "folio-scheduler", "folio.scheduler.request")
    bus = Bus(args.redis_url, args.redis_namespace)
    try:
        asyncio.run(serve(bus, args.engine_id, config, spans))
    finally:
        if provider is not None:
            provider.shutdown()  # flush spans still in the batch
    return 0


def _executor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_redis(args, parser)
    from services.executor.service import serve
    from shared.bus import Bus
    from shared.telemetry import RequestSpans, init_tracing

    config = engine_config_from_args(args, DEFAULT_MODEL)
    if not 0 <= args.tp_rank < config.tensor_parallel_size:
        parser.error(f"--tp-rank {args.tp_rank} is outside --tensor-parallel-size "
                     f"{config.tensor_parallel_size}")
    # None unless the flag or the OTEL_* variables name a collector.
    provider = init_tracing("folio-executor", args.otlp_traces_endpoint)
    spans = RequestSpans(provider, "folio-executor", "folio.executor.request")
    bus = Bus(args.redis_url, args.redis_namespace)
    try:
        return asyncio.run(serve(bus, args.engine_id, args.tp_rank, config, spans))
    finally:
        if provider is not None:
            provider.shutdown()


def _check_tool_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        auto_tool_parser(args)
    except ValueError as e:
        parser.error(str(e))


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from services.serve import serve

    _check_tool_args(args, parser)
    config = engine_config_from_args(args, DEFAULT_MODEL)
    return serve(args, config)


def _engine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_redis(args, parser)
    from services.serve import run_engine

    return run_engine(args, engine_config_from_args(args, DEFAULT_MODEL))


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from services.executor.loader import ModelSourceError, convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out_dir)
    except ModelSourceError as e:
        print(f"folio convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.gguf} -> {out}")
    return 0


def _probe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _require_redis(args, parser)
    if args.stall_timeout <= 0:
        parser.error("--stall-timeout must be > 0 seconds")
    from services.probe import probe_engine

    return probe_engine(args.redis_url, args.redis_namespace, args.engine_id, args.stall_timeout,
                        args.state_file)


def _gateway(argv: list[str]) -> int:
    # Imported only here: the gateway pulls in the web stack, and `folio --help` must work without it.
    from services.gateway import server

    parser = argparse.ArgumentParser(prog="folio gateway", description="OpenAI-compatible HTTP gateway")
    server.add_cli_args(parser)
    args = parser.parse_args(argv)
    _check_tool_args(args, parser)
    result = server.run(args)
    return int(result or 0)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folio", description="folio: an LLM serving engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="start Redis, the scheduler, executors and the gateway in one command")
    add_engine_args(p, model_positional=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FOLIO_API_KEY"),
                   help="require this bearer token (env FOLIO_API_KEY)")
    p.add_argument("--engine-id", default="e0")
    p.add_argument("--tool-call-parser", choices=sorted(PARSERS), default=None,
                   help='parse tool calls out of free text, enabling tool_choice "auto"')
    p.add_argument("--max-request-body-size", type=int, default=None, metavar="BYTES",
                   help="the gateway answers 413 to a larger request body (default 16 MiB)")
    p.add_argument("--engine-stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="/health fails when an engine with requests has not finished a step for "
                   "this long (default 60)")
    p.add_argument("--enable-auto-tool-choice", action="store_true", default=False,
                   help="vLLM's flag for tool_choice \"auto\"; needs --tool-call-parser")
    add_bus_args(p)
    add_telemetry_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("scheduler", help="run one engine's scheduler (needs --redis-url)")
    p.add_argument("--engine-id", default=os.environ.get("FOLIO_ENGINE_ID", "e0"),
                   help="engine replica id shared with its executors")
    add_engine_args(p)
    add_bus_args(p)
    add_telemetry_args(p)
    p.set_defaults(func=_scheduler)

    p = sub.add_parser("engine", help="run one engine: a scheduler and its executor ranks (--redis-url)")
    p.add_argument("--engine-id", default=os.environ.get("FOLIO_ENGINE_ID") or socket.gethostname(),
                   help="engine replica id (default: env FOLIO_ENGINE_ID, else the host name)")
    add_engine_args(p)
    add_bus_args(p)
    add_telemetry_args(p)
    p.set_defaults(func=_engine)

    p = sub.add_parser("executor", help="run one tensor-parallel rank of an engine (needs --redis-url)")
    p.add_argument("--engine-id", default=os.environ.get("FOLIO_ENGINE_ID", "e0"))
    p.add_argument("--tp-rank", type=int, default=int(os.environ.get("FOLIO_TP_RANK", "0")))
    add_engine_args(p)
    add_bus_args(p)
    add_telemetry_args(p)
    p.set_defaults(func=_executor)

    # Parsed by the gateway's own parser (see _gateway); listed here for --help.
    sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway (see `folio gateway --help`)",
                   add_help=False)

    p = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face folder")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out_dir", help="output folder (config.json, model.safetensors, tokenizer)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("probe", help="health probes for the services that serve no HTTP")
    probes = p.add_subparsers(dest="probe", metavar="WHAT", required=True)
    p = probes.add_parser(
        "engine", help="exit 0 if the engine is alive and making progress, else 1 (reason on stderr)",
        description="An engine's liveness probe: fails when its heartbeat is missing, or when its "
        "last published stats show requests but are older than --stall-timeout (the gateways' "
        "/health decision). Redis unreachable: passes with a warning.")
    p.add_argument("--engine-id", default=os.environ.get("FOLIO_ENGINE_ID") or socket.gethostname(),
                   help="the engine to check (default: env FOLIO_ENGINE_ID, else the host name, "
                   "as `folio engine`)")
    p.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S, metavar="SECONDS",
                   help="fail when the engine has requests but no step finished for this long "
                   f"(default {DEFAULT_STALL_TIMEOUT_S:g}, as the gateways' --engine-stall-timeout)")
    p.add_argument("--state-file", default=None, metavar="PATH",
                   help="where the probe keeps the last stats it saw between runs (default: "
                   "a file in the temp folder named after the engine)")
    add_bus_args(p)
    p.set_defaults(func=_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] == "gateway":
        return _gateway(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
