"""ModelRunner against transformers: batched prefill + decode, chunked prefill, prefix-cache
hits and resumed (preempted) requests give the same greedy tokens, fp32, on tiny models."""

from __future__ import annotations

import os
import random

import pytest
import torch

from services.executor.model_runner import ModelRunner
from shared.config import ConfigError, EngineConfig
from shared.protocol import CachedRequestData, StepPlan
from shared.sampling_params import SamplingParams
from tests.services.executor.hf_tokens import hf_greedy_no_eos
from tests.services.executor.runner_driver import RunnerDriver
from tests.tiny_models import ARCHS, EOS_TOKEN_IDS, make_tiny_model

NEW_TOKENS = 24
# The runner's device; the transformers reference always runs on CPU.
DEVICE = os.environ.get("FOLIO_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a shared 2-core machine OpenMP
    # threads waiting on each other make them ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    cache = {}

    def get(arch: str, tied: bool = False):
        key = (arch, tied)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}_{'tied' if tied else 'untied'}")
            cache[key] = make_tiny_model(arch, out, tie_word_embeddings=tied)
        return cache[key]

    return get


def make_runner(path, block_size: int = 16, **kw) -> ModelRunner:
    kw.setdefault("num_gpu_blocks_override", 256)
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        device=DEVICE,
        attention_backend="torch",
        block_size=block_size,
        **kw,
    )
    return ModelRunner(config)


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids >= 10: never the pad id 0 (transformers would mask it) nor an EOS id.
    return [[rng.randrange(10, 256) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("block_size", [16, 1, 4])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_matches_transformers(tiny_dirs, arch, tied, block_size):
    path = tiny_dirs(arch, tied)
    prompts = random_prompts([5, 17, 33, 2])
    driver = RunnerDriver(make_runner(path, block_size), stop_at_eos=False)
    ids = [f"r{i}" for i in range(len(prompts))]
    for req_id, p in zip(ids, prompts, strict=True):
        driver.add(req_id, p)
    first = driver.step({r: len(p) for r, p in zip(ids, prompts, strict=True)})
    assert first.req_ids == ids  # every prompt completes in one step, so all sample, in plan order
    driver.decode_until(ids, NEW_TOKENS)
    got = [driver.requests[r].output for r in ids]
    assert got == hf_greedy_no_eos(path, prompts, NEW_TOKENS)


@pytest.mark.parametrize("arch,block_size", [("llama", 4), ("qwen3", 16), ("qwen2", 1)])
def test_chunked_prefill_beside_decode(tiny_dirs, arch, block_size):
    path = tiny_dirs(arch)
    long, short = random_prompts([40, 6], seed=1)
    driver = RunnerDriver(make_runner(path, block_size), stop_at_eos=False)
    driver.add("long", long)
    driver.add("short", short)
    # Chunks of 13, 14, 13 tokens: boundaries fall inside blocks; "short" decodes meanwhile.
    res = driver.step({"short": 6, "long": 13})
    assert res.req_ids == ["short"]  # a mid-prompt chunk samples nothing
    res = driver.step({"long": 14, "short": 1})
    assert res.req_ids == ["short"]
    res = driver.step({"short": 1, "long": 13})
    assert res.req_ids == ["short", "long"]
    driver.decode_until(["long", "short"], NEW_TOKENS)
    got = [driver.requests[r].output for r in ("long", "short")]
    assert got == hf_greedy_no_eos(path, [long, short], NEW_TOKENS)


@pytest.mark.parametrize("block_size", [16, 4])
def test_prefix_cache_hit_reuses_blocks(tiny_dirs, block_size):
    path = tiny_dirs("qwen2", True)
    (base,) = random_prompts([37], seed=2)
    (tail,) = random_prompts([7], seed=3)
    driver = RunnerDriver(make_runner(path, block_size), stop_at_eos=False)
    owner = driver.add("owner", base)
    driver.step({"owner": len(base)})
    driver.step({"owner": 1})
    # A new request sharing the first 32 tokens: its first blocks are the owner's, already
    # written, and only the rest of its prompt is computed.
    hit_blocks = 32 // block_size
    prompt = base[:32] + tail
    driver.add("hit", prompt, cached_blocks=owner.block_ids[:hit_blocks], num_cached_tokens=32)
    res = driver.step({"owner": 1, "hit": len(prompt) - 32})
    assert res.req_ids == ["owner", "hit"]
    driver.decode_until(["owner", "hit"], NEW_TOKENS)
    got = [driver.requests[r].output for r in ("owner", "hit")]
    assert got == hf_greedy_no_eos(path, [base, prompt], NEW_TOKENS)


def test_resumed_request_recomputes_its_output(tiny_dirs):
    path = tiny_dirs("mistral")
    (prompt,) = random_prompts([21], seed=4)
    (expected,) = hf_greedy_no_eos(path, [prompt], NEW_TOKENS)
    driver = RunnerDriver(make_runner(path, 4), stop_at_eos=False)
    driver.add("a", prompt)
    driver.step({"a": len(prompt)})
    driver.decode_until(["a"], 10)
    # Preempted: freed, then sent again as new with its 10 tokens so far as output, recomputed.
    driver.step({}, finished=["a"])
    assert "a" not in driver.runner.input_batch.requests
    done = driver.requests["a"].output
    driver.add("a", prompt, output=done)
    driver.step({"a": len(prompt) + len(done)})
    driver.decode_until(["a"], NEW_TOKENS)
    assert driver.requests["a"].output == expected


def test_logprobs_only_when_asked(tiny_dirs):
    path = tiny_dirs("llama")
    p1, p2 = random_prompts([4, 9], seed=5)
    driver = RunnerDriver(make_runner(path))
    driver.add("plain", p1)
    res = driver.step({"plain": len(p1)})
    assert res.logprobs == []
    driver.add("lp", p2, SamplingParams(temperature=0.0, logprobs=2))
    res = driver.step({"plain": 1, "lp": len(p2)})
    assert res.req_ids == ["plain", "lp"]
    assert res.logprobs[0] == []
    (lp,) = res.logprobs[1]
    assert lp.token_id == res.sampled_token_ids[1][0] and lp.rank == 1 and len(lp.top_ids) == 2


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_dirs):
    path = tiny_dirs("qwen3")
    p1, p2 = random_prompts([6, 11], seed=6)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(with_other: bool) -> list[int]:
        driver = RunnerDriver(make_runner(path), stop_at_eos=False)
        driver.add("s", p1, seeded)
        schedule = {"s": len(p1)}
        if with_other:
            driver.add("o", p2, SamplingParams(temperature=1.0))
            schedule = {"o": len(p2), "s": len(p1)}
        driver.step(schedule)
        driver.decode_until(list(schedule), 8)
        return driver.requests["s"].output

    assert run(False) == run(True)


def test_runner_attributes(tiny_dirs):
    path = tiny_dirs("llama3")
    runner = make_runner(path, 8, max_model_len=100)
    assert runner.max_model_len == 100
    assert runner.eos_token_ids == frozenset(EOS_TOKEN_IDS)
    assert runner.vocab_size == 256 and runner.block_size == 8 and runner.num_blocks == 256
    assert runner.dtype == torch.float32 and runner.device.type == DEVICE
    assert runner.model_path == path and runner.hf_config.vocab_size == 256
    k, v = runner.kv_caches[0]
    assert len(runner.kv_caches) == 2 and k.shape == v.shape == (256, 8, 2, 16)
    with pytest.raises(ConfigError, match="max_model_len"):
        make_runner(path, max_model_len=513)
    assert make_runner(path).max_model_len == 512


def test_plan_errors_are_raised(tiny_dirs):
    path = tiny_dirs("llama")
    runner = make_runner(path, 4)
    driver = RunnerDriver(runner)
    (p,) = random_prompts([10])
    with pytest.raises(KeyError, match="ghost"):
        runner.execute(StepPlan(step_id=0, num_scheduled_tokens={"ghost": 1}))
    driver.add("a", p)
    driver.step({"a": 8})  # two blocks of 4
    with pytest.raises(ValueError, match="only 10 tokens are known"):
        runner.execute(
            StepPlan(
                step_id=1, cached_requests=[CachedRequestData("a", [], 8)], num_scheduled_tokens={"a": 5}
            )
        )
    with pytest.raises(ValueError, match="2 blocks cannot hold 10 tokens"):
        runner.execute(
            StepPlan(
                step_id=2, cached_requests=[CachedRequestData("a", [], 8)], num_scheduled_tokens={"a": 2}
            )
        )


CHAT = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence what a CPU cache is.",
    "List three colours of the rainbow.",
]


@pytest.mark.slow
def test_smollm2_chat_batch_matches_transformers(smollm2_dir):
    from services.executor.loader import load_tokenizer
    from tests.hf_reference import hf_greedy

    tok = load_tokenizer(smollm2_dir)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in CHAT
    ]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    runner = make_runner(smollm2_dir, 16, num_gpu_blocks_override=64)
    driver = RunnerDriver(runner)
    ids = [f"c{i}" for i in range(len(prompts))]
    for req_id, p in zip(ids, prompts, strict=True):
        driver.add(req_id, p)
    driver.step({r: len(p) for r, p in zip(ids, prompts, strict=True)})
    driver.decode_until(ids, 32)
    got = [driver.requests[r].output for r in ids]
    assert sum(map(len, got)) > 4 * 8  # real answers, not an immediate EOS
    assert got == hf_greedy(smollm2_dir, prompts, 32)
