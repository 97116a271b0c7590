"""Engine throughput on a GPU: folio vs transformers `generate`, Llama-3-8B shape, dummy weights, bf16.

    python benchmarks/throughput_gpu.py [--batch 64 --input-len 128 --output-len 128] [--tiny]

Every engine gets the same 64 prompts of random token ids and generates exactly
`output-len` tokens each (ignore EOS). folio runs them through its scheduler and paged KV
cache: with CUDA graphs for decode steps (the default), and eagerly (--enforce-eager).
transformers runs them two ways: all 64 as one batch (equal lengths, so no padding: its
best case), and one prompt at a time (how `generate` serves requests that arrive apart;
timed on --hf-serial-prompts prompts, since its rate does not depend on how many).
Random weights of the real shape cost the same FLOPs and bytes as real ones.
`--tiny` runs a small shape, for a CPU smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from shared.openmp import OPENMP_ENV  # folio is installed

os.environ.update({**OPENMP_ENV, **os.environ})  # before torch loads (shared/openmp.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)
TINY = dict(
    LLAMA3_8B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def folio_run(
    model_dir: str, prompts, output_len: int, dtype: str, backend: str, eager: bool, fused: bool
) -> dict:
    from services.engine import LLM, SamplingParams

    start = time.perf_counter()
    # Layers read the switch when they are built (services/executor/models/fused_ops.py).
    os.environ["FOLIO_FUSED_KERNELS"] = "1" if fused else "0"
    llm = LLM(
        model_dir,
        load_format="dummy",
        dtype=dtype,
        skip_tokenizer_init=True,
        attention_backend=backend,
        max_model_len=2048,
        enforce_eager=eager,
        enable_prefix_caching=False,  # the warm-up run must not leave cached prefixes
    )
    load_s = time.perf_counter() - start  # includes graph capture
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm up on the whole workload: Triton compiles a kernel variant per new specialization
    # (shapes, divisibility of lengths), which must not land in the timed run.
    llm.generate(prompts, params)
    sync()
    # Time inside the model runner (its sampler syncs with the GPU every step): the rest of
    # a step is the scheduler and the engine's bookkeeping.
    timer = TimedExecute(llm.engine.runner)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    secs = time.perf_counter() - start
    n = sum(len(o.token_ids) for o in outs)
    timer.remove()
    graphs = llm.engine.runner.decode_graphs
    replays = graphs.num_replays if graphs is not None else 0
    replay_ms = None
    if graphs is not None and torch.cuda.is_available():
        replay_ms = replay_time_ms(graphs, len(prompts))
    # Drop every reference to the engine (graphs hold the KV cache too) before the next
    # engine claims its share of GPU memory.
    del llm, graphs
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "tok_s": n / secs,
        "secs": secs,
        "tokens": n,
        "load_s": load_s,
        "graph_replays": replays,
        "runner_s": timer.seconds,
        "replay_ms": replay_ms,
    }


def replay_time_ms(graphs, batch: int, iters: int = 20) -> float:
    """GPU time of one decode forward at this batch: its graph replayed back to back, so no
    host work hides in it. The buffers still hold the last step's inputs, whose sequences
    have finished; their slots get rewritten, which nothing reads again."""
    bs = graphs.padded_size(batch)
    graph = graphs._graphs[bs]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


class TimedExecute:
    """Wraps a model runner's execute to add up the wall time spent inside it."""

    def __init__(self, runner) -> None:
        self.runner, self.inner, self.seconds = runner, runner.execute, 0.0
        runner.execute = self

    def __call__(self, plan):
        start = time.perf_counter()
        try:
            return self.inner(plan)
        finally:
            self.seconds += time.perf_counter() - start

    def remove(self) -> None:
        del self.runner.execute  # back to the class's method
        self.runner = self.inner = None


def hf_run(model_dir: str, prompts, output_len: int, dtype: str, device: str, serial_prompts: int) -> list:
    """[batched result, one-at-a-time result] for transformers generate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)

    def timed(batches: list[list[list[int]]], model=model) -> dict:
        with torch.inference_mode():
            model.generate(torch.tensor(batches[0], device=device), **kw)  # warm up on this shape
            sync()
            start = time.perf_counter()
            n = 0
            for batch in batches:
                ids = torch.tensor(batch, device=device)
                n += (model.generate(ids, **kw).shape[1] - ids.shape[1]) * ids.shape[0]
            sync()
        secs = time.perf_counter() - start
        return {"tok_s": n / secs, "secs": secs, "tokens": n}

    results = [timed([prompts]), timed([[p] for p in prompts[:serial_prompts]])]
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--folio",
        default="triton:graphs,triton:graphs:unfused,triton:eager,torch:eager",
        help="folio configurations, comma-separated: attention backend:graphs|eager[:unfused], "
        "where unfused runs RMSNorm, rotary and silu-and-mul as torch ops, not Triton kernels",
    )
    ap.add_argument("--hf-serial-prompts", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TINY if args.tiny else LLAMA3_8B
    rng = random.Random(0)
    prompts = [
        [rng.randrange(10, cfg["vocab_size"]) for _ in range(args.input_len)] for _ in range(args.batch)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(cfg))
        for spec in args.folio.split(","):
            backend, mode, *rest = spec.split(":")
            fused = rest != ["unfused"]
            eager = mode == "eager"
            r = folio_run(d, prompts, args.output_len, args.dtype, backend, eager=eager, fused=fused)
            label = f"folio ({backend} attention, {'CUDA graphs' if mode == 'graphs' else 'eager'}"
            label += ")" if fused else ", unfused norm/rotary/silu)"
            rows.append((label, r))
            print(rows[-1], flush=True)
        batched, serial = hf_run(d, prompts, args.output_len, args.dtype, device, args.hf_serial_prompts)
        rows.append((f"transformers generate (one batch of {args.batch})", batched))
        rows.append((f"transformers generate (one prompt at a time, {args.hf_serial_prompts} timed)", serial))
        print(rows[-2], rows[-1], sep="\n", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"\nEngine throughput, {'tiny' if args.tiny else 'Llama-3-8B-shaped'} dummy model, {args.dtype}, "
        f"batch {args.batch}, {args.input_len} in / {args.output_len} out, {name}"
    )
    print("| engine | output tok/s | seconds | vs transformers batched | vs transformers one at a time |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(
            f"| {label} | {r['tok_s']:.0f} | {r['secs']:.2f} | {r['tok_s'] / batched['tok_s']:.2f}x "
            f"| {r['tok_s'] / serial['tok_s']:.1f}x |"
        )
    for label, r in rows:
        if "load_s" in r:
            print(
                f"{label}: start-up {r['load_s']:.1f} s; timed run {r['secs']:.2f} s, of which "
                f"{r['runner_s']:.2f} s in the model runner; decode steps from graphs {r['graph_replays']}"
            )
            if r["replay_ms"] is not None:
                print(
                    f"  one decode forward at batch {args.batch}, graph replayed back to back: "
                    f"{r['replay_ms']:.2f} ms GPU; "
                    f"whole run {r['secs'] / args.output_len * 1e3:.2f} ms per step"
                )


if __name__ == "__main__":
    main()
