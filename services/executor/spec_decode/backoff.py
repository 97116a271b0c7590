"""How many drafts to propose for each request: as many as are likely enough to be
accepted to pay for the rows they add to the step, none for a while when that is none.

Per request, the probability that a draft token is accepted given that the ones before
it were (alpha) is estimated from its verifications: each accepted draft is a success,
the first rejected one a failure (the drafts after it were never judged), counts
decayed by half per verification so the estimate follows the text. A new request
starts at alpha = 0.8 (worth one verification).

The i-th draft is accepted with probability about alpha^i. It is worth a row when that
beats the step's threshold (step_cost.py: the row's cost against the tokens the step
emits; near 0 when decoding is memory-bound, high for a big CPU batch), and never below
a floor of 0.1. So the draft length is the largest i <= num_speculative_tokens with
alpha^i above both. A request whose length comes out 0 drafts nothing for a cool-down
of 4 steps, doubled each time it happens again (up to 64), then probes once with a
single draft to re-measure (one row: in a big CPU batch even probes cost).

A step where the proposer found nothing to draft changes nothing. With back-off off,
every request always gets num_speculative_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_COOLDOWN = 4
_MAX_COOLDOWN = 64
_DECAY = 0.5
_PRIOR_ALPHA = 0.8
_FLOOR = 0.1


@dataclass(slots=True)
class _Track:
    accepted: float = _PRIOR_ALPHA  # decayed successes, then trials, from a prior of one
    trials: float = 1.0
    cooldown: int = 0  # steps left without drafts
    next_cooldown: int = _MIN_COOLDOWN
    probe: bool = False  # the next proposal is the probe after a cool-down

    @property
    def alpha(self) -> float:
        return self.accepted / self.trials


class DraftBackoff:
    def __init__(self, num_speculative_tokens: int, enabled: bool = True) -> None:
        self.k = num_speculative_tokens
        self.enabled = enabled
        self._tracks: dict[str, _Track] = {}

    def num_drafts(self, req_id: str, threshold: float = 0.0) -> int:
        """Drafts to propose for the request's next step (call once per step);
        `threshold` is the step cost's (StepCost.draft_threshold)."""
        if not self.enabled:
            return self.k
        t = self._tracks.setdefault(req_id, _Track())
        if t.cooldown > 0:
            t.cooldown -= 1
            if t.cooldown == 0:
                t.probe = True
            return 0
        if t.probe:
            return 1
        bar = max(threshold, _FLOOR)
        n, p = 0, t.alpha
        while n < self.k and p > bar:
            n += 1
            p *= t.alpha
        if n == 0:
            t.cooldown = t.next_cooldown - 1  # this step is the first without drafts
            t.next_cooldown = min(2 * t.next_cooldown, _MAX_COOLDOWN)
            if t.cooldown == 0:
                t.probe = True
        return n

    def record(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        if not self.enabled or num_drafted <= 0:
            return
        t = self._tracks.setdefault(req_id, _Track())
        t.accepted = _DECAY * t.accepted + num_accepted
        t.trials = _DECAY * t.trials + num_accepted + (num_accepted < num_drafted)
        t.probe = False
        if t.alpha >= 0.5:  # the text is predictable again: the next pause starts short
            t.next_cooldown = _MIN_COOLDOWN

    def alpha(self, req_id: str) -> float:
        t = self._tracks.get(req_id)
        return _PRIOR_ALPHA if t is None else t.alpha

    def remove(self, req_id: str) -> None:
        self._tracks.pop(req_id, None)
