"""What every handler needs, built once per app: settings, tokenizer, engine client, metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.gateway.engine_client import EngineClient
from services.gateway.logprobs import LogprobFormatter
from services.gateway.metrics import GatewayMetrics
from services.gateway.tokenizer import TokenStrings, load_sampling_defaults
from services.gateway.tracing import GatewayTracer
from shared.detokenizer import make_decode_fn
from shared.health import DEFAULT_STALL_TIMEOUT_S


@dataclass
class GatewaySettings:
    model: str
    redis_url: str
    served_model_name: str | None = None  # default: the model argument (vLLM)
    tokenizer: str | None = None  # default: the model's own
    download_dir: str | None = None
    load_format: str = "auto"
    redis_namespace: str = "folio"
    gateway_id: str = "gw0"
    api_key: str | None = None
    # Used only while no engine has registered (the engines' EngineInfo is authoritative).
    max_model_len: int | None = None
    allowed_origins: list[str] = field(default_factory=list)
    otlp_traces_endpoint: str | None = None
    # How long a request whose engine died may wait to be resumed by another engine (or,
    # before its first token, for any engine to be alive) before it fails (s).
    resume_timeout_s: float = 30.0
    # Exactly one gateway exports the engine series (engine_client.py, the metrics lease).
    engine_metrics_lease_ttl_s: float = 10.0
    generation_config: str = "auto"  # sampling defaults: see shared/generation_defaults.py
    tool_call_parser: str | None = None  # tool_choice "auto": see tool_parsers.py
    # Overload, deadlines, drain, limits (admission.py; docs/reliability.md).
    max_num_queued_reqs: int | None = None
    max_num_queued_tokens: int | None = None
    request_timeout_s: float | None = None
    shutdown_timeout_s: float = 30.0
    max_request_body_bytes: int = 16 * 1024 * 1024
    # /health fails when an engine with work has not finished a step for this long (s).
    engine_stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S


@dataclass
class GatewayState:
    settings: GatewaySettings
    tokenizer: object
    client: EngineClient
    metrics: GatewayMetrics
    tracer: GatewayTracer
    token_strings: TokenStrings = field(init=False)
    logprobs: LogprobFormatter = field(init=False)
    decode_fn: Callable[[Sequence[int], bool], str] = field(init=False)
    vocab_size: int = field(init=False)
    # The model's sampling defaults for requests that leave a field unset (generation_config.json).
    sampling_defaults: dict = field(init=False)

    def __post_init__(self) -> None:
        self.sampling_defaults = load_sampling_defaults(self.settings)
        self.token_strings = TokenStrings(self.tokenizer)
        self.logprobs = LogprobFormatter(self.token_strings)
        self.decode_fn = make_decode_fn(self.tokenizer)
        self.vocab_size = len(self.tokenizer)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.settings.model

    async def max_model_len(self) -> int | None:
        engines = await self.client.engines()
        if engines:
            return min(e.max_model_len for e in engines)
        return self.settings.max_model_len
