"""Engine configuration: one validated dataclass with vLLM's argument names.

The same object configures the in-process engine (`LLM(model, **engine_args)`) and
every service (`folio serve|scheduler|executor` flags map 1:1 onto its fields).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from shared.speculative_config import SpeculativeConfig, SpeculativeConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED_BACKENDS = ("auto", "nccl", "gloo")
QUANTIZATIONS = ("none", "gguf", "int8", "int4", "fp8")


class ConfigError(ValueError):
    """An engine argument is invalid; the message names the argument."""


@dataclass(slots=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None: the model's own context length
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_space: float = 1.0  # GiB of KV cache on CPU
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # fixed block count, any device (tests)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 on CPU, 8192 on GPU
    tensor_parallel_size: int = 1
    # Engine replicas pulling from one request stream (`folio serve` starts this many engines).
    data_parallel_size: int = 1
    # tcp://HOST:PORT of rank 0's torch.distributed store; None: rendezvous through Redis.
    distributed_init_method: str | None = None
    distributed_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    # Seconds a scheduler waits for one step's result before declaring its engine failed
    # (None: resolved_step_timeout's default).
    step_timeout: float | None = None
    attention_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs
    cuda_graph_sizes: list[int] | None = None  # decode batch sizes to capture; None: 1, 2, 4, 8k
    download_dir: str | None = None  # cache for converted GGUF models
    skip_tokenizer_init: bool = False  # token ids in and out only (no text, no stop strings)
    # Sampling defaults: "auto" = the model folder's generation_config.json, "vllm" = none,
    # else a folder with a generation_config.json (vLLM's --generation-config).
    generation_config: str = "auto"
    # vLLM's --speculative-config (a dict or its JSON); parsed by `speculative()`.
    speculative_config: dict | None = None
    # Weights: None picks per model (a GGUF's own quantized tensors where faster), "none"
    # dense float, "gguf" a GGUF's packed tensors, "int8"/"int4" weight-only at load time.
    quantization: str | None = None
    # Serving limits (docs/reliability.md, "Overload, deadlines, drain, limits"). The queue
    # bounds are per gateway: its requests that have not had their first token yet (None: no
    # bound). request_timeout is the default deadline of a request (None: none); a client may
    # only shorten it. shutdown_timeout is how long SIGTERM lets in-flight requests finish.
    max_num_queued_reqs: int | None = None
    max_num_queued_tokens: int | None = None
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {msg}")

        check(isinstance(self.model, str) and self.model != "", "model", "must be a non-empty string")
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(self.load_format in LOAD_FORMATS, "load_format", f"must be one of {LOAD_FORMATS}")
        check(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        check(
            self.attention_backend in ATTENTION_BACKENDS,
            "attention_backend",
            f"must be one of {ATTENTION_BACKENDS}",
        )
        check(self.block_size >= 1 and self.block_size <= 256, "block_size", "must be in [1, 256]")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            "must be >= 1",
        )
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        check(self.kv_cache_space > 0, "kv_cache_space", "must be > 0 GiB")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(
            self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
            "num_gpu_blocks_override",
            "must be >= 2",
        )
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.data_parallel_size >= 1, "data_parallel_size", "must be >= 1")
        check(
            self.distributed_backend in DISTRIBUTED_BACKENDS,
            "distributed_backend",
            f"must be one of {DISTRIBUTED_BACKENDS}, got {self.distributed_backend!r}",
        )
        check(
            self.distributed_init_method is None
            or (self.distributed_init_method.startswith("tcp://")
                and self.distributed_init_method[6:].rpartition(":")[2].isdigit()),
            "distributed_init_method",
            f"must look like tcp://HOST:PORT, got {self.distributed_init_method!r}",
        )
        check(self.step_timeout is None or self.step_timeout > 0, "step_timeout", "must be > 0 seconds")
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, f"must be >= 1, got {value}")
        check(self.request_timeout is None or self.request_timeout > 0, "request_timeout",
              "must be > 0 seconds")
        check(self.shutdown_timeout >= 0, "shutdown_timeout", "must be >= 0 seconds")
        check(
            self.quantization is None or self.quantization in QUANTIZATIONS,
            "quantization",
            f"must be one of {QUANTIZATIONS}, got {self.quantization!r}",
        )
        if self.speculative_config is not None:
            try:
                spec = SpeculativeConfig.parse(self.speculative_config)
            except SpeculativeConfigError as e:
                raise ConfigError(f"speculative_config: {e}") from None
            check(
                not (spec.uses_draft_model and self.tensor_parallel_size > 1),
                "speculative_config",
                "a draft model runs at tensor_parallel_size 1 only (n-gram works at any size)",
            )
        if self.cuda_graph_sizes is not None:
            sizes = self.cuda_graph_sizes
            check(
                isinstance(sizes, list | tuple)
                and len(sizes) > 0
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes),
                "cuda_graph_sizes",
                f"must be a non-empty list of positive integers, got {sizes!r}",
            )
            self.cuda_graph_sizes = sorted(set(sizes))

    @property
    def model_name(self) -> str:
        """The name clients use in `model` (vLLM: --served-model-name, else the model argument)."""
        return self.served_model_name or self.model

    def speculative(self) -> SpeculativeConfig | None:
        """The validated speculative decoding config, or None without speculation."""
        if self.speculative_config is None:
            return None
        return SpeculativeConfig.parse(self.speculative_config)

    def num_lookahead_slots(self) -> int:
        """KV slots a scheduler reserves past each step's tokens for a draft model."""
        spec = self.speculative()
        return 0 if spec is None else spec.num_lookahead_slots

    def resolved_max_num_batched_tokens(self, on_gpu: bool) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if on_gpu else 2048

    def resolved_step_timeout(self) -> float:
        """A step of a full CPU budget (2048 tokens on 2 cores) can take tens of seconds."""
        return self.step_timeout if self.step_timeout is not None else 120.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)
