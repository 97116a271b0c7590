"""CPU per streamed token of the gateway's incremental detokenizer: DecodeStream vs the window.

Decodes N long streams token by token (interleaved, as the gateway receives them) through
`shared.detokenizer.IncrementalDetokenizer` with SmolLM2's tokenizer, once through
`tokenizers.DecodeStream` (Rust) and once through the Python window re-decode, and prints
the CPU time (process time, best of --repeats) per token. Text: this repo's Markdown docs
plus a multilingual paragraph, cut into streams of --tokens tokens each.

    python benchmarks/detokenize.py --streams 64 --tokens 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from services.executor.loader import load_tokenizer, resolve_model
from shared.detokenizer import IncrementalDetokenizer

ROOT = Path(__file__).resolve().parents[1]
MULTILINGUAL = "Grüße aus Köln 🙂, 日本語のテキスト、中文字符测试, naïve café — «ça va?» 👨‍👩‍👧‍👦 "


def corpus_ids(tok, n_streams: int, n_tokens: int) -> list[list[int]]:
    text = "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))) + MULTILINGUAL * 50
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < n_streams * n_tokens:
        ids = ids + ids
    return [ids[i * n_tokens : (i + 1) * n_tokens] for i in range(n_streams)]


def run(tok, streams: list[list[int]], prompt: list[int], use_stream: bool, stop: list[str]) -> float:
    """CPU seconds to detokenize all streams, one token per add() (as a decode step gives)."""
    dets = [IncrementalDetokenizer(tok, prompt, stop=stop, use_decode_stream=use_stream) for _ in streams]
    assert all(d.uses_decode_stream == use_stream for d in dets)
    t0 = time.process_time()
    for k in range(len(streams[0])):
        for d, ids in zip(dets, streams, strict=True):
            d.add(ids[k : k + 1])
    for d in dets:
        d.flush()
    elapsed = time.process_time() - t0
    full = [tok.decode(ids) for ids in streams]
    if not stop:
        assert [d.text for d in dets] == full, "incremental text differs from a full decode"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer(resolve_model("smollm2-135m-instruct").path)
    streams = corpus_ids(tok, args.streams, args.tokens)
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    n = args.streams * args.tokens
    print(f"{args.streams} streams x {args.tokens} tokens, best of {args.repeats}")
    print("| stop strings | DecodeStream µs/token | Python window µs/token | ratio |")
    print("|---|---|---|---|")
    for stop in ([], ["</answer>", "\n\nUser:"]):
        best = {}
        for use in (True, False):
            best[use] = min(run(tok, streams, prompt, use, stop) for _ in range(args.repeats)) / n * 1e6
        label = ", ".join(repr(s) for s in stop) or "none"
        print(f"| {label} | {best[True]:.1f} | {best[False]:.1f} | {best[False] / best[True]:.2f}x |")


if __name__ == "__main__":
    main()
