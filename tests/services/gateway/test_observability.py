"""Traces, metrics and the dashboard, checked from outside against a real `folio serve`.

One stack for the whole module (startup dominates the cost): a private Redis, `folio serve`
on it exporting traces to an OTLP/HTTP receiver this test runs, with a KV cache of 4 blocks
of 16 tokens so that two 40-token requests cannot both fit (one preemption), and a second
`folio gateway` on the same Redis without any trace endpoint, started first so that it holds
the engine-metrics lease (a 1 s TTL) until the takeover test kills it. Metrics are checked as
deltas between scrapes around each workload, so the tests of this module do not depend on
each other's order.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_py
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from shared.redis_server import start_private_redis
from tests.services.gateway.conftest import (
    API_KEY,
    MAX_MODEL_LEN,
    MODEL,
    ROOT,
    _free_port,
    _healthy,
    run_server,
)
from tests.services.otlp_receiver import OTLPReceiver, Span

BLOCK_SIZE = 16
NUM_BLOCKS = 4
DASHBOARD = ROOT / "k8s" / "observability" / "dashboards" / "folio.json"
SERVICES = ("folio-gateway", "folio-scheduler", "folio-executor")
GW2_ID = "gw2-observability"
GW2_LEASE_TTL_S = 1.0


@dataclass
class Stack:
    url: str  # folio serve's gateway (traced)
    url2: str  # the second gateway (no trace endpoint; it exports the engine series)
    receiver: OTLPReceiver
    gw2: subprocess.Popen

    def client(self, url: str) -> OpenAI:
        return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stack():
    receiver = OTLPReceiver()
    redis = start_private_redis()
    mp = pytest.MonkeyPatch()
    for var in [k for k in os.environ if k.startswith("OTEL_")]:
        mp.delenv(var)
    # Export within 100 ms of a span's end (the SDK's default waits 5 s).
    mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    gw2 = st = None
    log2 = tempfile.NamedTemporaryFile("w", prefix="folio-gw2-", suffix=".log", delete=False)
    try:
        port2 = _free_port()
        gw2 = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "gateway", MODEL, "--redis-url", redis.url,
             "--host", "127.0.0.1", "--port", str(port2), "--max-model-len", str(MAX_MODEL_LEN),
             "--api-key", API_KEY, "--gateway-id", GW2_ID,
             "--engine-metrics-lease-ttl", str(GW2_LEASE_TTL_S)],
            cwd=ROOT, stdout=log2, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        # The second gateway takes the engine-metrics lease before folio serve's gateway exists.
        lease = redis_py.Redis.from_url(redis.url)
        deadline = time.monotonic() + 60
        while lease.get("folio:metrics:engine-exporter") != GW2_ID.encode():
            assert gw2.poll() is None, Path(log2.name).read_text()[-3000:]
            assert time.monotonic() < deadline, Path(log2.name).read_text()[-3000:]
            time.sleep(0.05)
        lease.close()
        with run_server("--redis-url", redis.url, "--otlp-traces-endpoint", receiver.endpoint,
                        "--num-gpu-blocks-override", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
                        "--max-num-seqs", "4") as srv:
            url2 = f"http://127.0.0.1:{port2}"
            deadline = time.monotonic() + 120
            while not _healthy(url2):
                assert gw2.poll() is None, Path(log2.name).read_text()[-3000:]
                assert time.monotonic() < deadline, Path(log2.name).read_text()[-3000:]
                time.sleep(0.2)
            st = Stack(srv.url, url2, receiver, gw2)
            try:
                yield st
            finally:
                gw2.send_signal(signal.SIGTERM)  # stops while folio serve does
    finally:
        mp.undo()
        if gw2 is not None and gw2.poll() is None:
            if st is None:  # never got to the SIGTERM above
                gw2.send_signal(signal.SIGTERM)
            try:
                gw2.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(gw2.pid, signal.SIGKILL)
                gw2.wait()
        log2.close()
        os.unlink(log2.name)
        redis.stop()
        receiver.close()
        if st is not None:
            st.receiver.close()  # the one the last test reopened


# ---------------------------------------------------------------------- helpers
Series = dict[tuple[str, tuple], float]


def scrape(url: str) -> Series:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= set(ls))


def per_engine(series: Series, name: str) -> dict[str, float]:
    return {dict(ls)["engine"]: v for (n, ls), v in series.items() if n == name and "le" not in dict(ls)}


def delta(after: Series, before: Series, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(scrapes: list[Series]) -> Series:
    """What a plain Prometheus `sum` over the gateways sees: the scrapes' values added."""
    out: Series = {}
    for s in scrapes:
        for k, v in s.items():
            out[k] = out.get(k, 0) + v
    return out


