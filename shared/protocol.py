"""Wire protocol: typed msgpack messages between gateway, scheduler and executors.

Every struct is array-like (compact) and decoding validates types, so a malformed
message is rejected as a whole. Messages that start work carry `traceparent`.

    gateway ──GenerateRequest──▶ {ns}:requests        (stream, group "schedulers")
    gateway ──AbortRequest─────▶ {ns}:aborts          (pub/sub)
    scheduler ──StepPlan───────▶ {ns}:engine:{e}:steps
    executor ──StepResult──────▶ {ns}:engine:{e}:results
    executor ──TokenBatch──────▶ {ns}:gateway:{g}:tokens (pub/sub)
"""

from __future__ import annotations

import enum

import msgspec

from shared.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    STOP = 1  # EOS, a stop token id, or a stop string
    LENGTH = 2  # max_tokens or max_model_len
    ABORT = 3  # client went away or was aborted

    @property
    def openai(self) -> str:
        return {1: "stop", 2: "length", 3: "abort"}[int(self)]


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    pass


# ---------------------------------------------------------------- gateway → scheduler
class GenerateRequest(_Msg):
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    reply_to: str = ""  # the gateway's token channel
    arrival_time: float = 0.0
    traceparent: str = ""


class AbortRequest(_Msg):
    req_ids: list[str]


# ---------------------------------------------------------------- scheduler → executors
class NewRequestData(_Msg):
    """Sent once when a request is (re)scheduled; afterwards only CachedRequestData diffs.

    A preempted request comes back as new: its output so far rides in `output_token_ids`
    (penalties need it) and is recomputed as if it were prompt.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = []
    reply_to: str = ""
    traceparent: str = ""


class CachedRequestData(_Msg):
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class StepPlan(_Msg):
    """One engine step: which requests run, how many tokens each.

    `num_scheduled_tokens[req_id]` tokens starting at that request's
    `num_computed_tokens` are computed this step. A request samples a token when the
    step reaches the end of its known tokens (prompt + output so far); a mid-prompt
    chunk samples nothing.

    Speculative decoding: `scheduled_spec_tokens[req_id]` are draft tokens appended after
    the request's known tokens and counted in its `num_scheduled_tokens`; the executor
    scores the pending token and every draft in this one forward and keeps the accepted
    ones (the scheduler rolls `num_computed_tokens` back over the rest).
    """

    step_id: int
    new_requests: list[NewRequestData] = []
    cached_requests: list[CachedRequestData] = []
    num_scheduled_tokens: dict[str, int] = {}
    finished_req_ids: list[str] = []  # finished, aborted or preempted since last step: free state
    total_num_scheduled_tokens: int = 0
    shutdown: bool = False
    scheduled_spec_tokens: dict[str, list[int]] = {}


class Logprobs(_Msg):
    """Logprobs of one sampled token: the token's own, then the top-n (id, logprob)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class StepResult(_Msg):
    """What the executors computed. Token-level finishes (EOS, stop token ids, max_tokens,
    max_model_len) are decided here, once, by the runner that sampled the tokens; the
    scheduler applies them and never re-derives them."""

    step_id: int
    req_ids: list[str] = []  # requests that sampled this step, in order
    sampled_token_ids: list[list[int]] = []  # one list per request, cut after a finishing token
    logprobs: list[list[Logprobs]] = []  # parallel to sampled_token_ids where asked; else []
    finish_reasons: list[int] = []  # parallel to req_ids: 0 still running, else FinishReason
    error: str = ""  # a failed step: the scheduler aborts the step's requests with this message
    # Speculative decoding, parallel to req_ids: drafts the executor proposes for each
    # request's next step, and how many of this step's drafts it accepted.
    draft_token_ids: list[list[int]] = []
    num_accepted: list[int] = []


class StepHeader(_Msg):
    """The leading field of a StepPlan or StepResult: enough to answer for a malformed one."""

    step_id: int


# ---------------------------------------------------------------- executor → gateway
class TokenDelta(_Msg):
    """New tokens of one request. `index` is the position in the request's output of the
    first of `token_ids`, so a gateway can drop what it already sent after a resume."""

    req_id: str
    token_ids: list[int]
    index: int = 0
    logprobs: list[Logprobs] = []
    finish_reason: int = 0  # 0: not finished; else FinishReason
    num_prompt_tokens: int = 0
    error: str = ""


class TokenBatch(_Msg):
    deltas: list[TokenDelta]
    engine_id: str = ""  # the engine that produced the deltas ("" from a gateway's own error)


class RequestHeader(_Msg):
    """The leading fields of a GenerateRequest, decoded by name from a malformed one so its
    gateway can still be told (the rest stays raw and unchecked)."""

    req_id: str
    prompt_token_ids: msgspec.Raw
    sampling_params: msgspec.Raw
    reply_to: str = ""


# ---------------------------------------------------------------- registration
class EngineInfo(_Msg):
    engine_id: str
    num_blocks: int
    block_size: int
    max_model_len: int
    model_name: str
    tp_rank: int = 0
    tp_size: int = 1
    # Random per executor process start: a rank restarted between two heartbeat checks is
    # still a lost rank (its peers and the step in flight are gone with the old process).
    incarnation: str = ""
    # The token budget per step the executors sized their buffers for (0: the config's).
    max_num_batched_tokens: int = 0


_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def decode(data: bytes, type_: type[msgspec.Struct]):
    """Decode and validate; raises msgspec.ValidationError / DecodeError on bad input."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    return dec.decode(data)


class HistogramCounts(_Msg):
    """One histogram, cumulative since the scheduler started: `counts[i]` observations in
    bucket i (non-cumulative; the buckets are shared/metric_buckets.py's, one more for +Inf)."""

    counts: list[int] = []
    total: float = 0.0


class EngineStats(_Msg):
    """A scheduler's published state, read by gateways for /metrics and /health."""

    engine_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_blocks: int = 0
    timestamp: float = 0.0
    # Speculative decoding, cumulative (services/scheduler/spec_stats.py has the meanings).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_tokens_per_pos: list[int] = []
    # Request phases and step sizes measured by the scheduler, keyed by the folio: metric
    # name without prefix (request_queue_time_seconds, ...; see shared/metric_buckets.py).
    histograms: dict[str, HistogramCounts] = {}
    # Requests in the shared request stream that no engine has claimed yet (-1: unknown).
    # The same for every engine: engines claim only what they can run, so under overload
    # the queue is here, not in num_waiting.
    stream_unclaimed: int = -1
