"""The executor service in-process, against a real Redis and a real ModelRunner on a tiny
model; the test plays the scheduler with a real Scheduler, one step at a time."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid

import msgspec
import pytest
import redis

from services.executor.service import ExecutorService, build_runner
from services.scheduler.request import Request
from services.scheduler.scheduler import Scheduler
from shared.bus import Bus
from shared.config import EngineConfig
from shared.protocol import CachedRequestData, FinishReason, StepPlan, TokenDelta
from shared.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("tiny"))
    return EngineConfig(model=str(path), dtype="float32", device="cpu", max_model_len=128,
                        num_gpu_blocks_override=64, block_size=4)


class Harness:
    """An ExecutorService task plus what a scheduler and a gateway would do around it."""

    def __init__(self, redis_url: str, config: EngineConfig, runner, **service_kwargs) -> None:
        ns = f"t{uuid.uuid4().hex[:8]}"
        self.bus = Bus(redis_url, ns)
        self.service = ExecutorService(Bus(redis_url, ns), "e0", service_kwargs.pop("tp_rank", 0), config,
                                       runner, **service_kwargs)
        self.channel = self.bus.keys.gateway_tokens("g")
        self.deltas: list[TokenDelta] = []
        self.result_id: bytes = b"0-0"
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        async def listen():
            async for batch in self.bus.token_batches("g"):
                self.deltas.extend(batch.deltas)

        self.tasks.append(asyncio.create_task(listen()))
        while (await self.bus.redis.pubsub_numsub(self.channel))[0][1] == 0:
            await asyncio.sleep(0.01)
        self.tasks.append(asyncio.create_task(self.service.run()))
        deadline = time.monotonic() + 30
        while not await self.bus.live_ranks("e0"):
            assert time.monotonic() < deadline, "the executor never registered"
            await asyncio.sleep(0.02)

    async def step(self, plan: StepPlan):
        await self.bus.send_step("e0", plan)
        got = await self.bus.read_result("e0", self.result_id, block_ms=20000)
        assert got is not None, "no result"
        self.result_id, result = got
        assert result.step_id == plan.step_id
        return result

    async def stop(self) -> None:
        await self.bus.send_step("e0", StepPlan(step_id=10**6, shutdown=True))
        await asyncio.wait_for(self.tasks[1], 10)  # run() returns on a shutdown plan
        assert await self.bus.live_ranks("e0") == []  # and unregisters
        self.tasks[0].cancel()
        await self.bus.close()

    def scheduler(self) -> Scheduler:
        info = self.service.engine_info()
        return Scheduler(num_blocks=info.num_blocks, block_size=info.block_size, max_num_seqs=8,
                         max_num_batched_tokens=64, max_model_len=info.max_model_len,
                         enable_prefix_caching=True)


async def _wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_streams_tokens_and_finish_reasons(redis_url, config):
    h = Harness(redis_url, config, build_runner(config))
    await h.start()
    info = await h.bus.live_ranks("e0")
    assert info[0].num_blocks == 64 and info[0].max_model_len == 128 and info[0].incarnation
    assert h.service.runner.eos_token_ids == frozenset([2, 7])
    sched = h.scheduler()
    params = [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)]
    for i, p in enumerate(params):
        sched.add_request(Request(req_id=f"r{i}", prompt_token_ids=[1, 3 + i, 5, 8, 13, 21],
                                  sampling_params=p, reply_to=h.channel))
    sampled: dict[str, list[int]] = {"r0": [], "r1": []}
    finish: dict[str, FinishReason] = {}
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        result = await h.step(plan)
        for rid, toks in zip(result.req_ids, result.sampled_token_ids, strict=True):
            sampled[rid] += toks
        for out in sched.update_from_output(plan, result):
            if out.finish_reason is not None:
                finish[out.req_id] = out.finish_reason
    await _wait_for(lambda: sum(d.finish_reason != 0 for d in h.deltas) == 2)
    for rid, n in (("r0", 5), ("r1", 9)):
        mine = [d for d in h.deltas if d.req_id == rid]
        assert [t for d in mine for t in d.token_ids] == sampled[rid][:n]
        assert [d.index for d in mine] == list(range(n))  # one token per step, indexed
        assert all(d.finish_reason == 0 for d in mine[:-1])
        # The runner decided the finish once: the gateway and the scheduler got the same one.
        assert mine[-1].finish_reason == finish[rid] == FinishReason.LENGTH
        assert mine[-1].num_prompt_tokens == 6
    # Every delta is in the engine's token log too, one entry per step (not per request).
    logged = await h.bus.read_token_log("e0")
    assert sorted((d.req_id, d.index) for b in logged for d in b.deltas) == sorted(
        (d.req_id, d.index) for d in h.deltas)
    assert len(logged) == 9 and all(b.engine_id == "e0" for b in logged)
    await h.stop()


async def test_failed_step_reports_error_and_keeps_serving(redis_url, config):
    h = Harness(redis_url, config, build_runner(config))
    await h.start()
    # A diff for a request the runner never saw: the runner raises, the service reports it.
    bad = StepPlan(step_id=1, cached_requests=[CachedRequestData(req_id="ghost", new_block_ids=[1],
                                                                 num_computed_tokens=3)],
                   num_scheduled_tokens={"ghost": 1}, total_num_scheduled_tokens=1)
    result = await h.step(bad)
    assert "ghost" in result.error and result.req_ids == []
    sched = h.scheduler()
    sched._step_id = 1  # continue the step numbering after the hand-written plan
    sched.add_request(Request(req_id="ok", prompt_token_ids=[1, 2, 3],
                              sampling_params=SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                              reply_to=h.channel))
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        result = await h.step(plan)
        assert not result.error
        sched.update_from_output(plan, result)
    await _wait_for(lambda: any(d.req_id == "ok" and d.finish_reason for d in h.deltas))
    await h.stop()


async def test_malformed_plan_fails_its_step_and_keeps_serving(redis_url, config):
    h = Harness(redis_url, config, build_runner(config))
    await h.start()
    # A plan whose step id reads but whose body does not: its step gets an error result.
    await h.bus.redis.xadd(h.bus.keys.steps("e0"), {b"m": msgspec.msgpack.encode([1, "garbage"])})
    got = await h.bus.read_result("e0", h.result_id, block_ms=20000)
    assert got is not None
    h.result_id, result = got
    assert result.step_id == 1 and "malformed step plan" in result.error
    # Not even a step id: dead-lettered, nobody is answered, and the rank goes on.
    await h.bus.redis.xadd(h.bus.keys.steps("e0"), {b"m": b"\xc1"})
    sched = h.scheduler()
    sched._step_id = 1
    sched.add_request(Request(req_id="ok", prompt_token_ids=[1, 2, 3], reply_to=h.channel,
                              sampling_params=SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)))
    while sched.has_unfinished_requests():
        plan = sched.schedule()
        result = await h.step(plan)
        assert not result.error
        sched.update_from_output(plan, result)
    assert await h.bus.redis.xlen(h.bus.keys.deadletter) == 2
    await h.stop()


class SlowRunner:
    """The real runner, with a pause in each step: a stand-in for a long prefill."""

    def __init__(self, runner, delay_s: float) -> None:
        self._runner = runner
        self._delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def execute(self, plan):
        time.sleep(self._delay_s)
        return self._runner.execute(plan)


async def test_heartbeat_beats_during_a_long_step(redis_url, config):
    h = Harness(redis_url, config, SlowRunner(build_runner(config), 1.5), rank_ttl_s=0.4, heartbeat_s=0.1)
    await h.start()
    sched = h.scheduler()
    sched.add_request(Request(req_id="r", prompt_token_ids=[1, 2, 3],
                              sampling_params=SamplingParams(temperature=0.0, max_tokens=1)))
    # The step blocks the service's event loop, so watch the heartbeat from another thread.
    alive: list[int] = []
    done = threading.Event()
    key = h.bus.keys.rank_alive("e0", 0)

    def watch() -> None:
        client = redis.Redis.from_url(redis_url)
        while not done.is_set():
            alive.append(client.exists(key))
            time.sleep(0.05)
        client.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    await h.step(sched.schedule())  # 1.5 s, well past the 0.4 s TTL
    done.set()
    watcher.join()
    assert len(alive) > 10 and all(a == 1 for a in alive), alive
    await h.stop()


async def test_only_rank0_publishes(redis_url, config):
    tp2 = dataclasses.replace(config, tensor_parallel_size=2)
    h = Harness(redis_url, tp2, build_runner(config), tp_rank=1)
    await h.start()
    [info] = await h.bus.live_ranks("e0")
    assert info.tp_rank == 1 and info.tp_size == 2
    # Rank 1 serves only once its group is up: stand in for rank 0 (its heartbeat outlives
    # the test; rank 1 stops watching it on the shutdown plan).
    await h.bus.register_rank(msgspec.structs.replace(info, tp_rank=0, incarnation="stand-in"), ttl_s=120)
    sched = h.scheduler()
    sched.add_request(Request(req_id="r", prompt_token_ids=[1, 2, 3], reply_to=h.channel,
                              sampling_params=SamplingParams(temperature=0.0, max_tokens=1)))
    plan = sched.schedule()
    await h.bus.send_step("e0", plan)
    # Rank 1 reads and runs the step (its runner sampled the request's token) ...
    deadline = time.monotonic() + 30
    while h.service.last_step_id != plan.step_id or len(
        h.service.runner.input_batch.requests["r"].sampling.output_token_ids
    ) != 1:
        assert time.monotonic() < deadline, "rank 1 never executed the step"
        await asyncio.sleep(0.02)
    # ... but neither reports a result nor streams tokens.
    assert await h.bus.read_result("e0", "0-0", block_ms=500) is None
    await asyncio.sleep(0.2)
    assert h.deltas == []
    await h.bus.send_step("e0", StepPlan(step_id=10**6, shutdown=True))
    await asyncio.wait_for(h.tasks[1], 10)  # rank 1 has left: the stand-in may go
    await h.bus.unregister_rank("e0", 0)
    await h.stop()