def settle(urls: list[str], name: str, at_least: float, timeout_s: float = 10) -> list[Series]:
    """Scrapes of every gateway once their sum of `name` (an engine series, which one gateway
    exports) is >= at_least: the scheduler publishes its stats after the step whose tokens
    the clients already have."""
    deadline = time.monotonic() + timeout_s
    while True:
        scrapes = [scrape(u) for u in urls]
        if value(total(scrapes), name) >= at_least or time.monotonic() > deadline:
            return scrapes
        time.sleep(0.05)


def complete(client: OpenAI, prompt: list[int], max_tokens: int):
    """A completion with a known prompt length and, with ignore_eos, a known output length."""
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True})


def wait_for_spans(receiver: OTLPReceiver, response_id: str, timeout_s: float = 30) -> list[Span]:
    """The spans of the trace whose gateway span answered `response_id`, once every service's
    span is in (each process exports on its own schedule: the scheduler's span ends after the
    executor streamed the last token, so it can arrive after the gateway's)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = receiver.snapshot()
        roots = [s for s in spans if s.attributes.get("gen_ai.response.id") == response_id]
        trace = [s for s in spans if roots and s.trace_id == roots[0].trace_id]
        if {s.service for s in trace} >= set(SERVICES) or time.monotonic() > deadline:
            return trace
        time.sleep(0.05)


# ---------------------------------------------------------------------- traces
def test_one_trace_per_request_across_the_three_services(stack):
    resp = stack.client(stack.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=6, temperature=0.7, top_p=0.9, seed=7)
    spans = wait_for_spans(stack.receiver, resp.id)
    by_service = {s.service: s for s in spans}
    assert sorted(by_service) == sorted(SERVICES), [(s.service, s.name) for s in spans]
    assert len(spans) == 3  # one span per service, one trace
    gw, sched, ex = (by_service[n] for n in SERVICES)
    # The gateway's span is the root; the engine's spans hang off it (the traceparent it sent).
    assert gw.parent_span_id == ""
    assert sched.parent_span_id == gw.span_id and ex.parent_span_id == gw.span_id
    assert gw.name == f"chat {MODEL}"
    a = gw.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.response.id"] == resp.id
    assert a["gen_ai.response.finish_reasons"] == [resp.choices[0].finish_reason]
    assert a["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens
    # The engine's spans agree with the response on the usage it computed.
    for s in (sched, ex):
        assert s.attributes["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
        assert s.attributes["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens
        assert s.attributes["gen_ai.response.finish_reasons"] == [resp.choices[0].finish_reason]
    assert sched.attributes["gen_ai.request.max_tokens"] == 6
    assert sched.attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    # The request's life on the scheduler, in order, inside its span.
    assert [e for e, _ in sched.events] == ["queued", "first_scheduled", "first_token", "finished"]
    times = [t for _, t in sched.events]
    assert times == sorted(times) and sched.start_ns <= times[0] and times[-1] <= sched.end_ns
    assert [e for e, _ in gw.events] == ["first_token", "finished"]
    assert {s.resource["folio.component"] for s in spans} == {"gateway", "scheduler", "executor"}
    # And no span of this request in any other trace (engine request ids are `{id}-{choice}`).
    mine = [s for s in stack.receiver.snapshot()
            if str(s.attributes.get("gen_ai.request.id", "")).startswith(resp.id)]
    assert len(mine) == 3 and {s.trace_id for s in mine} == {gw.trace_id}


def test_no_endpoint_exports_nothing(stack):
    """The second gateway has no endpoint: it makes no span, so no traceparent reaches the
    engine, whose processes (which do export) then trace nothing for the request either."""
    resp = complete(stack.client(stack.url2), [5000 + i for i in range(8)], 2)
    traced = stack.client(stack.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    # Wait until spans of a request sent after it arrived: any of its spans would be in by then.
    assert len(wait_for_spans(stack.receiver, traced.id)) == 3
    spans = stack.receiver.snapshot()
    assert not [s for s in spans if s.attributes.get("gen_ai.response.id") == resp.id]
    assert not [s for s in spans if str(s.attributes.get("gen_ai.request.id", "")).startswith(resp.id)]


# ---------------------------------------------------------------------- metrics
ENGINE_PHASES = ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds")


def test_counters_and_histograms_after_a_known_workload_two_gateways(stack):
    """Two 40-token prompts, the second a prefix hit (2 full blocks = 32 tokens), 2 tokens
    each; one through each gateway. Every series of the workload is exact; the gateways'
    request series sum to the totals, and so do the engine series: one gateway exports them."""
    c1, c2 = stack.client(stack.url), stack.client(stack.url2)
    urls = [stack.url, stack.url2]
    before = [scrape(u) for u in urls]
    engine_before = value(total(before), "folio:iteration_tokens_total_count")
    prompt = [1000 + i for i in range(40)]
    complete(c1, prompt, 2)
    complete(c2, prompt, 2)
    # 4 steps: C's 40 prompt tokens, its first token; D's 8 uncached tokens, its first token.
    after = settle(urls, "folio:iteration_tokens_total_count", engine_before + 4)

    def gw_total(name: str, **labels: str) -> float:
        return sum(delta(a, b, name, **labels) for a, b in zip(after, before, strict=True))

    # Request series: each gateway counted its own request; the sum is the truth.
    for a, b in zip(after, before, strict=True):
        assert delta(a, b, "folio:request_success_total", finished_reason="length") == 1
    assert gw_total("folio:prompt_tokens_total") == 80
    assert gw_total("folio:generation_tokens_total") == 4
    assert gw_total("folio:request_success_total") == 2
    assert gw_total("folio:request_success_total", finished_reason="length") == 2
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "request_time_per_output_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens"):
        assert gw_total(f"folio:{name}_count") == 2, name
    assert gw_total("folio:request_prompt_tokens_sum") == 80
    assert gw_total("folio:request_generation_tokens_sum") == 4
    assert gw_total("folio:request_prompt_tokens_bucket", le="50.0") == 2
    assert gw_total("folio:request_prompt_tokens_bucket", le="20.0") == 0

    # Engine series: exported by the lease holder (the second gateway) alone, so the plain
    # sum over both gateways is the truth.
    engine_names = ("folio:num_requests_running", "folio:num_requests_waiting", "folio:kv_cache_usage_perc",
                    "folio:prefix_cache_queries_total", "folio:prefix_cache_hits_total",
                    "folio:num_preemptions_total", "folio:iteration_tokens_total_count",
                    "folio:request_queue_time_seconds_count", "folio:num_requests_unclaimed")
    for name in engine_names:
        assert not [k for k in after[0] if k[0] == name], name
        assert [k for k in after[1] if k[0] == name], name
    engines = set(per_engine(after[1], "folio:num_requests_running"))
    assert len(engines) == 1
    # Request series carry the engine that served them, on both gateways.
    for a in after:
        served = {dict(ls)["engine"] for (n, ls), v in a.items()
                  if n == "folio:request_success_total" and v > 0}
        assert served == engines, served
        for (n, ls) in a:
            if n.startswith(("folio:time_to_first_token", "folio:e2e_request", "folio:prompt_tokens",
                             "folio:request_success")):
                assert "engine" in dict(ls), (n, ls)
    a, b = total(after), total(before)
    assert delta(a, b, "folio:prefix_cache_queries_total") == 80
    assert delta(a, b, "folio:prefix_cache_hits_total") == 32
    assert delta(a, b, "folio:num_preemptions_total") == 0
    assert delta(a, b, "folio:iteration_tokens_total_count") == 4
    assert delta(a, b, "folio:iteration_tokens_total_sum") == 40 + 1 + 8 + 1
    assert delta(a, b, "folio:iteration_tokens_total_bucket", le="8.0") == 3  # 1, 8, 1
    for name in ENGINE_PHASES:
        assert delta(a, b, f"folio:{name}_count") == 2, name
    # Idle again: nothing running or waiting, and cached blocks count as free (vLLM's usage).
    for name in ("folio:num_requests_running", "folio:num_requests_waiting", "folio:kv_cache_usage_perc"):
        assert list(per_engine(a, name).values()) == [0], name
    assert [v for (n, _), v in a.items() if n == "folio:num_requests_unclaimed"] == [0]


def test_one_forced_preemption(stack):
    """Two requests of 20 + 20 tokens need 3 blocks each; the cache has 4, so the one
    admitted last is preempted once, waits for the other to finish, and is recomputed."""
    client = stack.client(stack.url)
    urls = [stack.url, stack.url2]
    before = total([scrape(u) for u in urls])
    engine_before = value(before, "folio:request_queue_time_seconds_count")
    prompts = [[2000 + i for i in range(20)], [3000 + i for i in range(20)]]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda p: complete(client, p, 20), prompts))
    assert [r.usage.completion_tokens for r in responses] == [20, 20]
    assert [r.choices[0].finish_reason for r in responses] == ["length", "length"]
    after = total(settle(urls, "folio:request_queue_time_seconds_count", engine_before + 2))

    assert delta(after, before, "folio:num_preemptions_total") == 1
    assert delta(after, before, "folio:prompt_tokens_total") == 40
    assert delta(after, before, "folio:generation_tokens_total") == 40
    assert delta(after, before, "folio:request_success_total", finished_reason="length") == 2
    assert delta(after, before, "folio:time_to_first_token_seconds_count") == 2
    assert delta(after, before, "folio:inter_token_latency_seconds_count") == 38
    assert delta(after, before, "folio:request_time_per_output_token_seconds_count") == 2
    assert delta(after, before, "folio:request_generation_tokens_sum") == 40
    assert delta(after, before, "folio:request_generation_tokens_bucket", le="20.0") == 2
    assert delta(after, before, "folio:request_generation_tokens_bucket", le="10.0") == 0
    for name in ENGINE_PHASES:  # once per request, however often it was scheduled
        assert delta(after, before, f"folio:{name}_count") == 2, name
    # Computed tokens: every prompt and output token once (40 + 38), plus the preempted
    # request's recomputation of what the prefix cache no longer held (at least its last token).
    computed = delta(after, before, "folio:iteration_tokens_total_sum")
    assert 78 < computed <= 78 + 39, computed
    # The preempted request looked the cache up again, with its prompt and some output (it
    # was preempted for want of a third block: it held at least 21 tokens, at most 39).
    queries = delta(after, before, "folio:prefix_cache_queries_total")
    assert 40 + 21 <= queries <= 40 + 39, queries
    assert delta(after, before, "folio:prefix_cache_hits_total") <= queries - 40

    # Its trace says so: one scheduler span with a preempted event, scheduled first only once.
    sched = [s for r in responses for s in wait_for_spans(stack.receiver, r.id)
             if s.service == "folio-scheduler"]
    assert len(sched) == 2, [(s.service, s.name, s.events) for r in responses
                             for s in wait_for_spans(stack.receiver, r.id)]
    events = sorted([e for e, _ in s.events] for s in sched)
    assert events == [["queued", "first_scheduled", "first_token", "finished"],
                      ["queued", "first_scheduled", "first_token", "preempted", "finished"]]


# ---------------------------------------------------------------------- dashboard
def _selectors(node) -> list[str]:
    """Metric names of every vector selector in a promql_parser expression tree."""
    import promql_parser

    if isinstance(node, promql_parser.VectorSelector):
        return [node.name]
    found = []
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found += _selectors(child)
    for child in getattr(node, "args", None) or []:
        found += _selectors(child)
    return found


def test_dashboard_queries_parse_and_name_exported_metrics(stack):
    import promql_parser

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    exported = {name for u in (stack.url, stack.url2) for name, _ in scrape(u)}
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "ttft", "inter-token", "kv cache", "queue", "preemption", "prefix"):
        assert topic in titles, topic
    for title, expr in exprs:
        # Grafana's $__rate_interval and $model are template variables, not PromQL.
        promql = expr.replace("$__rate_interval", "1m").replace("$model", "m")
        names = _selectors(promql_parser.parse(promql))
        assert names, (title, expr)
        for name in names:
            assert name in exported, (title, name)


# ---------------------------------------------------------------------- kills the second gateway
def test_engine_series_move_to_the_other_gateway_when_the_exporter_dies(stack):
    """SIGKILL the lease holder (nothing released): folio serve's gateway exports the engine
    series once the lease's 1 s TTL ran out, within its next renewal round (1 s)."""
    assert [k for k in scrape(stack.url2) if k[0] == "folio:num_requests_running"]
    assert not [k for k in scrape(stack.url) if k[0] == "folio:num_requests_running"]
    os.killpg(stack.gw2.pid, signal.SIGKILL)
    stack.gw2.wait()
    t = time.monotonic()
    while not [k for k in scrape(stack.url) if k[0] == "folio:num_requests_running"]:
        assert time.monotonic() - t < GW2_LEASE_TTL_S + 1.5, "no takeover"
        time.sleep(0.05)
    took = time.monotonic() - t
    assert took <= GW2_LEASE_TTL_S + 1.0 + 0.3, took
    s = scrape(stack.url)
    assert [v for (n, _), v in s.items() if n == "folio:num_requests_unclaimed"] == [0]


# ---------------------------------------------------------------------- last: closes the receiver
def test_an_unreachable_collector_does_not_slow_requests(stack):
    """Runs last in this module (it closes the receiver): the same requests, timed with the
    collector up and with its port refusing connections."""

    def timed(n: int) -> list[float]:
        out = []
        for i in range(n):
            t = time.perf_counter()
            complete(stack.client(stack.url), [6000 + i for i in range(8)], 4)
            out.append(time.perf_counter() - t)
        return out

    up = timed(4)
    stack.receiver.close()
    down = timed(4)
    # Listen again, so the services' final flush at shutdown does not wait out its timeout.
    stack.receiver = OTLPReceiver(stack.receiver.port)
    # An export on the request path would block for the exporter's retries (up to its 2 s
    # timeout) at every span end: +2 s or more on each request. The fastest request with the
    # collector down against the median with it up tolerates a loaded 2-core machine's noise.
    assert min(down) < 2 * statistics.median(up) + 0.5, (up, down)
