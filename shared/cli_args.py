"""Command-line flags shared by `folio serve|scheduler|executor`, with vLLM's names.

Each engine flag maps 1:1 onto an EngineConfig field (`--max-model-len` → max_model_len),
so a vLLM command line carries over and a service can forward its flags to its children.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from shared.config import (
    ATTENTION_BACKENDS,
    DEVICES,
    DISTRIBUTED_BACKENDS,
    DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    ConfigError,
    EngineConfig,
)

log = logging.getLogger(__name__)

# vLLM flags users commonly pass that folio accepts and ignores (with a warning).
IGNORED_FLAGS = ("--trust-remote-code", "--disable-log-requests", "--disable-log-stats")
IGNORED_VALUE_FLAGS = ("--uvicorn-log-level", "--swap-space")

# EngineConfig fields set from flags (everything but `model` and `extra`).
ENGINE_FIELDS = (
    "tokenizer",
    "served_model_name",
    "dtype",
    "load_format",
    "device",
    "seed",
    "max_model_len",
    "block_size",
    "enable_prefix_caching",
    "kv_cache_space",
    "gpu_memory_utilization",
    "num_gpu_blocks_override",
    "max_num_seqs",
    "max_num_batched_tokens",
    "tensor_parallel_size",
    "data_parallel_size",
    "distributed_init_method",
    "distributed_backend",
    "step_timeout",
    "attention_backend",
    "enforce_eager",
    "cuda_graph_sizes",
    "download_dir",
    "skip_tokenizer_init",
    "generation_config",
    "speculative_config",
    "quantization",
    "max_num_queued_reqs",
    "max_num_queued_tokens",
    "request_timeout",
    "shutdown_timeout",
)


def add_engine_args(parser: argparse.ArgumentParser, *, model_positional: bool = False) -> None:
    """Engine flags. Defaults are None so EngineConfig's own defaults stay the single source."""
    g = parser.add_argument_group("engine")
    if model_positional:
        g.add_argument("model", nargs="?", default=None, help="model: bundled name, HF folder, GGUF file")
    g.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--dtype", choices=DTYPES, default=None)
    g.add_argument("--load-format", choices=LOAD_FORMATS, default=None)
    g.add_argument("--device", choices=DEVICES, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument(
        "--generation-config",
        default=None,
        metavar="auto|vllm|FOLDER",
        help="sampling defaults from the model's generation_config.json (auto), none (vllm), or a folder's",
    )
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None
    )
    g.add_argument("--kv-cache-space", type=float, default=None, help="GiB of KV cache on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    g.add_argument("--data-parallel-size", "-dp", type=int, default=None,
                   help="engine replicas sharing the request stream (folio serve starts them)")
    g.add_argument("--distributed-init-method", default=None, metavar="tcp://HOST:PORT",
                   help="rank 0's torch.distributed store (default: rendezvous through Redis)")
    g.add_argument("--distributed-backend", choices=DISTRIBUTED_BACKENDS, default=None,
                   help="auto: nccl on CUDA, gloo on CPU")
    g.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                   help="a step taking longer fails the engine (default 120)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None)
    g.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    g.add_argument(
        "--cuda-graph-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="decode batch sizes captured in CUDA graphs (default: 1 2 4 8 16 ... up to --max-num-seqs)",
    )
    g.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        'or \'{"model": "DRAFT", "num_speculative_tokens": 4}\'',
    )
    g.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATIONS,
        default=None,
        help="weights: gguf (a GGUF's packed tensors), int8/int4 (weight-only, at load), none (dense); "
        "default: per model",
    )
    g.add_argument("--max-num-queued-reqs", type=int, default=None, metavar="N",
                   help="gateway: past N requests waiting for their first token, new ones get 429 "
                   "with Retry-After (per gateway; default: no bound)")
    g.add_argument("--max-num-queued-tokens", type=int, default=None, metavar="N",
                   help="gateway: the same bound on the prompt tokens of those requests")
    g.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="default deadline of a request (a body's request_timeout may shorten it); "
                   "past it the request is aborted: 504, or an error event when streaming")
    g.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may finish before they are "
                   "ended with an error (default 30)")
    g.add_argument("--download-dir", default=None)
    g.add_argument("--skip-tokenizer-init", action="store_true", default=None)
    for flag in IGNORED_FLAGS:
        g.add_argument(flag, action="store_true", default=False, help=argparse.SUPPRESS)
    for flag in IGNORED_VALUE_FLAGS:
        g.add_argument(flag, default=None, help=argparse.SUPPRESS)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_bus_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    g = parser.add_argument_group("bus")
    env_url = os.environ.get("FOLIO_REDIS_URL")
    g.add_argument(
        "--redis-url",
        default=env_url,
        required=required and env_url is None,
        help="Redis URL (env FOLIO_REDIS_URL), e.g. redis://localhost:6379/0 or unix:///path/redis.sock",
    )
    g.add_argument("--redis-namespace", default=os.environ.get("FOLIO_REDIS_NAMESPACE", "folio"))


def add_telemetry_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otlp-traces-endpoint",
        default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        help="OTLP traces endpoint, e.g. http://collector:4318/v1/traces (env "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT as a base URL); "
        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc for gRPC (e.g. http://collector:4317); none: no export",
    )


def warn_ignored(args: argparse.Namespace) -> None:
    for flag in IGNORED_FLAGS + IGNORED_VALUE_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        if getattr(args, dest, None):
            log.warning("%s is accepted for vLLM compatibility and ignored", flag)


def model_from_args(args: argparse.Namespace, default: str | None = None) -> str | None:
    return getattr(args, "model_flag", None) or getattr(args, "model", None) or default


def engine_config_from_args(
    args: argparse.Namespace, default_model: str = "smollm2-135m-instruct"
) -> EngineConfig:
    """EngineConfig from parsed flags; an invalid value exits with code 2 and a one-line error."""
    warn_ignored(args)
    kwargs = {}
    for name in ENGINE_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    try:
        return EngineConfig(model=model_from_args(args, default_model), **kwargs)
    except ConfigError as e:
        print(f"folio: error: invalid engine argument {e}", file=sys.stderr)
        raise SystemExit(2) from None


def engine_args_to_argv(config: EngineConfig) -> list[str]:
    """The flags that rebuild `config` in a child process (only non-default values)."""
    defaults = EngineConfig()
    argv = ["--model", config.model]
    for name in ENGINE_FIELDS:
        value = getattr(config, name)
        if value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if name == "enable_prefix_caching":
                argv.append(flag if value else "--no-enable-prefix-caching")
            elif value:
                argv.append(flag)
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
