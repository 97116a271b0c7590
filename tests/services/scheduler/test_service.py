"""The scheduler and executor services as real processes over a private Redis, with a
tiny model; the test plays the gateway through the bus."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from services.engine.engine_core import EngineCore
from services.scheduler.request import Request
from shared.bus import SCHEDULER_GROUP, Bus
from shared.config import EngineConfig
from shared.protocol import FinishReason, GenerateRequest, HistogramCounts, TokenDelta
from shared.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
NS = "tsched"
MAX_MODEL_LEN = 256
ENGINE_ARGS = ["--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
               "--num-gpu-blocks-override", "128", "--block-size", "4", "--max-num-seqs", "8"]


def _config(model: str) -> EngineConfig:
    return EngineConfig(model=model, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN,
                        num_gpu_blocks_override=128, block_size=4, max_num_seqs=8)


class Engine:
    """A scheduler and an executor process for engine e0."""

    def __init__(self, url: str, model: str, logdir: Path) -> None:
        self.url, self.model, self.logdir = url, model, logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, role: str) -> subprocess.Popen:
        extra = ["--tp-rank", "0"] if role == "executor" else []
        cmd = [sys.executable, "-m", "services.cli", role, "--redis-url", self.url, "--redis-namespace", NS,
               "--engine-id", "e0", *extra, "--model", self.model, *ENGINE_ARGS]
        log = open(self.logdir / f"{role}-{len(self.procs)}.log", "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs[role] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        return self.procs[role]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logdir.glob("*.log")))


async def _wait_engine(bus: Bus, engine: Engine, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not await bus.live_engines():
        for role, p in engine.procs.items():
            assert p.poll() is None, f"{role} exited with {p.returncode}\n{engine.logs()}"
        assert time.monotonic() < deadline, f"engine never registered\n{engine.logs()}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def engine(redis_url, model, tmp_path_factory):
    eng = Engine(redis_url, model, tmp_path_factory.mktemp("logs"))
    eng.spawn("executor")
    eng.spawn("scheduler")
    yield eng
    # SIGTERM the scheduler: it tells the executor to shut down; both exit 0.
    sched, ex = eng.procs["scheduler"], eng.procs["executor"]
    sched.send_signal(signal.SIGTERM)
    try:
        assert sched.wait(15) == 0, eng.logs()
        assert ex.wait(15) == 0, eng.logs()
    finally:
        for p in eng.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
async def gateway(redis_url, engine):
    """The bus as a gateway sees it: submit requests, collect this gateway's deltas."""
    bus = Bus(redis_url, NS)
    await _wait_engine(bus, engine)
    deltas: dict[str, list[TokenDelta]] = {}

    async def listen():
        async for batch in bus.token_batches("gw"):
            for d in batch.deltas:
                deltas.setdefault(d.req_id, []).append(d)

    task = asyncio.create_task(listen())
    while (await bus.redis.pubsub_numsub(bus.keys.gateway_tokens("gw")))[0][1] == 0:
        await asyncio.sleep(0.01)
    bus.deltas = deltas  # type: ignore[attr-defined]
    yield bus
    task.cancel()
    await bus.close()


def _req(req_id: str, prompt: list[int], bus: Bus, **params) -> GenerateRequest:
    return GenerateRequest(req_id=req_id, prompt_token_ids=prompt, reply_to=bus.keys.gateway_tokens("gw"),
                           sampling_params=SamplingParams(temperature=0.0, **params),
                           arrival_time=time.time())


async def _finished(bus: Bus, req_ids: list[str], timeout_s: float = 60) -> dict[str, list[TokenDelta]]:
    deadline = time.monotonic() + timeout_s
    while not all(bus.deltas.get(r) and bus.deltas[r][-1].finish_reason for r in req_ids):
        assert time.monotonic() < deadline, f"unfinished: {req_ids}, got {bus.deltas}"
        await asyncio.sleep(0.02)
    return {r: bus.deltas[r] for r in req_ids}


async def _pending(bus: Bus) -> int:
    return (await bus.redis.xpending(bus.keys.requests, SCHEDULER_GROUP))["pending"]


