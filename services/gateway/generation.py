"""One HTTP request's generation: its choices, their text, stop strings and metrics.

    Generation.start() ─▶ engine requests {id}-0 … {id}-(k-1)   (k = prompts × n)
    next_update()      ◀─ TokenDelta ─▶ detokenize, stop strings ─▶ Update(choice, text, ...)
    close()            ─▶ abort whatever has not finished (stop-string hit, disconnect, error)

Streaming and non-streaming handlers of both endpoints consume the same Updates and
only differ in how they shape them into JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.gateway.errors import EngineError
from services.gateway.metrics import NO_ENGINE
from services.gateway.sampling import expand
from services.gateway.state import GatewayState
from shared.detokenizer import IncrementalDetokenizer
from shared.protocol import FinishReason, Logprobs, TokenDelta
from shared.sampling_params import SamplingParams
from shared.telemetry import Event, GenAI

# The GenAI operation (gen_ai.operation.name) by response id prefix: chat completions and
# the Responses API are chat, /v1/completions is text_completion.
_OPERATIONS = (("chatcmpl-", "chat"), ("resp_", "chat"), ("cmpl-", "text_completion"))


@dataclass(slots=True)
class Choice:
    index: int
    req_id: str
    prompt_ids: list[int]
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_offset: int = 0  # streaming completions logprobs continue from here
    last_token_time: float = 0.0
    first_token_time: float = 0.0
    prompt_counted: bool = False  # its prompt tokens are in folio:prompt_tokens_total


@dataclass(slots=True)
class Update:
    choice: Choice
    text: str
    logprobs: list[Logprobs]
    finished: bool


class Generation:
    def __init__(
        self,
        state: GatewayState,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        max_tokens: list[int],
        traceparent: str = "",
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.want_logprobs = params.logprobs is not None
        self.arrival = time.perf_counter()
        self.created = int(time.time())
        operation = next((op for pre, op in _OPERATIONS if request_id.startswith(pre)), "text_completion")
        self._span, downstream_tp = state.tracer.start(
            request_id,
            traceparent,
            {
                GenAI.OPERATION_NAME: operation,
                GenAI.SYSTEM: "folio",
                GenAI.REQUEST_MODEL: state.model_name,
                GenAI.REQUEST_CHOICE_COUNT: params.n,
                GenAI.REQUEST_TEMPERATURE: params.temperature,
                GenAI.REQUEST_TOP_P: params.top_p,
                GenAI.REQUEST_MAX_TOKENS: max(max_tokens),
                GenAI.RESPONSE_ID: request_id,
                GenAI.RESPONSE_MODEL: state.model_name,
            },
            name=f"{operation} {state.model_name}",
        )
        try:
            self.reqs = expand(request_id, prompts, params, max_tokens, state.client.reply_to, downstream_tp)
        except Exception as e:
            state.tracer.end(self._span, {}, str(e))
            raise
        self.choices: list[Choice] = []
        for idx, r in enumerate(self.reqs):
            detok = IncrementalDetokenizer(
                state.tokenizer,
                r.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                decode_fn=state.decode_fn,
            )
            self.choices.append(Choice(idx, r.req_id, r.prompt_token_ids, detok))
        self._by_id = {c.req_id: c for c in self.choices}
        self._unfinished = set(self._by_id)
        self._stream = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stream = await self.state.client.submit(self.reqs)

    @property
    def done(self) -> bool:
        return not self._unfinished

    def has_pending(self) -> bool:
        """More deltas are already queued (lets streaming coalesce several into one write)."""
        return self._stream is not None and not self._stream.queue.empty()

    def close(self, error: str = "") -> None:
        """Abort unfinished choices and end the span. Sync and idempotent: safe in `finally`."""
        if self._closed:
            return
        self._closed = True
        if self._unfinished:
            self.state.client.abort(list(self._unfinished))
            now = time.perf_counter()
            for req_id in self._unfinished:
                self._finished_metrics(self._by_id[req_id], "error" if error else "abort", now)
            self._unfinished.clear()
        self.state.tracer.event(self._span, Event.FINISHED)
        self.state.tracer.end(
            self._span,
            {
                GenAI.USAGE_INPUT_TOKENS: self.prompt_tokens,
                GenAI.USAGE_OUTPUT_TOKENS: self.completion_tokens,
                GenAI.RESPONSE_FINISH_REASONS: [c.finish_reason or "abort" for c in self.choices],
                GenAI.LATENCY_E2E: time.perf_counter() - self.arrival,
            },
            error,
        )

    # ------------------------------------------------------------------ progress
    async def next_update(self) -> Update:
        """The next choice's progress; raises EngineError if the engine failed a choice."""
        assert self._stream is not None, "start() first"
        while True:
            delta = await self._stream.get()
            # Deltas already queued for a choice that finished (a stop-string hit) are moot.
            if delta.req_id in self._unfinished:
                return self._apply(delta)

    def _apply(self, delta: TokenDelta) -> Update:
        choice = self._by_id[delta.req_id]
        if delta.error:
            self._unfinished.discard(choice.req_id)
            self._finished_metrics(choice, "error", time.perf_counter())
            raise EngineError(delta.error)
        metrics = self.state.metrics.of(self._engine(choice))
        now = time.perf_counter()
        new_ids = delta.token_ids
        if new_ids:
            if not choice.prompt_counted:  # prefilled: counted for the engine that did it
                choice.prompt_counted = True
                metrics.prompt_tokens.inc(len(choice.prompt_ids))
            if choice.last_token_time == 0.0:
                metrics.ttft.observe(now - self.arrival)
                choice.first_token_time = now
                if not any(c.first_token_time for c in self.choices if c is not choice):
                    self.state.tracer.event(self._span, Event.FIRST_TOKEN)
            else:
                metrics.itl.observe(now - choice.last_token_time)
            choice.last_token_time = now
            choice.token_ids.extend(new_ids)
            metrics.generation_tokens.inc(len(new_ids))
        lps = delta.logprobs if self.want_logprobs else []
        if lps:
            choice.logprobs.extend(lps)
        text, hit = choice.detok.add(new_ids)
        finished = False
        if hit:
            # The engine does not know about stop strings: tell it to stop.
            self.state.client.abort([choice.req_id])
            choice.finish_reason, choice.stop_reason = "stop", choice.detok.stop_str
            finished = True
        elif delta.finish_reason:
            text += choice.detok.flush()
            reason = FinishReason(delta.finish_reason)
            choice.finish_reason = reason.openai
            if (
                reason == FinishReason.STOP
                and choice.token_ids
                and choice.token_ids[-1] in self.params.stop_token_ids
            ):
                choice.stop_reason = choice.token_ids[-1]
            finished = True
        if finished:
            self._unfinished.discard(choice.req_id)
            self._finished_metrics(choice, choice.finish_reason, now)
        choice.text += text
        return Update(choice, text, lps, finished)

    def _finished_metrics(self, choice: Choice, reason: str | None, now: float) -> None:
        """One choice is over: vLLM's per-request metrics (each choice is a request there)."""
        decode_s = choice.last_token_time - choice.first_token_time if choice.first_token_time else 0.0
        engine = self._engine(choice)
        if self._stream is not None and not choice.prompt_counted:  # ended before a token
            choice.prompt_counted = True
            self.state.metrics.of(engine).prompt_tokens.inc(len(choice.prompt_ids))
        self.state.metrics.finished(
            reason or "abort",
            now - self.arrival,
            num_prompt_tokens=len(choice.prompt_ids) if self._stream is not None else None,
            num_generation_tokens=len(choice.token_ids),
            decode_s=decode_s,
            max_tokens=self.reqs[choice.index].sampling_params.max_tokens,
            engine=engine,
        )

    def _engine(self, choice: Choice) -> str:
        """The `engine` label of a choice's request series: the engine whose batch carried its
        latest delta (as vLLM labels by the engine that served it), NO_ENGINE if none did."""
        if self._stream is None:
            return NO_ENGINE
        return self._stream.engines.get(choice.req_id) or NO_ENGINE

    # ------------------------------------------------------------------ totals
    @property
    def prompt_tokens(self) -> int:
        # n choices of one prompt count its tokens once (OpenAI's usage).
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def choice_usage(choice: Choice) -> dict:
        """One choice's usage so far: what `stream_options.continuous_usage_stats` puts on each
        of its chunks (vLLM: that choice's prompt and its completion tokens up to this chunk)."""
        p, c = len(choice.prompt_ids), len(choice.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def stream_usage_flags(stream_options) -> tuple[bool, bool]:
    """(usage at the end, usage on every chunk): vLLM sends continuous usage only together
    with include_usage."""
    include = bool(stream_options and stream_options.include_usage)
    return include, include and bool(stream_options.continuous_usage_stats)
