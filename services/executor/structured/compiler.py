"""Compiled grammars for structured outputs: one worker thread, one cache per process.

    add request ─▶ GrammarCache.get(spec) ─▶ Future (cached by spec.key(): compiled once)
                                        └─▶ worker thread: [first time: TokenizerInfo] ─▶ compile

Compilation starts when a request is added to the runner, so it overlaps the request's
prefill; the runner waits on the future only when the request first samples (a cached
spec is already done). The tokenizer and xgrammar's TokenizerInfo are built on the
worker's first job, so an engine that never sees a constrained request pays nothing.

The TokenizerInfo is built with the *model's* vocabulary size (SmolLM2: 49152, more than
its tokenizer's entries): bitmasks then cover every logits column, and ids the tokenizer
lacks are never allowed. Its stop tokens are the model's EOS ids, so a grammar ends where
check_stop would stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shared.structured_outputs import StructuredOutputsParams


class GrammarCache:
    def __init__(
        self, load_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: Collection[int]
    ) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None  # xgrammar.GrammarCompiler, made on the worker
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()

    def get(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar of `spec` (a future: done at once for a cached spec)."""
        key = spec.key()
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
                fut = self._pool.submit(self._compile, spec)
                self._futures[key] = fut
        return fut

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        import xgrammar as xgr

        if self._compiler is None:  # only the worker thread writes it
            info = xgr.TokenizerInfo.from_huggingface(
                self._load_tokenizer(), vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler.compile_grammar(spec.build_grammar())

    def stop_only(self) -> Any:
        """A grammar that allows nothing but a stop token, compiled without the tokenizer's
        vocabulary (for a request whose own grammar failed to compile)."""
        import xgrammar as xgr

        info = xgr.TokenizerInfo([""] * self.vocab_size, stop_token_ids=self._stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=1).compile_grammar('root ::= ""')

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
