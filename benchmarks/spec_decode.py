"""Speculative decoding on CPU: the same chat prompts with and without speculation, same run.

    python benchmarks/spec_decode.py                                  # ngram + draft, c=1 and c=16
    python benchmarks/spec_decode.py --methods ngram --concurrency 1 --json spec.json
    python benchmarks/spec_decode.py --methods draft --draft-model PATH --num-speculative-tokens 4
    python benchmarks/spec_decode.py --quick                          # smoke: 2 prompts, 16 tokens

Two prompt sets, rendered with the model's chat template (`LLM.render_chat`):
- **copy**: "rewrite this ~150-word paragraph changing only X" and "edit this ~30-line Python
  function: rename variable Y", made from the paragraphs and functions below (the answer
  mostly repeats the prompt: what n-gram lookup is for);
- **random**: open-ended questions whose answers cannot be looked up in their own text.

Every configuration runs in-process (`services.engine.LLM`): one engine without speculation
(the baseline) and one per method, all loaded up front and run one after another on each
(prompt set, concurrency), so a noisy machine hits them alike. Concurrency c keeps at most
c requests in flight (c=1: one request at a time; c >= prompts: one closed batch, whose wall
time is that of its longest request, so drafts that end other requests early buy nothing;
`--rounds N` queues every prompt N times, so finished requests are replaced as in a server
under steady load, prefix-cache hits alike for every engine). Greedy
(temperature 0), EOS honoured (`--ignore-eos` to always generate --max-tokens). Each engine
has prefix caching on, as by default; all run the same sequence of prompts, so every one
sees the same cache state.

Reported per configuration: output tokens/s (all output tokens / wall time of the run),
speedup against the baseline, acceptance rate (accepted / draft tokens), mean accepted
length (vLLM's: 1 + accepted / drafts, drafts counted per request per step that carried
any) from the scheduler's cumulative counters, and the number of prompts whose greedy
output differs from the baseline's (must be 0: speculation is exact). Exit status 1 on a
mismatch, 2 when a method failed to run.

`--methods draft` drafts with `--draft-model` (default: the target model itself, which
accepts nearly every draft and so measures the verification path, not a real speed-up).
"""

from __future__ import annotations

import os

from shared.openmp import OPENMP_ENV  # folio is installed

os.environ.update({**OPENMP_ENV, **os.environ})  # before torch loads (shared/openmp.py)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DEFAULT_MODEL = "smollm2-135m-instruct"

# ---------------------------------------------------------------------- prompts
PARAGRAPHS = [
    (
        "Every winter the lighthouse keeper Marta climbed the one hundred and twelve steps of the "
        "tower at dusk, carrying a tin of oil and a small notebook. She wrote down the colour of "
        "the sea, the direction of the wind and the names of the fishing boats that passed the "
        "harbour wall before dark. The village of Porto Lento had depended on her light for "
        "thirty years, and in all that time not a single boat had been lost on the rocks below "
        "the cliff. When the council decided to replace the lamp with an automatic beacon, the "
        "fishermen gathered in the square and refused to sail until Marta was allowed to stay. "
        "The mayor, who had learned to swim in the same cold water as their children, gave in "
        "after three days. Marta kept climbing the steps every evening, although the new beacon "
        "no longer needed her, and she went on filling her notebook with the weather and the "
        "boats until the spring she turned eighty."
    ),
    (
        "The train from Vienna to Trieste leaves the main station a little after seven in the "
        "morning and crosses the Semmering pass before most passengers have finished their "
        "coffee. The line was built in the eighteen fifties, when engineers still doubted that a "
        "locomotive could climb such steep gradients, and its viaducts and tunnels are now "
        "protected as a world heritage site. After the pass the valleys widen, the forests give "
        "way to vineyards, and the train follows the river south towards Ljubljana, where it "
        "stops for twenty minutes while the crew changes. The last part of the journey is the "
        "most beautiful: the tracks run along the edge of the Karst plateau and then descend in "
        "long curves towards the Adriatic, so that the sea appears suddenly in the windows on the "
        "right. Travellers who booked a seat on that side usually stop talking at this point and "
        "simply watch the blue water until the train reaches the old harbour station."
    ),
    (
        "Our team moved the billing service from a single large database to three smaller ones "
        "during the second quarter of the year. The old database held customer accounts, invoices "
        "and payment events in the same schema, which meant that a slow report on invoices could "
        "block card payments for several seconds. We split the data by purpose: accounts stayed "
        "in the original cluster, invoices moved to a read-optimised store, and payment events "
        "went to an append-only log that the other two consume. The migration took eleven weeks "
        "instead of the six we had planned, mostly because of old batch jobs that wrote to all "
        "three kinds of table in one transaction. Since the change, the ninety-ninth percentile "
        "latency of a card payment has dropped from four hundred milliseconds to under ninety, "
        "and the monthly invoice run finishes in forty minutes instead of five hours. We plan to "
        "remove the last shared tables before the end of the year."
    ),
]
PARAGRAPH_CHANGES = [
    ["the name Marta to Elena", "the number of steps from one hundred and twelve to ninety-six",
     "the village name Porto Lento to Capo Rosso"],
    ["the city Vienna to Graz", "the departure time from seven to eight in the morning",
     "the word 'coffee' to 'tea'"],
    ["the number of weeks from eleven to thirteen", "the word 'billing' to 'payments'",
     "the latency from ninety to seventy milliseconds"],
]

