"""Engine throughput on a GPU: folio vs transformers `generate`, Llama-3-8B shape, dummy weights, bf16.

    python benchmarks/throughput_gpu.py [--batch 64 --input-len 128 --output-len 128] [--tiny]

Both sides get the same 64 prompts of random token ids and generate exactly `output-len`
tokens each (ignore EOS). transformers runs the 64 prompts as one batch (equal lengths, so
no padding), which is its best case; folio runs them through its scheduler and paged KV
cache. Random weights of the real shape cost the same FLOPs and bytes as real ones.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

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


def folio_run(model_dir: str, prompts, output_len: int, dtype: str, backend: str) -> dict:
    from services.engine import LLM, SamplingParams

    llm = LLM(
        model_dir,
        load_format="dummy",
        dtype=dtype,
        skip_tokenizer_init=True,
        attention_backend=backend,
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,  # the warm-up run must not leave cached prefixes
    )
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm up on the whole workload: Triton compiles a kernel variant per new specialization
    # (shapes, divisibility of lengths), which must not land in the timed run.
    llm.generate(prompts, params)
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    secs = time.perf_counter() - start
    n = sum(len(o.token_ids) for o in outs)
    del llm
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"tok_s": n / secs, "secs": secs, "tokens": n}


def hf_run(model_dir: str, prompts, output_len: int, dtype: str, device: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)  # warm up on the whole workload, as for folio
        sync()
        start = time.perf_counter()
        out = model.generate(ids, **kw)
        sync()
        secs = time.perf_counter() - start
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"tok_s": n / secs, "secs": secs, "tokens": n}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", default="triton,torch")
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
        for backend in args.backends.split(","):
            r = folio_run(d, prompts, args.output_len, args.dtype, backend)
            rows.append((f"folio ({backend} attention)", r))
            print(rows[-1], flush=True)
        r = hf_run(d, prompts, args.output_len, args.dtype, device)
        rows.append(("transformers generate (one batch)", r))
        print(rows[-1], flush=True)
    base = rows[-1][1]["tok_s"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"\nEngine throughput, {'tiny' if args.tiny else 'Llama-3-8B-shaped'} dummy model, {args.dtype}, "
        f"batch {args.batch}, {args.input_len} in / {args.output_len} out, {name}"
    )
    print("| engine | output tok/s | seconds | vs transformers |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['tok_s']:.0f} | {r['secs']:.2f} | {r['tok_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
