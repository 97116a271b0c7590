"""ModelRunner at TP=2, one rank in this process and one in a spawned process, driven with
the same plans the way the executor service drives them: a rank that cannot decode its
plan calls fail_step, every rank returns that step's error, and the next step works."""

from __future__ import annotations

import multiprocessing as mp

import msgspec
import pytest
import torch

from services.engine.tp_workers import free_local_init_method
from services.executor.distributed import form_tp_group
from services.executor.model_runner import ModelRunner
from shared.config import EngineConfig
from shared.protocol import StepPlan, StepResult, decode, encode
from tests.services.executor.runner_driver import RunnerDriver
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow


def _config(path, tp: int, init_method: str | None = None) -> EngineConfig:
    return EngineConfig(
        model=str(path),
        dtype="float32",
        device="cpu",
        attention_backend="torch",
        num_gpu_blocks_override=64,
        tensor_parallel_size=tp,
        distributed_init_method=init_method,
        step_timeout=60,
    )


def _rank1(config: EngineConfig, conn) -> None:
    """What the executor service does on each step: decode the plan, or fail_step."""
    torch.set_num_threads(1)
    group = form_tp_group(config, 1)
    runner = ModelRunner(config, tp_rank=1, tp_group=group)
    while msg := conn.recv_bytes():
        step_id, payload = msgspec.msgpack.decode(msg)
        try:
            plan = decode(payload, StepPlan)
        except msgspec.DecodeError as e:
            result = runner.fail_step(step_id, f"undecodable plan: {e}")
        else:
            result = runner.execute(plan)
        conn.send_bytes(encode(result))
    group.destroy()


class Lockstep:
    """Rank 0's runner for RunnerDriver: each plan goes to rank 1 too (corrupted on request)."""

    def __init__(self, runner: ModelRunner, conn) -> None:
        self.runner, self.conn = runner, conn
        self.block_size, self.eos_token_ids = runner.block_size, runner.eos_token_ids
        self.corrupt_next = False
        self.peer_results: list[StepResult] = []

    def execute(self, plan: StepPlan) -> StepResult:
        payload = b"\xc1 not msgpack" if self.corrupt_next else encode(plan)
        self.corrupt_next = False
        self.conn.send_bytes(msgspec.msgpack.encode([plan.step_id, payload]))
        result = self.runner.execute(plan)
        self.peer_results.append(decode(self.conn.recv_bytes(), StepResult))
        return result


def test_undecodable_plan_fails_the_step_on_every_rank(tmp_path):
    path = make_tiny_model("llama", tmp_path)
    prompt_a, prompt_b = [11, 12, 13, 14, 15], [40, 41, 42, 43, 44, 45, 46]
    solo = RunnerDriver(ModelRunner(_config(path, 1)), stop_at_eos=False)
    solo.add("b", prompt_b)
    solo.step({"b": len(prompt_b)})
    solo.decode_until(["b"], 4)

    config = _config(path, 2, free_local_init_method())
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_rank1, args=(config, child), daemon=True)
    proc.start()
    group = form_tp_group(config, 0)
    try:
        peer = Lockstep(ModelRunner(config, tp_rank=0, tp_group=group), conn)
        driver = RunnerDriver(peer, stop_at_eos=False)
        driver.add("a", prompt_a)
        ok = driver.step({"a": len(prompt_a)})
        assert not ok.error and ok.sampled_token_ids == peer.peer_results[-1].sampled_token_ids

        peer.corrupt_next = True
        failed = driver.step({"a": 1})
        assert "rank(s) [1]" in failed.error and not failed.req_ids
        assert "undecodable plan" in peer.peer_results[-1].error

        # Both ranks are still in lock-step: the scheduler drops the failed request and goes on.
        driver.add("b", prompt_b)
        driver.step({"b": len(prompt_b)}, finished=["a"])
        driver.decode_until(["b"], 4)
        assert driver.requests["b"].output == solo.requests["b"].output
        assert [r.sampled_token_ids for r in driver.results[2:]] == [
            r.sampled_token_ids for r in peer.peer_results[2:]
        ]
        conn.send_bytes(b"")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        group.destroy()
        if proc.is_alive():
            proc.kill()
