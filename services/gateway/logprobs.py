"""Logprobs in OpenAI's two shapes.

completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}], "text_offset": [...]}
chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

Tokens are shown as their own decoded text. A logprob of -inf (a token masked out by
top-k/top-p) is clamped to -9999.0 as vLLM does, so the JSON stays valid.
"""

from __future__ import annotations

from services.gateway.tokenizer import TokenStrings
from shared.protocol import Logprobs

_MIN_LOGPROB = -9999.0


def _lp(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB


class LogprobFormatter:
    def __init__(self, token_strings: TokenStrings) -> None:
        self.tok = token_strings

    def completion(
        self,
        lps: list[Logprobs],
        k: int,
        text_offset: int,
        prompt_ids: list[int] | None = None,
    ) -> tuple[dict, int]:
        """Logprobs of `lps` (after the echoed `prompt_ids`, whose logprobs are unknown: None).

        Returns the dict and the text offset after its tokens (streaming continues from it).
        """
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for tid in prompt_ids or ():
            s = self.tok(tid)
            tokens.append(s)
            token_logprobs.append(None)
            top.append(None)
            offsets.append(text_offset)
            text_offset += len(s)
        for lp in lps:
            s = self.tok(lp.token_id)
            tokens.append(s)
            token_logprobs.append(_lp(lp.logprob))
            entry: dict[str, float] = {}
            for tid, v in zip(lp.top_ids[:k], lp.top_logprobs[:k], strict=False):
                entry.setdefault(self.tok(tid), _lp(v))
            entry.setdefault(s, _lp(lp.logprob))  # vLLM lists the sampled token too
            top.append(entry)
            offsets.append(text_offset)
            text_offset += len(s)
        out = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }
        return out, text_offset

    def chat(self, lps: list[Logprobs], k: int) -> list[dict]:
        content = []
        for lp in lps:
            s = self.tok(lp.token_id)
            content.append(
                {
                    "token": s,
                    "logprob": _lp(lp.logprob),
                    "bytes": list(s.encode("utf-8", errors="replace")),
                    "top_logprobs": [
                        {
                            "token": (t := self.tok(tid)),
                            "logprob": _lp(v),
                            "bytes": list(t.encode("utf-8", errors="replace")),
                        }
                        for tid, v in zip(lp.top_ids[:k], lp.top_logprobs[:k], strict=False)
                    ],
                }
            )
        return content
