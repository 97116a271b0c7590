"""Input limits and hygiene: clear 4xx in the OpenAI shape, never a 5xx; no pickle on the wire."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from services.gateway.sampling import MAX_N, MAX_STOP_LEN, MAX_STOP_STRINGS
from tests.services.gateway.http_util import raw_post

ROOT = Path(__file__).resolve().parents[3]


def _post(server, path: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps({"model": server.model, **payload}).encode()
    return raw_post(server.url, path, body, {"Authorization": f"Bearer {server.api_key}"})


def _error(body: dict, status: int) -> dict:
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == status
    return err


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, payload, param, words",
    [
        ("/v1/completions", {"prompt": "hi", "n": MAX_N + 1}, "n", "n must be in"),
        ("/v1/chat/completions", {**CHAT, "n": MAX_N + 1}, "n", "n must be in"),
        ("/v1/completions", {"prompt": "hi", "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop", "at most"),
        ("/v1/chat/completions", {**CHAT, "stop": "y" * (MAX_STOP_LEN + 1)}, "stop", "characters"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1] * 1025}, "stop_token_ids", "at most"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "[0, 20]"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ("/v1/completions", {"prompt": ["hi"] * 1025}, "prompt", "at most 1024 prompts"),
        ("/v1/completions", {"prompt": "hi", "request_timeout": 0}, "request_timeout", "positive"),
        ("/v1/responses", {"input": "hi", "request_timeout": -1}, "request_timeout", "positive"),
        ("/v1/completions", {"prompt": "hello " * 1100}, "prompt", "maximum context length"),
    ],
)
def test_limits_are_400(server, path, payload, param, words):
    status, body = _post(server, path, payload)
    assert status == 400, body
    err = _error(body, 400)
    assert err["type"] == "BadRequestError" and err["param"] == param and words in err["message"]


@pytest.mark.slow
def test_body_over_the_limit_is_413(server):
    """16 MiB by default; checked by Content-Length before a byte of the body is read."""
    body = b'{"prompt": "' + b"a" * (16 * 1024 * 1024) + b'"}'
    status, resp = _post(server, "/v1/completions", body)
    assert status == 413
    err = _error(resp, 413)
    assert err["type"] == "PayloadTooLargeError" and "16777216 bytes" in err["message"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return names


def test_no_pickle_in_services_or_shared():
    """Everything on the wire is msgpack through msgspec (DESIGN.md §2): unpickling what arrives
    from Redis would let anyone who can write to it run code in every service."""
    unsafe = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & unsafe)
        for d in ("services", "shared")
        for p in (ROOT / d).rglob("*.py")
        if _imports(p) & unsafe
    }
    assert not offenders, offenders