def _in_process(model: str, prompts: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    """(tokens, finish reason) of each request, from the in-process engine on the same config."""
    core = EngineCore(_config(model))
    out: dict[str, tuple[list, int]] = {r: ([], 0) for r in prompts}
    for req_id, (prompt, params) in prompts.items():
        core.add_request(Request(req_id=req_id, prompt_token_ids=prompt, sampling_params=params))
    while core.has_unfinished_requests():
        for o in core.step():
            toks, _ = out[o.req_id]
            out[o.req_id] = (toks + o.new_token_ids, int(o.finish_reason or 0))
    return out


async def test_greedy_tokens_match_in_process_engine(gateway, model):
    prompts = {
        "a": ([1, 4, 9, 16, 25, 36, 49], dict(max_tokens=12, ignore_eos=True)),
        "b": ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3], dict(max_tokens=20, ignore_eos=True)),
        "c": ([100, 200], dict(max_tokens=30)),  # may stop at an EOS (ids 2, 7)
        "d": ([11] * 200, dict(max_tokens=None, ignore_eos=True)),  # runs into max_model_len
    }
    for req_id, (prompt, params) in prompts.items():
        await gateway.submit(_req(req_id, prompt, gateway, **params))
    got = await _finished(gateway, list(prompts))
    expected = _in_process(model, {r: (p, SamplingParams(temperature=0.0, **kw))
                                   for r, (p, kw) in prompts.items()})
    for req_id, deltas in got.items():
        tokens = [t for d in deltas for t in d.token_ids]
        assert (tokens, deltas[-1].finish_reason) == expected[req_id], req_id
        assert all(d.finish_reason == 0 for d in deltas[:-1])
        assert deltas[-1].num_prompt_tokens == len(prompts[req_id][0])
    assert sum(len(d.token_ids) for d in got["d"]) == MAX_MODEL_LEN - 200
    assert got["d"][-1].finish_reason == FinishReason.LENGTH
    # Finished requests are acknowledged and deleted from the stream.
    deadline = time.monotonic() + 5
    while await _pending(gateway) or await gateway.redis.xlen(gateway.keys.requests):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_stop_token_ids(gateway, model):
    prompt = [5, 6, 7, 8]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref, _ = _in_process(model, {"x": (prompt, params)})["x"]
    stop_at = next(i for i, t in enumerate(ref) if ref.index(t) == i and i >= 2)
    await gateway.submit(_req("s", prompt, gateway, max_tokens=10, ignore_eos=True,
                              stop_token_ids=[ref[stop_at]]))
    deltas = (await _finished(gateway, ["s"]))["s"]
    assert [t for d in deltas for t in d.token_ids] == ref[: stop_at + 1]
    assert deltas[-1].finish_reason == FinishReason.STOP


async def test_rejected_and_malformed_requests_get_an_error(gateway):
    await gateway.submit(_req("too-long", [5] * (MAX_MODEL_LEN + 4), gateway))
    reply_to = gateway.keys.gateway_tokens("gw")
    bad = msgspec.msgpack.encode(["bad", "x", [], reply_to])  # prompt ids are not a list
    await gateway.redis.xadd(gateway.keys.requests, {b"m": bad})
    got = await _finished(gateway, ["too-long", "bad"], timeout_s=10)
    for req_id in ("too-long", "bad"):
        [d] = got[req_id]
        assert d.finish_reason == FinishReason.ABORT and d.error and d.token_ids == []
    assert "max_model_len" in got["too-long"][0].error
    # The engine still serves.
    await gateway.submit(_req("after", [1, 2, 3], gateway, max_tokens=3, ignore_eos=True))
    after = (await _finished(gateway, ["after"]))["after"]
    assert len([t for d in after for t in d.token_ids]) == 3
    assert after[-1].finish_reason == FinishReason.LENGTH


