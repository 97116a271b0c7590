"""A minimal stand-in for the scheduler, to drive a ModelRunner step by step in tests.

It allocates blocks from a counter, sends each request once as new and then as diffs,
and records sampled tokens, following the StepPlan contract of shared/protocol.py.
Tests choose what each step schedules, so they can place chunk and block boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.executor.model_runner import ModelRunner
from shared.protocol import CachedRequestData, NewRequestData, StepPlan, StepResult
from shared.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


@dataclass
class DriverRequest:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed: int
    output: list[int] = field(default_factory=list)
    sent: bool = False
    finished: bool = False
    new_blocks: list[int] = field(default_factory=list)  # allocated since the last plan

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class RunnerDriver:
    def __init__(self, runner: ModelRunner, *, stop_at_eos: bool = True) -> None:
        self.runner = runner
        self.stop_at_eos = stop_at_eos
        self.block_size = runner.block_size
        self.next_block = 0
        self.step_id = 0
        self.requests: dict[str, DriverRequest] = {}
        self.results: list[StepResult] = []

    def add(
        self,
        req_id: str,
        prompt: list[int],
        params: SamplingParams = GREEDY,
        *,
        cached_blocks: list[int] | None = None,
        num_cached_tokens: int = 0,
        output: list[int] | None = None,
    ) -> DriverRequest:
        """Queue a request; `cached_blocks` / `num_cached_tokens` model a prefix-cache hit."""
        req = DriverRequest(req_id, list(prompt), params, list(cached_blocks or []), num_cached_tokens)
        req.output = list(output or [])
        self.requests[req_id] = req
        return req

    def step(self, schedule: dict[str, int], finished: list[str] = ()) -> StepResult:
        new, cached = [], []
        for req_id, n in schedule.items():
            req = self.requests[req_id]
            self._allocate(req, req.num_computed + n)
            if not req.sent:
                new.append(
                    NewRequestData(
                        req_id=req_id,
                        prompt_token_ids=req.prompt,
                        sampling_params=req.params,
                        block_ids=list(req.block_ids),
                        num_computed_tokens=req.num_computed,
                        output_token_ids=list(req.output),
                    )
                )
                req.sent = True
            else:
                cached.append(CachedRequestData(req_id, list(req.new_blocks), req.num_computed))
            req.new_blocks = []
        plan = StepPlan(
            step_id=self.step_id,
            new_requests=new,
            cached_requests=cached,
            num_scheduled_tokens=dict(schedule),
            finished_req_ids=list(finished),
            total_num_scheduled_tokens=sum(schedule.values()),
        )
        self.step_id += 1
        result = self.runner.execute(plan)
        for req_id, n in schedule.items():
            self.requests[req_id].num_computed += n
        for req_id, toks in zip(result.req_ids, result.sampled_token_ids, strict=True):
            req = self.requests[req_id]
            req.output.extend(toks)
            if self.stop_at_eos and toks[-1] in self.runner.eos_token_ids:
                req.finished = True
        self.results.append(result)
        return result

    def decode_until(self, req_ids: list[str], max_new_tokens: int) -> None:
        """Decode steps over the unfinished requests until each has max_new_tokens."""
        while True:
            live = [
                r
                for r in req_ids
                if not self.requests[r].finished and len(self.requests[r].output) < max_new_tokens
            ]
            if not live:
                return
            self.step({r: 1 for r in live})

    def _allocate(self, req: DriverRequest, num_tokens: int) -> None:
        while len(req.block_ids) * self.block_size < num_tokens:
            req.block_ids.append(self.next_block)
            req.new_blocks.append(self.next_block)
            self.next_block += 1