FUNCTIONS = [
    '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals and return them sorted."""
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        current = merged[-1]
        if start <= current[1]:
            current[1] = max(current[1], end)
        else:
            merged.append([start, end])
    total = 0
    for start, end in merged:
        total += end - start
    longest = None
    for start, end in merged:
        if longest is None or end - start > longest[1] - longest[0]:
            longest = [start, end]
    gaps = []
    for left, right in zip(merged, merged[1:]):
        gaps.append(right[0] - left[1])
    summary = {
        "count": len(merged),
        "covered": total,
        "longest": longest,
        "largest_gap": max(gaps) if gaps else 0,
    }
    print(summary)
    return merged
''',
    '''def word_frequencies(text, stop_words=None, top_n=10):
    """Count the words of a text, skipping stop words; return the top_n (word, count) pairs."""
    stop_words = set(stop_words or [])
    counts = {}
    word = ""
    for char in text.lower():
        if char.isalpha() or char == "'":
            word += char
            continue
        if word and word not in stop_words:
            counts[word] = counts.get(word, 0) + 1
        word = ""
    if word and word not in stop_words:
        counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    result = []
    for word, count in ranked:
        if len(result) == top_n:
            break
        result.append((word, count))
    total = sum(counts.values())
    if total == 0:
        return result
    for index, (word, count) in enumerate(result):
        share = count / total
        result[index] = (word, count)
        if share > 0.5:
            print("dominant word:", word)
    return result
''',
    '''class RateLimiter:
    """Allow at most `limit` calls per `window` seconds for each key (sliding window)."""

    def __init__(self, limit, window):
        self.limit = limit
        self.window = window
        self.calls = {}

    def allow(self, key, now):
        history = self.calls.setdefault(key, [])
        cutoff = now - self.window
        while history and history[0] <= cutoff:
            history.pop(0)
        if len(history) >= self.limit:
            return False
        history.append(now)
        return True

    def remaining(self, key, now):
        history = self.calls.get(key, [])
        cutoff = now - self.window
        recent = [t for t in history if t > cutoff]
        return max(0, self.limit - len(recent))

    def reset(self, key=None):
        if key is None:
            self.calls.clear()
        else:
            self.calls.pop(key, None)
''',
]
RENAMES = [
    [("merged", "result"), ("current", "last"), ("gaps", "spaces")],
    [("counts", "tally"), ("ranked", "ordered"), ("share", "fraction")],
    [("history", "stamps"), ("cutoff", "oldest"), ("recent", "live")],
]

QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "What would cities look like if humans could fly?",
    "Invent a new board game and explain its rules.",
    "Describe an ordinary day in the life of a medieval blacksmith.",
    "Why do you think people enjoy listening to sad music?",
    "Write a poem about the first snowfall in a forest.",
    "Give me five creative ideas for a birthday party for a ten-year-old.",
    "Imagine a conversation between the sun and the moon. What do they talk about?",
    "What advice would you give to someone starting their first job?",
    "Describe a planet where it rains glass, and the creatures that live there.",
    "Write a letter from a cat to its owner complaining about the new dog.",
    "How might schools change in the next fifty years?",
    "Tell me a legend about how the mountains got their snow caps.",
    "Plan a three-day trip to a city you have never heard of, invented by you.",
    "What are some unusual hobbies, and why might someone pick them up?",
    "Write the opening paragraph of a mystery novel set on a train.",
]


def copy_prompts() -> list[str]:
    """Paragraph rewrites and code renames, alternating (2 prompts: one of each)."""
    text = [
        f"Rewrite the following paragraph, changing only {change}. Keep every other word exactly "
        f"the same and reply with the rewritten paragraph only.\n\n{para}"
        for para, changes in zip(PARAGRAPHS, PARAGRAPH_CHANGES, strict=True)
        for change in changes
    ]
    code = [
        f"Edit this code block: rename the variable `{old}` to `{new}`. Change nothing else and "
        f"reply with the full edited code.\n\n```python\n{fn}```"
        for fn, renames in zip(FUNCTIONS, RENAMES, strict=True)
        for old, new in renames
    ]
    return [p for pair in zip(text, code, strict=True) for p in pair]


PROMPT_SETS = {"copy": copy_prompts, "random": lambda: list(QUESTIONS)}


# ---------------------------------------------------------------------- one run
def run(llm, prompts: list[list[int]], params, concurrency: int) -> dict:
    """All prompts with at most `concurrency` in flight: outputs, time, spec counters."""
    before = llm.engine.scheduler.stats().spec_decode
    steps0 = llm.engine.num_steps
    pending = list(enumerate(prompts))
    outputs: dict[int, list[int]] = {}
    in_flight = 0
    t0 = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, p = pending.pop(0)
            llm.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
            in_flight += 1
        for out in llm.step():
            if out.finished:
                in_flight -= 1
                outputs[int(out.request_id.rsplit("-", 1)[1])] = list(out.outputs[0].token_ids)
    seconds = time.perf_counter() - t0
    after = llm.engine.scheduler.stats().spec_decode
    drafts = after.num_drafts - before.num_drafts
    draft_tokens = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    prev = list(before.accepted_tokens_per_pos) + [0] * len(after.accepted_tokens_per_pos)
    per_pos = [a - b for a, b in zip(after.accepted_tokens_per_pos, prev, strict=False)]
    tokens = sum(len(t) for t in outputs.values())
    return {
        "outputs": [outputs[i] for i in range(len(prompts))],
        "output_tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "steps": llm.engine.num_steps - steps0,
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "accepted_tokens_per_pos": per_pos,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else float("nan"),
        "mean_accepted_length": 1 + accepted / drafts if drafts else float("nan"),
    }


def spec_configs(args) -> dict[str, dict]:
    k = args.num_speculative_tokens
    known = {
        "ngram": {"method": "ngram", "num_speculative_tokens": k,
                  "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min},
        "draft": {"model": args.draft_model or args.model, "num_speculative_tokens": k},
    }
    out = {}
    for m in args.methods.split(","):
        if m not in known:
            raise SystemExit(f"--methods: unknown method {m!r} (known: {', '.join(known)})")
        out[m] = known[m]
    return out


def cpu_name() -> str:
    """The CPU model and the flags that decide bf16 speed (DESIGN §7: name them with figures)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    shown = ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "avx2"))
    return f"{name} ({shown})"


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="ngram,draft", help="comma-separated: ngram, draft")
    ap.add_argument("--draft-model", default=None, help="draft model for 'draft' (default: --model)")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16", help="comma-separated caps on requests in flight")
    ap.add_argument("--prompt-sets", default="copy,random", help="comma-separated: copy, random")
    ap.add_argument("--num-prompts", type=int, default=16, help="prompts per set (at most 16)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="each prompt queued this many times")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per method and configuration, alternating; the median is reported")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    ap.add_argument("--kv-cache-space", type=float, default=None, help="GiB of KV cache per engine")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 prompts per set, 16 tokens")
    ap.add_argument("--json", dest="json_out", help="write the results here as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.max_tokens = 2, 16
        args.kv_cache_space = args.kv_cache_space or 0.25
    if args.threads:
        torch.set_num_threads(args.threads)

    from services.engine import LLM, SamplingParams

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    sets = args.prompt_sets.split(",")
    for s in sets:
        if s not in PROMPT_SETS:
            raise SystemExit(f"--prompt-sets: unknown set {s!r} (known: {', '.join(PROMPT_SETS)})")
    configs = spec_configs(args)
    header = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "dtype": args.dtype,
        "prompts_per_set": args.num_prompts,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "speculative_configs": configs,
    }
    print(f"cpu: {header['cpu']}")
    print(
        f"model={args.model} dtype={args.dtype} threads={header['threads']} torch={torch.__version__} "
        f"prompts/set={args.num_prompts} max_tokens={args.max_tokens} ignore_eos={args.ignore_eos} "
        f"concurrency={args.concurrency}",
        flush=True,
    )

    # All engines up front: the baseline renders the chat prompts for everyone.
    engines: dict[str, object] = {}
    errors: dict[str, str] = {}
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    for name, spec in [("none", None), *configs.items()]:
        t0 = time.perf_counter()
        try:
            extra = {"kv_cache_space": args.kv_cache_space} if args.kv_cache_space else {}
            llm = LLM(args.model, dtype=args.dtype, speculative_config=spec, **extra)
            llm.generate(["Say hello, then say hello again."], warm)
        except Exception as e:  # a benchmark reports a broken method and goes on
            if name == "none":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: failed to start: {errors[name]}", flush=True)
            continue
        engines[name] = llm
        shown = json.dumps(spec) if spec else "no speculation"
        print(f"{name}: loaded in {time.perf_counter() - t0:.1f}s ({shown})", flush=True)

    base_llm = engines["none"]
    prompts = {s: [base_llm.render_chat([{"role": "user", "content": p}])
                   for p in PROMPT_SETS[s]()[: args.num_prompts]] * args.rounds for s in sets}
    for s in sets:
        lens = [len(p) for p in prompts[s]]
        print(f"set {s}: {len(lens)} prompts, {min(lens)}-{max(lens)} prompt tokens", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)

    rows: list[dict] = []
    for conc in concurrencies:
        for s in sets:
            # Repeats alternate the methods (none, a, b, none, a, b, ...) so a noisy machine
            # hits them alike; each method's median-speed run is the one reported.
            runs: dict[str, list[dict]] = {"none": [], **{n: [] for n in configs if n not in errors}}
            for _ in range(args.repeats):
                for name in runs:
                    runs[name].append(run(engines[name], prompts[s], params, conc))
            base = _median_run(runs["none"])
            rows.append({"prompt_set": s, "concurrency": conc, "method": "none", **base, "speedup": 1.0,
                         "mismatches": 0, "tok_s_runs": [r["tok_s"] for r in runs["none"]]})
            print(f"{s} c={conc} none: {base['tok_s']:.1f} tok/s ({base['output_tokens']} tok in "
                  f"{base['seconds']:.1f}s, {base['steps']} steps)", flush=True)
            for name in configs:
                if name in errors:
                    rows.append({"prompt_set": s, "concurrency": conc, "method": name, "error": errors[name]})
                    continue
                r = _median_run(runs[name])
                mism = sum(
                    a != b for x in runs[name] for a, b in zip(x["outputs"], base["outputs"], strict=True)
                )
                rows.append({"prompt_set": s, "concurrency": conc, "method": name, **r,
                             "speedup": r["tok_s"] / base["tok_s"], "mismatches": mism,
                             "tok_s_runs": [x["tok_s"] for x in runs[name]]})
                print(f"{s} c={conc} {name}: {r['tok_s']:.1f} tok/s ({r['output_tokens']} tok in "
                      f"{r['seconds']:.1f}s, {r['steps']} steps) speedup {r['tok_s'] / base['tok_s']:.2f}x "
                      f"accept {r['acceptance_rate']:.2f} mean len {r['mean_accepted_length']:.2f} "
                      f"mismatches {mism}", flush=True)

    for llm in engines.values():
        llm.shutdown()  # type: ignore[attr-defined]
    engines.clear()
    gc.collect()

    print(f"\ncpu: {header['cpu']}; {args.model} {args.dtype}, {header['threads']} threads, "
          f"k={args.num_speculative_tokens}, {args.num_prompts} prompts/set, max_tokens {args.max_tokens}\n")
    print("| prompts | concurrency | method | out tok/s | speedup | acceptance | mean accepted len "
          "| drafts | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lead = f"| {r['prompt_set']} | {r['concurrency']} | {r['method']} |"
        if "error" in r:
            print(f"{lead} failed: {r['error'][:120]} | | | | | |")
        elif r["method"] == "none":
            print(f"{lead} {r['tok_s']:.1f} | 1.00x | – | – | – | – |")
        else:
            print(f"{lead} {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r['acceptance_rate']:.2f} | "
                  f"{r['mean_accepted_length']:.2f} | {r['num_drafts']} | {r['mismatches']} |")
    total_mism = sum(r.get("mismatches", 0) for r in rows)
    print(f"\ngreedy outputs differing from no speculation: {total_mism}")

    if args.json_out:
        for r in rows:
            r.pop("outputs", None)
        Path(args.json_out).write_text(json.dumps({**header, "rows": rows}, indent=2))
    if total_mism:
        return 1
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
