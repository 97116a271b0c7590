"""Load generator for the OpenAI-compatible server, optionally against the in-process engine.

    python benchmarks/serve.py --url http://127.0.0.1:8000 --concurrency 64 --num-prompts 256
    python benchmarks/serve.py --request-rate 8 --num-prompts 200          # Poisson arrivals
    python benchmarks/serve.py --concurrency 64 --compare-inprocess        # starts its own `folio serve`
    python benchmarks/serve.py --concurrency 64 --baseline-checkout /tmp/folio-base   # vs another version

Prompts are random token ids from the tokenizer's vocabulary (special tokens excluded),
sent as token-id prompts so their lengths are exact; every request streams a completion
with ignore_eos so it produces exactly --output-len tokens. Prints output tokens/s, TTFT
and ITL percentiles (and, for a server it starts, the `folio gateway` process's CPU per
output token, through psutil). With --compare-inprocess, the same prompts then run through
`services.engine.LLM` in this process with the same concurrency cap, and the ratio
server/in-process is printed (a server this script started is stopped first, so the two
never compete for the CPU or the GPU's memory).

With --baseline-checkout DIR (a checkout of another folio version, e.g. made with `git
worktree add /tmp/folio-base REF`), the same prompts also run against a `folio serve`
started from DIR with the same flags, one server at a time, and the ITL and throughput
ratios are printed. Servers this script starts use a Redis it starts itself, so it can
report the Redis commands each one issued (INFO commandstats) per 1000 output tokens.

The HTTP client is a minimal asyncio HTTP/1.1 + SSE reader: on a small machine the load
generator shares the CPU with the server, and a heavyweight client would skew the result.
"""

from __future__ import annotations

import os as _os

from shared.openmp import OPENMP_ENV  # folio is installed

_os.environ.update({**OPENMP_ENV, **_os.environ})  # before torch loads (shared/openmp.py)

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.cli_args import ENGINE_FIELDS, add_engine_args, model_from_args  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    error: str = ""


# ---------------------------------------------------------------------- HTTP client
async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield the response body's pieces (chunked or not) as they arrive."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def stream_completion(url: urllib.parse.ParseResult, payload: dict, api_key: str | None) -> Result:
    res = Result()
    body = json.dumps(payload).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST {url.path.rstrip('/')}/v1/completions HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{auth}Connection: close\r\n\r\n"
    )
    t0 = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(head.encode() + body)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        buf, last = b"", 0.0
        async for piece in _read_body(reader, headers):
            if status != 200:
                buf += piece
                continue
            buf += piece
            now = time.perf_counter()
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                msg = json.loads(ev[6:])
                if "error" in msg:
                    res.error = msg["error"].get("message", "error")
                    continue
                if msg.get("usage"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
                if msg.get("choices") and msg["choices"][0].get("text"):
                    if last == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
        if status != 200:
            res.error = f"HTTP {status}: {buf[:300].decode(errors='replace')}"
        res.ok = not res.error
    except Exception as e:  # a benchmark reports failures, it does not die on them
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    res.e2e = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------- load
def random_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(n)]


async def run_load(args, url: str, model: str, prompts: list[list[int]]) -> tuple[list[Result], float]:
    u = urllib.parse.urlparse(url)

    def payload(p: list[int], max_tokens: int) -> dict:
        return {
            "model": model,
            "prompt": p,
            "max_tokens": max_tokens,
            "temperature": args.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    warm = await stream_completion(u, payload(prompts[0][:16], 4), args.api_key)
    if not warm.ok:
        raise SystemExit(f"warm-up request failed: {warm.error}")
    sem = asyncio.Semaphore(args.concurrency or len(prompts))
    rng = random.Random(args.seed or 0)

    async def one(p: list[int]) -> Result:
        async with sem:
            return await stream_completion(u, payload(p, args.output_len), args.api_key)

    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if args.request_rate:
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def run_inprocess(args, prompts: list[list[int]]) -> tuple[int, float]:
    """The same prompts through services.engine.LLM with the same cap on requests in flight."""
    from services.engine import LLM, SamplingParams

    llm = LLM(model_from_args(args, DEFAULT_MODEL), **engine_kwargs(args))
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    cap = args.concurrency or len(prompts)
    pending = list(enumerate(prompts))
    in_flight, tokens = 0, 0
    t0 = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < cap:
            i, p = pending.pop(0)
            llm.add_request(f"bench-{i}", p, params)
            in_flight += 1
        for out in llm.step():
            if out.finished:
                in_flight -= 1
                tokens += sum(len(o.token_ids) for o in out.outputs)
    return tokens, time.perf_counter() - t0


def engine_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in ENGINE_FIELDS if getattr(args, k, None) is not None}


