"""How many drafts to propose for each request: fewer, or none for a while, when its
drafts keep being rejected, so speculation costs little on text it cannot predict.

Per request, an exponential moving average of the acceptance rate (accepted / drafted,
weight 1/2 on the latest verification) picks the next draft length:

    rate >= 0.5        num_speculative_tokens
    0.25 <= rate < .5  half of it (at least 1)
    rate < 0.25        no drafts for a cool-down of 4 steps, doubled each time it
                       happens again (up to 64), then one probe at half length

A step where the proposer found nothing to draft changes nothing. With back-off off,
every request always gets num_speculative_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_COOLDOWN = 4
_MAX_COOLDOWN = 64


@dataclass(slots=True)
class _Track:
    rate: float = 1.0
    cooldown: int = 0  # steps left without drafts
    next_cooldown: int = _MIN_COOLDOWN


class DraftBackoff:
    def __init__(self, num_speculative_tokens: int, enabled: bool = True) -> None:
        self.k = num_speculative_tokens
        self.enabled = enabled
        self._tracks: dict[str, _Track] = {}

    def num_drafts(self, req_id: str) -> int:
        """Drafts to propose for the request's next step (call once per step)."""
        if not self.enabled:
            return self.k
        t = self._tracks.get(req_id)
        if t is None:
            return self.k
        if t.cooldown > 0:
            t.cooldown -= 1
            return 0
        if t.rate >= 0.5:
            return self.k
        return max(1, self.k // 2)

    def record(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        if not self.enabled or num_drafted <= 0:
            return
        t = self._tracks.setdefault(req_id, _Track())
        t.rate = 0.5 * t.rate + 0.5 * (num_accepted / num_drafted)
        if t.rate < 0.25:
            t.cooldown = t.next_cooldown
            t.next_cooldown = min(2 * t.next_cooldown, _MAX_COOLDOWN)
            t.rate = 0.4  # the probe after the cool-down drafts half length
        elif t.rate >= 0.5:
            t.next_cooldown = _MIN_COOLDOWN

    def remove(self, req_id: str) -> None:
        self._tracks.pop(req_id, None)
