"""OpenAI request → engine requests, without a server: checks, context length, n expansion."""

from __future__ import annotations

import pytest

from services.gateway.errors import BadRequestError
from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.sampling import build_params, check_openai_ranges, expand, resolve_max_tokens


def _req(**kw) -> CompletionRequest:
    return CompletionRequest(prompt="hi", **kw)


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_openai_ranges(kw, param):
    with pytest.raises(BadRequestError) as e:
        check_openai_ranges(_req(**kw))
    assert e.value.param == param and e.value.status == 400


def test_chat_specific_ranges():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(BadRequestError) as e:
        check_openai_ranges(ChatCompletionRequest(messages=msgs, top_logprobs=3))
    assert e.value.param == "top_logprobs"
    with pytest.raises(BadRequestError) as e:
        check_openai_ranges(ChatCompletionRequest(messages=msgs, max_completion_tokens=0))
    assert e.value.param == "max_completion_tokens"
    check_openai_ranges(ChatCompletionRequest(messages=msgs, logprobs=True, top_logprobs=3))


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_engine_validation_names_the_param(kw, param):
    with pytest.raises(BadRequestError) as e:
        build_params(_req(**kw), None)
    assert e.value.param == param


def test_build_params_maps_fields():
    p = build_params(_req(temperature=0, stop="END", stop_token_ids=[5], top_k=4, ignore_eos=True, seed=9), 3)
    assert p.temperature == 0 and p.stop == ["END"] and p.stop_token_ids == [5] and p.top_k == 4
    assert p.ignore_eos and p.seed == 9 and p.logprobs == 3 and p.max_tokens is None


def test_context_length_messages():
    assert resolve_max_tokens(None, 10, 100, "prompt") == 90
    assert resolve_max_tokens(90, 10, 100, "prompt") == 90
    with pytest.raises(BadRequestError) as e:
        resolve_max_tokens(91, 10, 100, "prompt")
    assert e.value.message == (
        "This model's maximum context length is 100 tokens. However, you requested 101 tokens "
        "(10 in the messages, 91 in the completion). Please reduce the length of the messages or completion."
    )
    with pytest.raises(BadRequestError) as e:
        resolve_max_tokens(None, 100, 100, "messages")
    assert "However, your request has 100 input tokens" in e.value.message


def test_expand_ids_and_seeds():
    p = build_params(_req(n=3, seed=10), None)
    reqs = expand("cmpl-x", [[1, 2], [3]], p, [5, 6], "chan")
    assert [r.req_id for r in reqs] == [f"cmpl-x-{i}" for i in range(6)]
    assert [r.sampling_params.seed for r in reqs] == [10, 11, 12, 10, 11, 12]
    assert all(r.sampling_params.n == 1 and r.reply_to == "chan" for r in reqs)
    assert [r.sampling_params.max_tokens for r in reqs] == [5, 5, 5, 6, 6, 6]
    unseeded = expand("c", [[1]], build_params(_req(n=2), None), [4], "chan")
    assert [r.sampling_params.seed for r in unseeded] == [None, None]


def test_expand_rejects_min_tokens_above_filled_in_max():
    p = build_params(_req(min_tokens=50), None)
    with pytest.raises(BadRequestError) as e:
        expand("c", [[1]], p, [10], "chan")
    assert e.value.param == "min_tokens"


def test_nan_and_inf_are_rejected_by_the_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", temperature=float("nan"))
