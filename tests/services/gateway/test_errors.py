"""Bad requests get the right status and an OpenAI-shaped error; the server keeps serving."""

from __future__ import annotations

import json

import openai
import pytest

from tests.services.gateway.http_util import raw_post

pytestmark = pytest.mark.slow


def _assert_openai_error(body: dict, status: int, param: str | None = None) -> str:
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    return err["message"]


def _post(server, path: str, payload, key: str | None = "default") -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = (
        {} if key is None else {"Authorization": f"Bearer {server.api_key if key == 'default' else key}"}
    )
    return raw_post(server.url, path, body, headers)


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "top_k": -5}, "top_k"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_completion_params_are_400(server, payload, param):
    status, body = _post(server, "/v1/completions", {"model": server.model, **payload})
    assert status == 400, body
    assert body["error"]["type"] == "BadRequestError"
    _assert_openai_error(body, 400, param)


def test_malformed_json_is_400(server):
    status, body = _post(server, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}')
    assert status == 400
    _assert_openai_error(body, 400)


def test_prompt_longer_than_context_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[1] * 1100, max_tokens=5)
    msg = str(e.value)
    assert "maximum context length is 1024 tokens" in msg and "1100 input tokens" in msg
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[1] * 1000, max_tokens=100)
    assert "you requested 1100 tokens (1000 in the messages, 100 in the completion)" in str(e.value)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


def test_unknown_model_body_shape(server):
    status, body = _post(
        server,
        "/v1/chat/completions",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 404
    assert body["error"]["type"] == "NotFoundError"
    _assert_openai_error(body, 404, "model")


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_401(server, key):
    status, body = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=key)
    assert status == 401
    _assert_openai_error(body, 401)


def test_sdk_with_wrong_key_raises_authentication_error(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_empty_messages_is_400(server):
    status, body = _post(server, "/v1/chat/completions", {"model": server.model, "messages": []})
    assert status == 400
    _assert_openai_error(body, 400, "messages")


def test_top_logprobs_without_logprobs_is_400(server):
    status, body = _post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    )
    assert status == 400
    _assert_openai_error(body, 400, "top_logprobs")


def test_server_keeps_serving_after_errors(client, server):
    for payload in ({"prompt": "hi", "n": 0}, b"{not json", {"prompt": "hi", "max_tokens": -3}):
        status, _ = _post(server, "/v1/completions", payload)
        assert status == 400
    r = client.completions.create(
        model=server.model, prompt="Hello", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 2
