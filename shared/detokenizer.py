"""Incremental detokenization with stop-string hold-back.

Used wherever text leaves the engine (the gateway, the in-process `LLM`). Decoding the
whole output again for every token is O(n^2); instead we keep a small window of tokens
(vLLM's prefix/read offsets) and decode only that:

    tokens:  [ ... context ... | prefix_offset ... read_offset | new tokens ]
                                 └ already emitted as text ─┘

    new text = decode(tokens[prefix:]) minus decode(tokens[prefix:read])

A window whose decode ends in U+FFFD is an incomplete UTF-8 sequence (an emoji split
over byte tokens): nothing is emitted until a later token completes it. The window
starts with the last few prompt tokens so that tokenizers which strip a leading space
(SentencePiece) render the first output token as they would mid-sentence.

With a fast (Rust) tokenizer the window lives in Rust instead: `tokenizers.DecodeStream`
(tokenizers >= 0.21, what vLLM v1 uses) runs the same prefix/read-offset algorithm per
token, primed with the same prompt context. We mirror its offsets here, so `flush()` and
the Python window path (slow tokenizers, a tokenizer that cleans up spaces, or a stream
that raised, e.g. on a prefix that does not re-decode to itself) can take over at any
token.

Stop strings: text that could still turn into a stop string (a suffix that is a prefix
of some stop string) is held back; once a stop string appears, the text is cut before it
(or after it, with include_stop_str_in_output) and the detokenizer reports the hit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers < 0.21
    DecodeStream = None

# Prompt tokens used as left context for the first output tokens (vLLM uses 5 + 1).
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


def make_decode_fn(tokenizer) -> Callable[[Sequence[int], bool], str]:
    """Fastest faithful decode(ids, skip_special_tokens) for a Hugging Face tokenizer.

    The Rust backend decode is ~4x cheaper than the Python wrapper; it is identical as
    long as the wrapper does no clean-up of tokenization spaces.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids, skip: backend.decode(list(ids), skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(list(ids), skip_special_tokens=skip)


def stream_backend(tokenizer):
    """The Rust `tokenizers.Tokenizer` to drive a DecodeStream with, or None (slow tokenizer,
    or one whose Python decode cleans up spaces, which the Rust decoder would not do)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is None or backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, a chunk at a time."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        decode_fn: Callable[[Sequence[int], bool], str] | None = None,
        use_decode_stream: bool = True,
    ) -> None:
        self._decode = decode_fn or make_decode_fn(tokenizer)
        self._skip = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._tokens: list[int] = context  # context + output ids (the decode window's source)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._text = ""  # all decoded output text (before any stop cut)
        self._emitted = 0  # chars of _text already returned to the caller
        self._end: int | None = None  # where the output text ends after a stop-string hit
        self.stop_str: str | None = None  # the stop string that was hit
        self._backend = stream_backend(tokenizer) if use_decode_stream else None
        self._stream = None
        # NOTE: a context that decodes to U+FFFD (a prompt cut inside a character) would make
        # the stream emit the prompt's broken bytes as output text; such a rare sequence
        # takes the Python window instead.
        if self._backend is not None and _REPLACEMENT not in self._decode(context, skip_special_tokens):
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    @property
    def uses_decode_stream(self) -> bool:
        return self._stream is not None

    # ------------------------------------------------------------------ public API
    @property
    def text(self) -> str:
        """The full output text so far (cut at the stop string once one was hit)."""
        return self._text if self._end is None else self._text[: self._end]

    @property
    def stopped(self) -> bool:
        return self._end is not None

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self._num_context :]

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Append tokens; return (text safe to emit now, whether a stop string was hit)."""
        if self._end is not None:
            return "", True
        old_len = len(self._text)
        for tid in token_ids:
            self._tokens.append(tid)
            self._text += self._step(tid)
        if self._stop:
            hit = self._find_stop(old_len)
            if hit is not None:
                return self._take(hit), True
            return self._take(len(self._text) - self._held_back()), False
        return self._take(len(self._text)), False

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back, plus any undecodable tail."""
        if self._end is not None:
            return self._take(self._end)
        if self._read_offset < len(self._tokens):
            # Incomplete UTF-8 at the very end: emit it with replacement characters, as a
            # full decode would.
            prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset], self._skip)
            full = self._decode(self._tokens[self._prefix_offset :], self._skip)
            old_len = len(self._text)
            self._text += full[len(prefix_text) :]
            self._read_offset = len(self._tokens)
            if self._stop:
                hit = self._find_stop(old_len)
                if hit is not None:
                    return self._take(hit)
        return self._take(len(self._text))

    # ------------------------------------------------------------------ internals
    def _step(self, tid: int) -> str:
        if self._stream is None:
            return self._decode_window()
        try:
            out = self._stream.step(self._backend, tid)
        except Exception:  # "Invalid prefix encountered" and the like: Python from here on
            self._stream = None
            return self._decode_window()
        if not out:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return out

    def _decode_window(self) -> str:
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset], self._skip)
        full = self._decode(self._tokens[self._prefix_offset :], self._skip)
        if len(full) > len(prefix_text) and not full.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return full[len(prefix_text) :]
        return ""

    def _find_stop(self, old_len: int) -> int | None:
        """End of the output text if a stop string now occurs in it; records the hit."""
        # Only a stop string that ends in the new text can be new.
        start = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self._text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.stop_str = s
        self._end = i + len(s) if self._include_stop else i
        return self._end

    def _held_back(self) -> int:
        """How many trailing chars might still begin a stop string."""
        if self._include_stop:
            return 0  # the stop string would be emitted anyway
        text = self._text
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
