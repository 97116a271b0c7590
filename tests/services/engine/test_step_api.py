"""`LLM`'s step-level API (add_request / step / abort) and generate()'s options, on a tiny
model with token ids in and out."""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from tests.tiny_models import make_tiny_model

PROMPTS = [[5, 9, 12, 40], [7, 7, 3], [100, 101, 102, 103, 104]]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = make_tiny_model("llama", tmp_path_factory.mktemp("tiny"))
    return LLM(str(path), dtype="float32", device="cpu", skip_tokenizer_init=True, max_model_len=128,
               num_gpu_blocks_override=64, block_size=4)


def _idle(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert not llm.has_unfinished_requests()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_add_request_step_and_abort(llm):
    want = llm.generate([PROMPTS[0]], greedy(5))[0].token_ids
    llm.add_request("short", PROMPTS[0], greedy(5))
    llm.add_request("long", PROMPTS[1], greedy(100))
    assert llm.has_unfinished_requests()
    seen: dict[str, int] = {}
    finished = None
    for _ in range(50):
        for out in llm.step():
            assert out.request_id in ("short", "long")
            # Outputs accumulate: each step's object holds every token so far.
            assert len(out.token_ids) >= seen.get(out.request_id, 0)
            seen[out.request_id] = len(out.token_ids)
            if out.request_id == "short" and out.finished:
                finished = out
        if finished is not None:
            break
    assert finished is not None and finished.token_ids == want and finished.finish_reason == "length"
    assert 0 < seen["long"] < 100
    llm.abort("long")
    assert not any(o.request_id == "long" for o in llm.step())  # nothing more comes for it
    _idle(llm)


def test_abort_returns_the_partial_output_marked_abort(llm):
    llm.add_request("r", PROMPTS[2], greedy(100))
    out = None
    while out is None or len(out.token_ids) < 3:
        [out] = llm.step()
    llm.abort("r")
    assert out.finish_reason == "abort" and out.finished and 3 <= len(out.token_ids) < 100
    _idle(llm)


def test_duplicate_request_ids_are_rejected_until_finished(llm):
    llm.add_request("dup", PROMPTS[0], greedy(2))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("dup", PROMPTS[1], greedy(2))
    # n > 1 children are named after the parent; their ids cannot collide with it either.
    while llm.has_unfinished_requests():
        llm.step()
    llm.add_request("dup", PROMPTS[1], greedy(2))  # free again once finished
    while llm.has_unfinished_requests():
        outs = llm.step()
    assert outs[0].prompt_token_ids == PROMPTS[1] and len(outs[0].token_ids) == 2
    _idle(llm)


def test_per_prompt_params_list(llm):
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True, n=2)
    params = [greedy(2), greedy(5), sampled]
    outs = llm.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs[:2]] == [2, 5]
    assert [len(c.token_ids) for c in outs[2].outputs] == [4, 4]
    # Each prompt got its own params: the same as running it alone with them.
    for prompt, p, out in zip(PROMPTS, params, outs, strict=True):
        alone = llm.generate([prompt], p)[0]
        assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in out.outputs]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPTS, params[:2])
    _idle(llm)


def test_use_tqdm_shows_progress(llm, capsys):
    outs = llm.generate(PROMPTS, greedy(2), use_tqdm=True)
    assert len(outs) == 3
    err = capsys.readouterr().err
    assert "Generating" in err and "3/3" in err
    llm.generate(PROMPTS, greedy(2))
    assert "Generating" not in capsys.readouterr().err
