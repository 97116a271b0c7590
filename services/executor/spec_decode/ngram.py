"""N-gram (prompt lookup) proposals: continue a request the way its own text continued.

For n from prompt_lookup_max down to prompt_lookup_min, the request's last n tokens are
searched for earlier in its prompt + output; at the most recent earlier match that has
enough tokens after it, the tokens that followed it are the drafts:

    tokens:  ... the quick brown fox jumps over ... the quick brown | (suffix, n=3)
                     ^^^^^^^^^^^^^^^ match     ─▶ drafts: fox jumps over

The search is one vectorized comparison per n over the token array (numpy), so a long
prompt costs microseconds, not a Python loop per token.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {prompt_lookup_min}, "
                             f"{prompt_lookup_max}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose_one(self, token_ids: list[int], max_drafts: int) -> list[int]:
        """Up to `max_drafts` tokens that followed the latest earlier occurrence of the
        longest matching suffix; [] when no suffix of at least min_n tokens recurs."""
        num = len(token_ids)
        if max_drafts <= 0 or num <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            suffix = tokens[num - n :]
            # Windows starting at 0 .. num-n-1: every occurrence except the suffix itself.
            windows = sliding_window_view(tokens[: num - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                # The latest match with a full run of drafts after it; else the earliest
                # (in repeating text the latest matches sit right before the suffix).
                full = hits[hits + n + max_drafts <= num]
                start = int(full[-1] if full.size else hits[0]) + n
                return token_ids[start : start + max_drafts]
        return []

    def propose(self, token_ids: list[list[int]], max_drafts: list[int]) -> list[list[int]]:
        return [self.propose_one(t, k) for t, k in zip(token_ids, max_drafts, strict=True)]
