"""Offline throughput: folio's in-process engine vs transformers `generate`, same model, same dtype.

    python benchmarks/throughput.py [--num-prompts 64 --input-len 128 --output-len 128]
                                    [--dtypes bfloat16,float32] [--baseline-prompts 8]
    python benchmarks/throughput.py --tensor-parallel-size 2 --dtypes float32

Every prompt is `input-len` random token ids and generates exactly `output-len` tokens
(ignore EOS). folio runs all prompts together (continuous batching); the baseline runs
transformers `generate` one prompt at a time, which is how a plain script serves them.
The baseline's rate is a per-prompt rate, so it is measured on `--baseline-prompts`
prompts (default 8) to keep the run short; its tokens/s does not depend on how many.

With `--tensor-parallel-size N` (N > 1) the baseline is folio itself at TP=1 with this
process's threads (`--threads`, default 2), against TP=N with threads/N per rank, on the
same prompts in the same run; it prints the ratio and the time rank 0 spent inside
collectives (all-reduce, gather, broadcast, including waiting for peers) per step.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

from shared.openmp import OPENMP_ENV  # folio is installed

os.environ.update({**OPENMP_ENV, **os.environ})  # before torch loads (shared/openmp.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def make_prompts(vocab_size: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: SmolLM2 keeps its special tokens there.
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


def run_folio(model: str, dtype: str, prompts: list[list[int]], output_len: int, **engine_args) -> dict:
    from services.engine import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=2))  # warm up
    start = time.perf_counter()
    comm = llm.engine.runner.tp.stats
    comm.reset()
    steps_before = llm.engine.num_steps
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.token_ids) for o in outs)
    assert n_out == len(prompts) * output_len, n_out
    steps = llm.engine.num_steps - steps_before
    info = {
        "tok_s": n_out / elapsed,
        "seconds": elapsed,
        "tokens": n_out,
        "steps": steps,
        "comm_ms_per_step": 1000 * comm.seconds / max(steps, 1),
        "comm_calls_per_step": comm.calls / max(steps, 1),
        "outputs": [o.token_ids for o in outs],
    }
    llm.shutdown()
    del llm
    gc.collect()
    return info


def run_transformers(path: str, dtype: str, prompts: list[list[int]], output_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    gen_kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        n_out = 0
        for p in prompts:
            out = model.generate(torch.tensor([p]), **gen_kw)
            n_out += out.shape[1] - len(p)
        elapsed = time.perf_counter() - start
    del model
    gc.collect()
    return {"tok_s": n_out / elapsed, "seconds": elapsed, "tokens": n_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--baseline-prompts", type=int, default=8)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--kv-cache-space", type=float, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (TP=N: split over ranks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from services.executor.loader import resolve_model

    resolved = resolve_model(args.model, args.load_format)
    prompts = make_prompts(resolved.hf_config.vocab_size, args.num_prompts, args.input_len)
    engine_args = {"load_format": args.load_format, "attention_backend": args.attention_backend}
    if args.kv_cache_space:
        engine_args["kv_cache_space"] = args.kv_cache_space
    if args.max_num_batched_tokens:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens

    print(
        f"model={args.model} prompts={args.num_prompts} in={args.input_len} out={args.output_len} "
        f"threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    if args.tensor_parallel_size > 1:
        compare_tp(args, prompts, engine_args)
        return
    rows = []
    for dtype in args.dtypes.split(","):
        f = run_folio(args.model, dtype, prompts, args.output_len, **engine_args)
        if args.skip_baseline:
            b = {"tok_s": float("nan"), "seconds": float("nan"), "tokens": 0}
        else:
            b = run_transformers(str(resolved.path), dtype, prompts[: args.baseline_prompts], args.output_len)
        rows.append((dtype, f, b))
        print(
            f"{dtype}: folio {f['tok_s']:.1f} tok/s ({f['tokens']} tok in {f['seconds']:.1f}s, "
            f"{f['steps']} steps) | transformers one-at-a-time {b['tok_s']:.1f} tok/s "
            f"({b['tokens']} tok in {b['seconds']:.1f}s) | ratio {f['tok_s'] / b['tok_s']:.2f}x",
            flush=True,
        )

    print("\n| dtype | folio out tok/s | transformers (1 at a time) out tok/s | ratio |")
    print("|---|---|---|---|")
    for dtype, f, b in rows:
        print(f"| {dtype} | {f['tok_s']:.1f} | {b['tok_s']:.1f} | {f['tok_s'] / b['tok_s']:.2f}x |")


def compare_tp(args: argparse.Namespace, prompts: list[list[int]], engine_args: dict) -> None:
    n = args.tensor_parallel_size
    print(f"| dtype | TP=1 out tok/s | TP={n} out tok/s | ratio | TP={n} collectives per step |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        one = run_folio(args.model, dtype, prompts, args.output_len, **engine_args)
        tp = run_folio(args.model, dtype, prompts, args.output_len, tensor_parallel_size=n, **engine_args)
        same = sum(a == b for a, b in zip(one["outputs"], tp["outputs"], strict=True))
        # Dummy weights are drawn per rank, so TP=N runs another model: nothing to compare.
        same_txt = "dummy weights differ per rank" if args.load_format == "dummy" else (
            f"{same}/{len(prompts)} outputs identical to TP=1"
        )
        print(
            f"| {dtype} | {one['tok_s']:.1f} | {tp['tok_s']:.1f} | {tp['tok_s'] / one['tok_s']:.2f}x | "
            f"{tp['comm_ms_per_step']:.1f} ms in {tp['comm_calls_per_step']:.0f} calls "
            f"({tp['steps']} steps; {same_txt}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
