"""`LLM`: the offline batch API (vLLM's `LLM(model).generate(prompts, params)`).

LLM ──add_request──▶ EngineCore (Scheduler + ModelRunner) ──step──▶ token ids
 └── IncrementalDetokenizer per completion: text, stop strings (→ finish the request)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from services.engine.engine_core import EngineCore
from services.engine.outputs import CompletionOutput, RequestOutput
from services.executor.loader import load_tokenizer
from services.scheduler.request import Request
from shared.config import EngineConfig
from shared.detokenizer import IncrementalDetokenizer
from shared.generation_defaults import sampling_defaults
from shared.protocol import FinishReason
from shared.sampling_params import SamplingParams

Prompt = str | Sequence[int]


@dataclass
class _Child:
    """One completion (of n) of a request, as the engine core sees it: its own request id."""

    parent: RequestOutput
    completion: CompletionOutput
    detok: IncrementalDetokenizer | None  # None without a tokenizer
    want_logprobs: bool


class LLM:
    def __init__(self, model: str = "smollm2-135m-instruct", **engine_args) -> None:
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine = EngineCore(self.config)
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(self.config.tokenizer or self.engine.resolved.path)
        # The model's generation_config.json sampling defaults (unless generation_config="vllm").
        self._sampling_defaults = sampling_defaults(self.engine.resolved.path, self.config.generation_config)
        self._children: dict[str, _Child] = {}
        self._parents: dict[str, list[str]] = {}
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's): what
        `generate`/`chat`/`add_request` use when given no sampling params."""
        return SamplingParams(**self._sampling_defaults)

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (also done when the LLM is collected or the
        interpreter exits); a no-op at tensor_parallel_size=1."""
        self.engine.shutdown()

    # ------------------------------------------------------------------ step-level API
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a prompt (text or token ids). Raises ValueError for a prompt that cannot be served."""
        params = params or self.get_default_sampling_params()
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("skip_tokenizer_init=True: prompts must be token ids")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("The prompt is empty: it must contain at least one token.")
        vocab = self.engine.runner.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            # Checked here: on a GPU an out-of-range id reaches the embedding as a device-side
            # assert, which takes the whole CUDA context down with it.
            raise ValueError(f"Token id {bad} is out of vocabulary (the model has {vocab} tokens).")
        bad = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is out of vocabulary (vocab {vocab})")
        if params.structured_outputs is not None:
            why = params.structured_outputs.check()
            if why is not None:
                raise ValueError(why)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True)")
        parent = RequestOutput(request_id, text, token_ids, outputs=[])
        child_ids = []
        for i in range(params.n):
            # n completions are n independent requests; seeded ones get seed + i so they differ.
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child_params = _replace(params, n=1, seed=seed)
            child_id = request_id if params.n == 1 else f"{request_id}-{i}"
            completion = CompletionOutput(index=i)
            parent.outputs.append(completion)
            self.engine.add_request(
                Request(
                    req_id=child_id,
                    prompt_token_ids=token_ids,
                    sampling_params=child_params,
                    arrival_time=time.monotonic(),
                )
            )
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            self._children[child_id] = _Child(parent, completion, detok, params.logprobs is not None)
            child_ids.append(child_id)
        self._parents[request_id] = child_ids

    def abort(self, request_id: str) -> None:
        child_ids = self._parents.pop(request_id, [])
        self.engine.abort(child_ids)
        for cid in child_ids:
            child = self._children.pop(cid)
            if not child.completion.finished:
                child.completion.finish_reason = FinishReason.ABORT.openai

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that progressed (finished ones last time)."""
        touched: dict[str, RequestOutput] = {}
        for out in self.engine.step():
            child = self._children.get(out.req_id)
            if child is None:
                continue
            comp = child.completion
            comp.token_ids.extend(out.new_token_ids)
            if child.want_logprobs and out.new_logprobs:
                if comp.logprobs is None:
                    comp.logprobs = []
                comp.logprobs.extend(out.new_logprobs)  # in place: no copy per token
            stopped = False
            if child.detok is not None:
                new_text, stopped = child.detok.add(out.new_token_ids)
                comp.text += new_text
            if stopped:
                self.engine.finish([out.req_id], FinishReason.STOP)
                comp.finish_reason = FinishReason.STOP.openai
            elif out.finish_reason is not None:
                if child.detok is not None:
                    comp.text += child.detok.flush()
                comp.finish_reason = FinishReason(out.finish_reason).openai
            if out.num_cached_tokens:
                child.parent.num_cached_tokens = max(child.parent.num_cached_tokens, out.num_cached_tokens)
            touched[child.parent.request_id] = child.parent
        for rid, parent in touched.items():
            if parent.finished:
                for cid in self._parents.pop(rid, []):
                    self._children.pop(cid, None)
        return list(touched.values())

    # ------------------------------------------------------------------ batch API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one object or one per prompt")
        ids = []
        for prompt, params in zip(prompts, params_list, strict=True):
            rid = f"gen-{next(self._ids)}"
            self.add_request(rid, prompt, params)
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while len(results) < len(ids):
            for out in self.step():
                if out.finished and out.request_id not in results:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if self.tokenizer is None:
            raise ValueError("skip_tokenizer_init=True: chat needs a tokenizer")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(self, conversation: list[dict]) -> list[int]:
        """Prompt ids of one conversation, as the gateway makes them (services/gateway/chat.py):
        the template's text, encoded without adding special tokens (the template writes them).

        NOTE: not `apply_chat_template(tokenize=True)`: in transformers 5 that returns a
        BatchEncoding, not a list of ids."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    return msgspec.structs.replace(params, **changes)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="req")
