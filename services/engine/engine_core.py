"""Scheduler + model runner in one process: the engine step is schedule → execute → update.

The scheduler service and the executor service wrap the same two objects over Redis;
this class is the no-Redis path used by `LLM` and by tests.
"""

from __future__ import annotations

from services.executor.loader import ResolvedModel, resolve_model
from services.executor.model_runner import ModelRunner
from services.scheduler.outputs import EngineCoreOutput, SchedulerStats
from services.scheduler.request import Request
from services.scheduler.scheduler import Scheduler
from shared.config import EngineConfig
from shared.protocol import FinishReason


class EngineCore:
    def __init__(self, config: EngineConfig, resolved: ResolvedModel | None = None) -> None:
        self.config = config
        self.resolved = resolved or resolve_model(config.model, config.load_format, config.download_dir)
        self.runner = ModelRunner(config, self.resolved)
        on_gpu = self.runner.device.type == "cuda"
        self.scheduler = Scheduler(
            num_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.resolved_max_num_batched_tokens(on_gpu),
            max_model_len=self.runner.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.num_steps = 0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def add_request(self, request: Request) -> None:
        """Raises ValueError when the request can never be served (too long, empty)."""
        self.scheduler.add_request(request)

    def abort(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def finish(self, req_ids: list[str], reason: FinishReason) -> None:
        self.scheduler.finish_requests(req_ids, reason)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        plan = self.scheduler.schedule()
        if plan.total_num_scheduled_tokens == 0 and not plan.finished_req_ids:
            return []
        result = self.runner.execute(plan)
        self.num_steps += 1
        return self.scheduler.update_from_output(plan, result)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