async def test_abort_frees_blocks(gateway):
    await gateway.submit(_req("long", [1, 2, 3], gateway, max_tokens=None, ignore_eos=True))
    deadline = time.monotonic() + 30
    while sum(len(d.token_ids) for d in gateway.deltas.get("long", [])) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    [stats] = await gateway.engine_stats()
    await gateway.publish_abort(["long"])
    deadline = time.monotonic() + 5
    while True:
        [stats] = await gateway.engine_stats()
        if stats.kv_cache_usage == 0 and stats.num_running == 0 and await _pending(gateway) == 0:
            break
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    assert not any(d.finish_reason for d in gateway.deltas["long"])  # it was cut short, not finished
    assert sum(len(d.token_ids) for d in gateway.deltas["long"]) < MAX_MODEL_LEN - 3


def _assembled(deltas: list[TokenDelta]) -> list[int]:
    """A request's output as a gateway rebuilds it by index: a delta may repeat tokens it
    already has (a resumed request re-publishes what it carried) but never skip any."""
    out: list[int] = []
    for d in deltas:
        assert d.index <= len(out), f"gap: delta at {d.index} after {len(out)} tokens"
        overlap = out[d.index:]
        assert d.token_ids[: len(overlap)] == overlap, "a repeated index changed its token"
        out.extend(d.token_ids[len(overlap):])
    return out


async def _kill_mid_stream(gateway: Bus, engine: Engine, role: str, req_id: str) -> None:
    deadline = time.monotonic() + 30
    while len(_assembled(gateway.deltas.get(req_id, []))) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    engine.procs[role].kill()
    engine.procs[role].wait()


@pytest.mark.parametrize("role", ["executor", "scheduler"])
async def test_killed_process_restarted_and_requests_resume(gateway, engine, model, role):
    """kill -9 the executor or the scheduler mid-stream, start a new one: the request goes on
    from where it was (prompt + generated tokens prefilled again), every index once in the
    rebuilt output, greedy tokens equal to an uninterrupted run, nothing left pending."""
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    prompts = {f"{role}-{i}": ([1 + i, 2, 3], params) for i in range(3)}
    for req_id, (prompt, _) in prompts.items():
        await gateway.submit(_req(req_id, prompt, gateway, max_tokens=150, ignore_eos=True))
    await _kill_mid_stream(gateway, engine, role, f"{role}-0")
    seen = {r: len(_assembled(gateway.deltas.get(r, []))) for r in prompts}
    engine.spawn(role)
    got = await _finished(gateway, list(prompts), timeout_s=90)
    expected = _in_process(model, prompts)
    for req_id, deltas in got.items():
        assert not any(d.error for d in deltas), engine.logs()
        assert (_assembled(deltas), deltas[-1].finish_reason) == expected[req_id], req_id
    assert seen[f"{role}-0"] < 150  # it really was cut mid-stream
    assert "resuming" in engine.logs()
    deadline = time.monotonic() + 10
    while await _pending(gateway) or await gateway.redis.xlen(gateway.keys.token_log("e0")):
        assert time.monotonic() < deadline, "requests left pending or tokens left in the log"
        await asyncio.sleep(0.05)
    [stats] = await gateway.engine_stats()
    assert stats.kv_cache_usage == 0


