"""Structured outputs on CPU: the cost of the grammar, same run, same engine.

    python benchmarks/structured.py                       # 64 requests at concurrency 64
    python benchmarks/structured.py --num-requests 16 --max-tokens 16   # smoke

In-process (`services.engine.LLM`, max_num_seqs = --concurrency), greedy, chat prompts:
1. **Throughput**: the same prompts twice in one closed batch, first unconstrained, then
   each under a JSON schema (an object holding an array of up to 40 short strings, so
   constrained outputs run about as long as free ones); output tokens / wall time of each.
   The ratio constrained / unconstrained is the figure (issue 13's goal: >= 0.9).
2. **Time to first token added by the grammar**: one request with max_tokens=1 (prefill +
   first token), unconstrained, under a schema never seen before (its compilation on the
   critical path, since a lone request's prefill is short), and under the same schema again
   (cached); medians of --ttft-rounds. The first constrained request of a process also pays
   for xgrammar's tokenizer tables; a warm-up request takes that out of the figures.
"""

from __future__ import annotations

import os

from shared.openmp import OPENMP_ENV  # folio is installed

os.environ.update({**OPENMP_ENV, **os.environ})  # before torch loads (shared/openmp.py)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

from services.engine import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

QUESTIONS = [
    "List some fruits.",
    "Name cities you would like to visit.",
    "Give me words that rhyme with cat.",
    "What are common programming languages?",
    "Name some animals that live in the sea.",
    "List colors of the rainbow and more.",
    "What are popular board games?",
    "Name famous scientists.",
]


def schema(tag: str = "items") -> dict:
    return {
        "type": "object",
        "properties": {tag: {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 40}},
        "required": [tag],
    }


def throughput(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / wall, tokens


def first_token_s(llm: LLM, prompt: list[int], spec: StructuredOutputsParams | None) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, structured_outputs=spec))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ttft-rounds", type=int, default=5)
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.concurrency)
    prompts = [
        llm.render_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}])
        for i in range(args.num_requests)
    ]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    bound = SamplingParams(
        temperature=0, max_tokens=args.max_tokens, structured_outputs=StructuredOutputsParams(json=schema())
    )
    first_token_s(llm, prompts[0], StructuredOutputsParams(json=schema("warmup")))  # tokenizer tables
    throughput(llm, prompts[:4], free)  # warm the engine's first steps
    free_tps, free_tokens = throughput(llm, prompts, free)
    bound_tps, bound_tokens = throughput(llm, prompts, bound)
    print(f"concurrency {args.concurrency}, {args.num_requests} requests, max_tokens {args.max_tokens}")
    print(f"unconstrained: {free_tps:7.1f} out tok/s ({free_tokens} tokens)")
    print(
        f"json schema:   {bound_tps:7.1f} out tok/s ({bound_tokens} tokens)  ratio {bound_tps / free_tps:.3f}"
    )

    plain, cold, warm = [], [], []
    for _ in range(args.ttft_rounds):
        plain.append(first_token_s(llm, prompts[1], None))
        spec = StructuredOutputsParams(json=schema(f"k{uuid.uuid4().hex[:8]}"))  # never seen
        cold.append(first_token_s(llm, prompts[1], spec))
        warm.append(first_token_s(llm, prompts[1], spec))
    p, c, w = (statistics.median(x) * 1000 for x in (plain, cold, warm))
    print(f"first token: unconstrained {p:.1f} ms")
    print(f"             new schema    {c:.1f} ms (+{c - p:.1f})")
    print(f"             cached schema {w:.1f} ms (+{w - p:.1f})")


if __name__ == "__main__":
    main()
