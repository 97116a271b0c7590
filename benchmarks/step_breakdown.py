"""Where one batch-1 decode step goes: the executor's phases and the operators inside.

    python benchmarks/step_breakdown.py                    # the default engine config
    python benchmarks/step_breakdown.py --dtype float32 --quantization none

Builds one ModelRunner (no scheduler, no Redis), prefills one --input-len prompt, then
runs --steps decode steps through `ModelRunner.execute` exactly as the executor service
does, and reports per step:

- the wall time of execute() (median, and mean under the profiler);
- the executor's phases, from the `folio::*` profiler scopes in model_runner.py
  (plan applied and inputs built, forward, LM head, sampling, finish checks);
- the operators inside, grouped: matmuls (dense and int4), attention (the KV write,
  the block gather, SDPA), the small per-layer ops (norms, rotary, activation, adds,
  views), everything else.

What a token costs through `folio serve` on top of this (the Redis hop to the
scheduler and back, detokenizing, SSE) is the serve ITL from benchmarks/latency.py
minus this step time.
"""

from __future__ import annotations

import os

from shared.openmp import OPENMP_ENV  # folio is installed

os.environ.update({**OPENMP_ENV, **os.environ})  # before torch loads (shared/openmp.py)

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.latency import cpu_name  # noqa: E402
from services.executor.model_runner import ModelRunner  # noqa: E402
from shared.config import EngineConfig  # noqa: E402
from shared.protocol import CachedRequestData, NewRequestData, StepPlan  # noqa: E402
from shared.sampling_params import SamplingParams  # noqa: E402

PHASES = ("folio::prepare", "folio::forward", "folio::logits", "folio::sample", "folio::finish")

MATMUL = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::_weight_int4pack_mm",
          "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "aten::bmm")
ATTENTION = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::index_copy_", "aten::index_select", "aten::_efficient_attention_forward")


def category(op: str) -> str:
    if op in MATMUL:
        return "matmuls"
    if op in ATTENTION:
        return "attention"
    return "small ops"


class OneStream:
    """One request through the runner: a prefill step, then decode steps (blocks from a counter)."""

    def __init__(self, runner: ModelRunner, prompt: list[int]) -> None:
        self.runner = runner
        self.bs = runner.block_size
        self.prompt = prompt
        self.step_id = 0
        self.blocks: list[int] = []
        self.num_computed = 0
        self.output: list[int] = []

    def _new_blocks(self, num_tokens: int) -> list[int]:
        new = []
        while len(self.blocks) * self.bs < num_tokens:
            self.blocks.append(len(self.blocks))
            new.append(self.blocks[-1])
        return new

    def prefill(self) -> None:
        n = len(self.prompt)
        self._new_blocks(n)
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        plan = StepPlan(
            step_id=self.step_id,
            new_requests=[NewRequestData("r", self.prompt, params, list(self.blocks), 0)],
            num_scheduled_tokens={"r": n},
            total_num_scheduled_tokens=n,
        )
        self._run(plan, n)

    def decode(self) -> None:
        new = self._new_blocks(self.num_computed + 1)
        plan = StepPlan(
            step_id=self.step_id,
            cached_requests=[CachedRequestData("r", new, self.num_computed)],
            num_scheduled_tokens={"r": 1},
            total_num_scheduled_tokens=1,
        )
        self._run(plan, 1)

    def _run(self, plan: StepPlan, n: int) -> None:
        result = self.runner.execute(plan)
        self.step_id += 1
        self.num_computed += n
        self.output.extend(result.sampled_token_ids[0])


def breakdown(args) -> dict:
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        num_gpu_blocks_override=64,
        max_model_len=args.input_len + 2 * args.steps + 64,
    )
    runner = ModelRunner(config)
    stream = OneStream(runner, [(7 * i + 11) % 40000 + 100 for i in range(args.input_len)])
    stream.prefill()
    for _ in range(args.warmup):
        stream.decode()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stream.decode()
        times.append(time.perf_counter() - t0)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            stream.decode()
        profiled = (time.perf_counter() - t0) / args.steps
    per_step = 1e3 / args.steps
    phases = {}
    ops: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.key_averages():
        if e.key in PHASES:
            phases[e.key.split("::")[1]] = e.cpu_time_total / 1e3 * per_step / 1e3
        elif e.key.startswith("aten::") or e.key.startswith("folio_ops::"):
            ops[e.key] += e.self_cpu_time_total / 1e3 * per_step / 1e3
            counts[e.key] += e.count
    groups: dict[str, float] = defaultdict(float)
    for op, ms in ops.items():
        groups[category(op)] += ms
    top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
    return {
        "config": {"dtype": str(runner.dtype), "quantization": args.quantization, "model": args.model},
        "step_ms_median": statistics.median(times) * 1e3,
        "step_ms_profiled": profiled * 1e3,
        "phases_ms": phases,
        "op_groups_ms": dict(groups),
        "top_ops": [
            {"op": op, "ms_per_step": ms, "calls_per_step": counts[op] / args.steps} for op, ms in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    out = breakdown(args)
    out["cpu"] = cpu_name()
    out["torch_threads"] = torch.get_num_threads()
    print(f"CPU: {out['cpu']}; {out['torch_threads']} threads; {out['config']}")
    print(f"batch-1 decode step: {out['step_ms_median']:.2f} ms median "
          f"({out['step_ms_profiled']:.2f} ms under the profiler)")
    print("\n| phase | ms/step |\n|---|---|")
    for k, v in out["phases_ms"].items():
        print(f"| {k} | {v:.2f} |")
    print("\n| operators | ms/step (self CPU) |\n|---|---|")
    for k, v in sorted(out["op_groups_ms"].items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} |")
    print("\n| op | ms/step | calls/step |\n|---|---|---|")
    for row in out["top_ops"]:
        print(f"| {row['op']} | {row['ms_per_step']:.3f} | {row['calls_per_step']:.0f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