# ---------------------------------------------------------------------- own server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, root: Path = ROOT, redis_url: str | None = None) -> tuple[subprocess.Popen, str]:
    from shared.cli_args import engine_args_to_argv, engine_config_from_args

    port = _free_port()
    argv = engine_args_to_argv(engine_config_from_args(args, DEFAULT_MODEL))
    cmd = [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *argv]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if redis_url:
        cmd += ["--redis-url", redis_url, "--redis-namespace", f"bench{port}"]
    print(f"starting ({root}):", " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        start_new_session=True,
        stdout=subprocess.DEVNULL if not args.server_log else None,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, args.startup_timeout, "folio serve")
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str) -> None:
    """Until `url`/health answers 200; a SystemExit if the server dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} during startup (try --server-log)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"{name} not healthy after {timeout}s")


def redis_commands(redis_url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}
    finally:
        client.close()


def serve_once(args, prompts, root: Path, redis_url: str | None) -> tuple[dict, dict[str, int]]:
    """Start a server from `root`, run the load, stop it: (report, Redis calls by command)."""
    proc, url = start_server(args, root, redis_url)
    try:
        served = args.served_model or _served_model(url, args.api_key)
        before = redis_commands(redis_url) if redis_url else {}
        cpu0 = gateway_cpu_s(proc)
        results, duration = asyncio.run(run_load(args, url, served, prompts))
        cpu1 = gateway_cpu_s(proc)
        after = redis_commands(redis_url) if redis_url else {}
    finally:
        stop_server(proc)
    calls = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}
    rep = report(results, duration)
    if cpu0 is not None and cpu1 is not None and rep["output_tokens"]:
        rep["gateway_cpu_us_per_token"] = (cpu1 - cpu0) / rep["output_tokens"] * 1e6
    return rep, calls


def gateway_cpu_s(proc: subprocess.Popen) -> float | None:
    """User + system CPU seconds of the `folio gateway` child of a `folio serve` (psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "gateway" in child.cmdline():
            t = child.cpu_times()
            return t.user + t.system
    return None


def _served_model(url: str, api_key: str | None) -> str:
    req = urllib.request.Request(f"{url}/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def print_report(title: str, rep: dict, calls: dict[str, int]) -> None:
    print(f"\n== {title}")
    for k, v in rep.items():
        print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if calls and rep["output_tokens"]:
        per = {k: 1000 * n / rep["output_tokens"] for k, n in sorted(calls.items())}
        print(f"{'redis calls/1k tokens':>22}: " + ", ".join(f"{k} {v:.0f}" for k, v in per.items()))


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------- report
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def report(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    out = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / duration if duration else 0.0,
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "itl_p50_ms": pct(itls, 50) * 1e3,
        "itl_p99_ms": pct(itls, 99) * 1e3,
        "e2e_mean_s": statistics.fmean(r.e2e for r in ok) if ok else float("nan"),
    }
    for r in results:
        if not r.ok:
            print("failed request:", r.error)
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="server base URL (no /v1); default: start a `folio serve` for the run")
    ap.add_argument("--api-key", default=os.environ.get("FOLIO_API_KEY"))
    ap.add_argument("--served-model", help="model name to send (default: the server's /v1/models)")
    ap.add_argument("--concurrency", type=int, default=None, help="max requests in flight")
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument(
        "--compare-inprocess", action="store_true", help="also run services.engine.LLM; print ratio"
    )
    ap.add_argument("--baseline-checkout", metavar="DIR",
                    help="also serve the same prompts from another folio checkout; print ratios")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--server-log", action="store_true", help="show the started server's output")
    ap.add_argument("--json", dest="json_out", help="write the results here as JSON")
    add_engine_args(ap, model_positional=True)
    args = ap.parse_args(argv)
    if not args.concurrency and not args.request_rate:
        args.concurrency = 64

    from services.executor.loader import load_tokenizer, resolve_model

    model = model_from_args(args, DEFAULT_MODEL)
    tok_src = args.tokenizer or resolve_model(model, load_format="dummy", download_dir=args.download_dir).path
    prompts = random_prompts(load_tokenizer(tok_src), args.num_prompts, args.input_len, args.seed or 0)

    mode = f"concurrency {args.concurrency}" if args.concurrency else ""
    if args.request_rate:
        mode += f" rate {args.request_rate}/s"
    shape = f"{args.num_prompts} prompts, in {args.input_len} / out {args.output_len}"
    out: dict = {}
    if args.url:
        served = args.served_model or _served_model(args.url, args.api_key)
        results, duration = asyncio.run(run_load(args, args.url, served, prompts))
        out["server"], calls = report(results, duration), {}
        print_report(f"server ({mode.strip()}, {shape})", out["server"], calls)
    else:
        from shared.redis_server import start_private_redis

        redis_server = start_private_redis()
        try:
            out["server"], calls = serve_once(args, prompts, ROOT, redis_server.url)
            print_report(f"server ({mode.strip()}, {shape})", out["server"], calls)
            out["server"]["redis_calls"] = calls
            if args.baseline_checkout:
                base, base_calls = serve_once(args, prompts, Path(args.baseline_checkout).resolve(),
                                              redis_server.url)
                print_report(f"baseline {args.baseline_checkout} (same prompts)", base, base_calls)
                out["baseline"] = {**base, "redis_calls": base_calls}
                out["itl_p50_ratio"] = out["server"]["itl_p50_ms"] / base["itl_p50_ms"]
                out["throughput_ratio"] = out["server"]["output_tokens_per_s"] / base["output_tokens_per_s"]
                print(f"\nthis / baseline: ITL p50 {out['itl_p50_ratio']:.3f}, "
                      f"output tokens/s {out['throughput_ratio']:.3f}")
        finally:
            redis_server.stop()
    if args.compare_inprocess:
        tokens, secs = run_inprocess(args, prompts)
        tps = tokens / secs
        out["inprocess"] = {"output_tokens": tokens, "duration_s": secs, "output_tokens_per_s": tps}
        out["ratio"] = out["server"]["output_tokens_per_s"] / tps if tps else float("nan")
        print(
            f"\n== in-process engine (same prompts, at most {args.concurrency or args.num_prompts} in flight)"
        )
        print(f"{'output_tokens':>22}: {tokens}\n{'duration_s':>22}: {secs:.2f}")
        print(f"{'output_tokens_per_s':>22}: {tps:.2f}")
        print(f"\nserver / in-process tokens/s: {out['ratio']:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0 if out["server"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
