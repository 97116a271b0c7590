"""Scheduler + model runner in one process: the engine step is schedule → execute → update.

The scheduler service and the executor service wrap the same two objects over Redis;
this class is the no-Redis path used by `LLM` and by tests.

At tensor_parallel_size N > 1 this process is rank 0 and ranks 1..N-1 are worker processes
(`tp_workers.py`) that execute the same plans in lock-step; each rank gets
torch.get_num_threads() // N threads (this process's count is restored by `shutdown`).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from services.engine.tp_workers import TPWorkers, free_local_init_method
from services.executor.distributed import TPGroup, form_tp_group
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
        self._tp = _TPParts(threads_before=torch.get_num_threads())
        # Not a method of self: the finalizer must not keep the engine alive.
        self._finalizer = weakref.finalize(self, self._tp.close)
        if config.tensor_parallel_size > 1:
            threads = max(1, torch.get_num_threads() // config.tensor_parallel_size)
            if config.distributed_init_method is None:
                config = dataclasses.replace(config, distributed_init_method=free_local_init_method())
            try:
                self._tp.workers = TPWorkers(config, threads)
                self._tp.workers.wait_started()
                torch.set_num_threads(threads)
                self._tp.group = form_tp_group(config, 0)
                self.runner = ModelRunner(config, self.resolved, tp_group=self._tp.group)
            except BaseException:
                self.shutdown()
                raise
        else:
            self.runner = ModelRunner(config, self.resolved)
        on_gpu = self.runner.device.type == "cuda"
        self.scheduler = Scheduler(
            num_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.resolved_max_num_batched_tokens(on_gpu),
            max_model_len=self.runner.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            num_lookahead_slots=config.num_lookahead_slots(),
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
        workers = self._tp.workers
        if workers is not None:
            if (dead := workers.dead_worker_error()) is not None:
                raise dead
            workers.send(plan)
        try:
            result = self.runner.execute(plan)
        except Exception as e:
            # A failed collective is how rank 0 usually learns that a worker died.
            if workers is not None and (dead := workers.dead_worker_error(wait_s=2.0)) is not None:
                raise dead from e
            raise
        self.num_steps += 1
        return self.scheduler.update_from_output(plan, result)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the group (no-op at TP=1; idempotent).
        Also runs when the engine is collected and at interpreter exit."""
        self._finalizer()


@dataclasses.dataclass
class _TPParts:
    """What an engine at TP > 1 must release: its workers, its group, the thread count."""

    threads_before: int
    workers: TPWorkers | None = None
    group: TPGroup | None = None

    def close(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if self.group is not None:
            self.group.destroy()
            self.group = None
            torch.set_num_threads(self.threads_before)