async def test_spans_continue_the_gateways_trace(redis_url, model):
    """Scheduler and executor services in-process with an in-memory exporter: their request
    spans are children of the gateway's span and carry gen_ai.* attributes."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.executor.service import ExecutorService, build_runner
    from services.scheduler.service import SchedulerService
    from shared.telemetry import Event, GenAI, RequestSpans, init_tracing, inject_traceparent

    exporter = InMemorySpanExporter()
    provider = init_tracing("test", None, processor=SimpleSpanProcessor(exporter), set_global=False)
    config = _config(model)
    ns = "ttrace"
    executor = ExecutorService(Bus(redis_url, ns), "e0", 0, config, build_runner(config),
                               RequestSpans(provider, "folio-executor", "folio.executor.request"))
    scheduler = SchedulerService(Bus(redis_url, ns), "e0", config,
                                 RequestSpans(provider, "folio-scheduler", "folio.scheduler.request"))
    tasks = [asyncio.create_task(executor.run()), asyncio.create_task(scheduler.run())]
    bus = Bus(redis_url, ns)
    try:
        deadline = time.monotonic() + 30
        while not await bus.live_engines():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        with provider.get_tracer("gw").start_as_current_span("folio.gateway.request") as root:
            traceparent = inject_traceparent()
        pubsub = bus.redis.pubsub()
        await pubsub.subscribe(bus.keys.gateway_tokens("gw"))
        await bus.submit(GenerateRequest(req_id="t1", prompt_token_ids=[1, 2, 3, 4], traceparent=traceparent,
                                         sampling_params=SamplingParams(temperature=0.0, max_tokens=3,
                                                                        ignore_eos=True),
                                         reply_to=bus.keys.gateway_tokens("gw")))
        deadline = time.monotonic() + 30
        while len([s for s in exporter.get_finished_spans() if s.name != "folio.gateway.request"]) < 2:
            assert time.monotonic() < deadline, exporter.get_finished_spans()
            await asyncio.sleep(0.02)
        # The request's phases reach the published stats (forced once the engine is idle).
        while not (stats := await bus.engine_stats()) or not stats[0].histograms.get(
                "request_decode_time_seconds", HistogramCounts()).counts:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await pubsub.aclose()
    finally:
        scheduler.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await bus.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("folio.scheduler.request", "folio.executor.request"):
        span = spans[name]
        assert span.context.trace_id == root.get_span_context().trace_id
        assert span.parent.span_id == root.get_span_context().span_id
        assert span.attributes[GenAI.REQUEST_ID] == "t1"
        assert span.attributes[GenAI.USAGE_INPUT_TOKENS] == 4
        assert span.attributes[GenAI.USAGE_OUTPUT_TOKENS] == 3
    sched_span = spans["folio.scheduler.request"]
    assert sched_span.attributes[GenAI.REQUEST_MAX_TOKENS] == 3
    assert list(sched_span.attributes[GenAI.RESPONSE_FINISH_REASONS]) == ["length"]
    events = [e.name for e in sched_span.events]
    assert events == [Event.QUEUED, Event.FIRST_SCHEDULED, Event.FIRST_TOKEN, Event.FINISHED]
    times = [e.timestamp for e in sched_span.events]
    assert times == sorted(times) and sched_span.start_time <= times[0] and times[-1] <= sched_span.end_time
    # One request: one observation of each phase; 3 steps (the 4 prompt tokens, then the
    # first and second sampled tokens) of 4 + 1 + 1 tokens.
    h = stats[0].histograms
    for phase in ("queue", "prefill", "decode", "inference"):
        assert sum(h[f"request_{phase}_time_seconds"].counts) == 1, phase
    assert sum(h["iteration_tokens_total"].counts) == 3 and h["iteration_tokens_total"].total == 6


async def test_requests_of_a_gone_gateway_are_aborted(redis_url):
    """A gateway killed without a word leaves its reply channel with no subscriber: at the
    second check in a row the scheduler aborts its requests (their blocks freed, their
    entries retired); a live gateway's requests are untouched."""
    from services.scheduler.scheduler import Scheduler
    from services.scheduler.service import SchedulerService

    bus = Bus(redis_url, "torphan")
    svc = SchedulerService(bus, "e9", _config("unused"))
    svc.scheduler = Scheduler(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                              max_model_len=64, enable_prefix_caching=False)
    live, gone = bus.keys.gateway_tokens("live"), bus.keys.gateway_tokens("gone")
    pubsub = bus.redis.pubsub()
    await pubsub.subscribe(live)
    try:
        for i, (req_id, channel) in enumerate((("a", live), ("b", gone), ("c", gone))):
            svc.scheduler.add_request(Request(req_id=req_id, prompt_token_ids=[1, 2, 3], reply_to=channel,
                                              sampling_params=SamplingParams(), stream_id=f"1-{i}".encode()))
        await svc._abort_orphans()
        assert svc._aborts == set()  # silent once is not gone yet
        await svc._abort_orphans()
        assert svc._aborts == {"b", "c"}
        await svc._apply_aborts()
        assert list(svc.scheduler.requests) == ["a"]
    finally:
        await pubsub.aclose()
        await bus.close()
