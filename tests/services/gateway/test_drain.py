"""SIGTERM drains `folio serve` (issue 11, item 3), and the server's --request-timeout.

One small server of its own, stopped by the last test: on SIGTERM /ready turns 503 at once
(/health stays 200: the process is alive), new requests get a 503 in the OpenAI shape, a
request in flight finishes, one that outlasts --shutdown-timeout ends with an SSE error
event, and `folio serve` exits 0 once its children have drained in order.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import openai
import pytest

from tests.services.gateway.conftest import run_server
from tests.services.gateway.http_util import get, metrics, open_stream, raw_post, wait_metrics
from tests.services.test_cli_serve import _descendants

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 5.0
SHUTDOWN_TIMEOUT_S = 3.0
STALL_TIMEOUT_S = 1.5
LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def drain_server():
    flags = ["--request-timeout", str(REQUEST_TIMEOUT_S), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
             "--engine-stall-timeout", str(STALL_TIMEOUT_S)]
    with run_server(*flags, "--max-num-seqs", "8") as srv:
        yield srv


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0, timeout=60)


def test_server_request_timeout_applies_and_a_body_cannot_extend_it(drain_server):
    srv = drain_server
    baseline = metrics(srv.url)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        _client(srv).completions.create(
            model=srv.model, prompt="Once upon a time", max_tokens=900, temperature=0,
            extra_body={"ignore_eos": True, "request_timeout": 600})
    took = time.monotonic() - t0
    assert info.value.status_code == 504 and "deadline of 5s" in info.value.message
    # Well before the 900 tokens could finish (over a minute here); the slack is for a loaded box.
    assert REQUEST_TIMEOUT_S <= took < REQUEST_TIMEOUT_S + 10, took
    kv = baseline["folio:kv_cache_usage_perc"]
    wait_metrics(srv.url, lambda m: m["folio:num_requests_running"] == 0
                 and m["folio:kv_cache_usage_perc"] == pytest.approx(kv), 30, "KV freed after the deadline")


def test_health_fails_while_an_engine_with_work_makes_no_progress(drain_server):
    """An executor frozen mid-request (SIGSTOP): its scheduler publishes no stats while it waits
    for the step, so /health is 503 after --engine-stall-timeout, long before the heartbeats
    (5 s) or --step-timeout would tell; SIGCONT and it is 200 again."""
    srv = drain_server
    [executor] = [p for p, cmd in _descendants(srv.proc.pid).items() if "services.cli executor" in cmd]
    payload = {"model": srv.model, "prompt": "Once upon a time", "stream": True, **LONG}
    conn = open_stream(srv.url, "/v1/completions", payload, srv.api_key)
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")  # it is running
    assert get(srv.url, "/health")[0] == 200
    os.kill(executor, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while (health := get(srv.url, "/health"))[0] == 200:
            assert time.monotonic() - t0 < 10, "/health never noticed the stall"
            time.sleep(0.1)
        stalled_after = time.monotonic() - t0
    finally:
        os.kill(executor, signal.SIGCONT)
    status, body = health
    assert status == 503 and b"have not finished a step" in body, body
    assert stalled_after >= STALL_TIMEOUT_S - 0.5  # stats up to 0.5 s old when it froze
    deadline = time.monotonic() + 20
    while get(srv.url, "/health")[0] != 200:
        assert time.monotonic() < deadline, "/health did not recover"
        time.sleep(0.1)
    conn.close()
    print(f"\n/health 503 {stalled_after:.1f}s after the executor froze "
          f"(--engine-stall-timeout {STALL_TIMEOUT_S})")


def test_sigterm_drains(drain_server):
    srv = drain_server
    assert get(srv.url, "/ready")[0] == 200
    # A stream that will outlast the shutdown timeout: wait for its first token.
    payload = {"model": srv.model, "prompt": "Once upon a time", "stream": True, **LONG}
    conn = open_stream(srv.url, "/v1/completions", payload, srv.api_key)
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    # A short request in flight when SIGTERM comes: it must complete.
    short: dict = {}

    def run_short() -> None:
        try:
            short["out"] = _client(srv).completions.create(model=srv.model, prompt="Hi", max_tokens=4,
                                                           temperature=0)
        except Exception as e:  # reported by the assertion below
            short["error"] = e

    worker = threading.Thread(target=run_short)
    worker.start()
    deadline = time.monotonic() + 10
    while json.loads(get(srv.url, "/ready")[1])["in_flight"] < 2:  # the short one is in too
        assert time.monotonic() < deadline, "the short request never reached the gateway"
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)

    deadline = time.monotonic() + 5
    while get(srv.url, "/ready")[0] != 503:
        assert time.monotonic() < deadline, "/ready never turned 503"
        time.sleep(0.05)
    assert get(srv.url, "/health")[0] == 200  # draining is not dead
    new = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    status, body = raw_post(srv.url, "/v1/completions", new, {"Authorization": f"Bearer {srv.api_key}"})
    assert status == 503 and body["error"]["type"] == "ServiceUnavailableError", body
    assert metrics(srv.url)["folio:request_rejected_total:shutting_down"] == 1  # /metrics still served

    worker.join(30)
    assert "error" not in short, short
    assert short["out"].usage.completion_tokens == 4

    rest = resp.read().decode()
    ended = time.monotonic() - t0
    conn.close()
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "ServiceUnavailableError" and "--shutdown-timeout" in error["message"]
    assert SHUTDOWN_TIMEOUT_S - 0.5 <= ended < SHUTDOWN_TIMEOUT_S + 8, ended

    assert srv.proc.wait(SHUTDOWN_TIMEOUT_S + 20) == 0
    exited = time.monotonic() - t0
    print(f"\nstream ended {ended:.1f}s after SIGTERM; folio serve exited {exited:.1f}s after it")
