"""What one more row costs in a decode step, learned from the runner's own step times.

A draft token is one more row in the target's forward (and one more LM-head row). On a
GPU or a CPU decoding one sequence that row is nearly free (the step streams the weights
either way); on a CPU decoding a batch it is not, and drafts that are rarely accepted
then slow every request in the batch. The back-off (backoff.py) weighs a draft's chance
of acceptance against this cost.

The model is a line, step seconds = a + b * rows, fitted by least squares with
exponential forgetting over decode steps (steps that carry a prefill chunk cost more
than their row count says and are not recorded). Drafts make the row count vary from
step to step, which is what the fit needs; until the rows have varied, the cost is
unknown and reported as 0.
"""

from __future__ import annotations

_DECAY = 0.97  # weight of older steps per new one: about the last 30 steps count
_MIN_VARIANCE = 0.25  # rows^2: below this the slope is not determined


class StepCost:
    def __init__(self) -> None:
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def record(self, rows: int, seconds: float) -> None:
        d = _DECAY
        self._w = d * self._w + 1.0
        self._n = d * self._n + rows
        self._t = d * self._t + seconds
        self._nn = d * self._nn + rows * rows
        self._nt = d * self._nt + rows * seconds

    def row_seconds(self) -> float:
        """The fitted cost of one more row (b); 0 while it is not determined."""
        if self._w == 0.0:
            return 0.0
        mean_n = self._n / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n < _MIN_VARIANCE:
            return 0.0
        cov = self._nt / self._w - mean_n * self._t / self._w
        return max(0.0, cov / var_n)

    def step_seconds(self, rows: int) -> float:
        """The fitted time of a step with `rows` rows (the mean step time if no slope)."""
        if self._w == 0.0:
            return 0.0
        b = self.row_seconds()
        mean_n, mean_t = self._n / self._w, self._t / self._w
        return max(mean_t + b * (rows - mean_n), 1e-9)

    def draft_threshold(self, num_requests: int, rows: int) -> float:
        """The acceptance probability a draft row must beat to raise throughput.

        A step of T seconds emits about one token per request (B tokens); one more row
        adds b seconds and, if accepted with probability p, p tokens. It pays when
        p / b > B / T, i.e. p > b * B / T, if every accepted token counts. Alone (B = 1)
        it does: the request ends sooner. In a batch a request that ends sooner raises
        throughput only if a waiting request takes its place; in a batch that runs until
        its slowest request is done it raises nothing, while the row slows everyone.
        Crediting half an accepted token, between those cases, doubles the bar:
        p > b * B / T * (2 - 1 / B). (Measured on SmolLM2 fp32, 2-core EPYC, 16 random
        prompts: the plain rule drafted for 0.9x throughput, copy prompts gain either way.)
        """
        t = self.step_seconds(rows)
        if t <= 0.0:
            return 0.0
        return self.row_seconds() * num_requests / t * (2.0 - 1.0 / max(num_requests, 1))
