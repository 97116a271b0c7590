"""Microbenchmark of the Triton paged-attention kernels against a torch reference.

On CUDA: Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16,
block size 16, randomly scattered blocks. Each kernel is timed with triton.testing.do_bench
(median, L2 flushed between runs) next to the torch reference the CPU backend uses (gather
the blocks, then scaled_dot_product_attention with the GQA group folded into the query axis).
For decode the table also gives the achieved KV-read bandwidth, its share of the GPU's peak,
and `x roofline` = kernel time / (KV bytes / peak bandwidth): 1.0 is the memory bound.

Without CUDA it runs a tiny grid through Triton's interpreter as a smoke test (times are
interpreter times, meaningless as performance).

    python benchmarks/kernels.py            # the table
    python benchmarks/kernels.py --sweep    # plus a launch-config sweep (CUDA only)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.executor.kernels.paged_decode import (  # noqa: E402
    choose_num_splits,
    decode_workspace_numel,
    paged_decode,
)
from services.executor.kernels.paged_prefill import paged_prefill  # noqa: E402
from services.executor.kernels.reshape_and_cache import reshape_and_cache  # noqa: E402

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}  # bytes/s


def peak_bandwidth(device_name: str) -> float | None:
    for key, bw in PEAK_BANDWIDTH.items():
        if key in device_name:
            return bw
    return None


class Paged:
    """A paged KV cache holding `seq_lens` tokens per sequence, blocks in random order."""

    def __init__(self, seq_lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype, device):
        per_seq = [math.ceil(n / block_size) for n in seq_lens]
        num_blocks = sum(per_seq)
        order = torch.randperm(num_blocks, device=device).to(torch.int32)
        self.block_tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32, device=device)
        used = 0
        for s, n in enumerate(per_seq):
            self.block_tables[s, :n] = order[used : used + n]
            used += n
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, dtype=dtype, device=device)
        self.v_cache = torch.randn(shape, dtype=dtype, device=device)
        self.seq_lens_list = list(seq_lens)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.block_size = block_size

    def gather(self, seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, kv_heads, L, d) K and V of the sequences, and the (S, L) valid-key mask."""
        nb = math.ceil(max(self.seq_lens_list[s] for s in seqs) / self.block_size)
        ids = self.block_tables[seqs, :nb].reshape(-1).long()
        s, kvh, d = len(seqs), self.k_cache.shape[2], self.k_cache.shape[3]
        k = self.k_cache.index_select(0, ids).view(s, nb * self.block_size, kvh, d).transpose(1, 2)
        v = self.v_cache.index_select(0, ids).view(s, nb * self.block_size, kvh, d).transpose(1, 2)
        lens = self.seq_lens[seqs]
        valid = torch.arange(nb * self.block_size, device=lens.device)[None, :] < lens[:, None]
        return k, v, valid


def torch_decode(paged: Paged, q: torch.Tensor, scale: float) -> torch.Tensor:
    s, heads, d = q.shape
    k, v, valid = paged.gather(list(range(s)))
    kvh = k.shape[1]
    out = F.scaled_dot_product_attention(
        q.view(s, kvh, heads // kvh, d), k, v, attn_mask=valid[:, None, None, :], scale=scale
    )
    return out.reshape(s, heads, d)


def torch_prefill(paged: Paged, q: torch.Tensor, query_lens: list[int], scale: float) -> torch.Tensor:
    """Equal query lengths only (the benchmark's prefill rows): queries are the last tokens."""
    s, mq, heads, d = len(query_lens), query_lens[0], q.shape[1], q.shape[2]
    k, v, valid = paged.gather(list(range(s)))
    kvh, g = k.shape[1], heads // k.shape[1]
    ctx = paged.seq_lens[:, None, None] - mq
    keys = torch.arange(k.shape[2], device=q.device)[None, None, :]
    rows = torch.arange(mq, device=q.device)[None, :, None]
    mask = (keys <= ctx + rows) & valid[:, None, :]  # (S, mq, L)
    mask = mask[:, None, :, None, :].expand(s, 1, mq, g, k.shape[2]).reshape(s, 1, mq * g, k.shape[2])
    qf = q.view(s, mq, kvh, g, d).transpose(1, 2).reshape(s, kvh, mq * g, d)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
    return out.view(s, kvh, mq, g, d).transpose(1, 2).reshape(s * mq, heads, d)


def bench(fn: Callable[[], object], cuda: bool) -> float:
    """Median seconds per call."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # the interpreter rewrites the kernel on first use
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Table:
    COLS = ("kernel", "shape", "triton us", "torch us", "speedup", "GB/s", "% peak", "x roofline", "max err")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(
        self,
        kernel: str,
        shape: str,
        t_triton: float,
        t_torch: float,
        moved: int | None = None,  # bytes the kernel must move: gives bandwidth and roofline
        peak: float | None = None,
        err: float | None = None,
    ) -> None:
        bw = pct = roof = "-"
        if moved is not None and peak is not None:
            bw = f"{moved / t_triton / 1e9:.0f}"
            pct = f"{100 * moved / t_triton / peak:.0f}"
            roof = f"{t_triton / (moved / peak):.2f}"
        e = "-" if err is None else f"{err:.1e}"
        us = f"{t_triton * 1e6:.1f}", f"{t_torch * 1e6:.1f}", f"{t_torch / t_triton:.2f}x"
        self.rows.append((kernel, shape, *us, bw, pct, roof, e))

    def print(self, title: str) -> None:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.COLS)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(self.COLS, widths, strict=True)))
        for r in self.rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def run_decode(table: Table, shapes, heads, kvh, d, bs, dtype, device, peak, sms) -> None:
    cuda = device.type == "cuda"
    scale = d**-0.5
    for batch, ctx in shapes:
        paged = Paged([ctx] * batch, kvh, d, bs, dtype, device)
        q = torch.randn(batch, heads, d, dtype=dtype, device=device)
        splits = choose_num_splits(batch, kvh, ctx, sms) if cuda else 1
        ws = torch.empty(max(1, decode_workspace_numel(batch, heads, d, splits)), device=device)
        out = torch.empty_like(q)

        def triton_fn(paged=paged, q=q, splits=splits, ws=ws, out=out) -> torch.Tensor:
            bt, sl = paged.block_tables, paged.seq_lens
            return paged_decode(q, paged.k_cache, paged.v_cache, bt, sl, scale, out, splits, ws)

        err = (triton_fn().float() - torch_decode(paged, q, scale).float()).abs().max().item()
        t_tri = bench(triton_fn, cuda)
        t_ref = bench(lambda paged=paged, q=q: torch_decode(paged, q, scale), cuda)
        kv_bytes = 2 * batch * ctx * kvh * d * paged.k_cache.element_size()
        table.add("decode", f"B={batch} ctx={ctx} splits={splits}", t_tri, t_ref, kv_bytes, peak, err)
        del paged


def run_prefill(table: Table, shapes, heads, kvh, d, bs, dtype, device) -> None:
    cuda = device.type == "cuda"
    scale = d**-0.5
    for batch, ctx, qlen in shapes:
        paged = Paged([ctx + qlen] * batch, kvh, d, bs, dtype, device)
        q = torch.randn(batch * qlen, heads, d, dtype=dtype, device=device)
        qsl = torch.arange(0, batch * qlen + 1, qlen, dtype=torch.int32, device=device)
        out = torch.empty_like(q)

        def triton_fn(paged=paged, q=q, qsl=qsl, out=out, qlen=qlen) -> torch.Tensor:
            bt, sl = paged.block_tables, paged.seq_lens
            return paged_prefill(q, paged.k_cache, paged.v_cache, bt, qsl, sl, scale, qlen, out)

        def ref_fn(paged=paged, q=q, qlens=[qlen] * batch) -> torch.Tensor:
            return torch_prefill(paged, q, qlens, scale)

        err = (triton_fn().float() - ref_fn().float()).abs().max().item()
        t_tri, t_ref = bench(triton_fn, cuda), bench(ref_fn, cuda)
        flops = 4 * batch * qlen * (ctx + (qlen + 1) / 2) * heads * d
        shape = f"B={batch} ctx={ctx} q={qlen} {flops / t_tri / 1e12:.0f}TFLOP/s"
        table.add("prefill", shape, t_tri, t_ref, err=err)
        del paged


def run_write(table: Table, tokens: int, kvh: int, d: int, bs: int, dtype, device, peak) -> None:
    cuda = device.type == "cuda"
    num_blocks = math.ceil(tokens / bs) + 1
    k_cache = torch.zeros(num_blocks, bs, kvh, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(tokens, kvh, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * bs, device=device)[:tokens]

    def ref() -> None:
        k_cache.view(-1, kvh, d).index_copy_(0, slots, k)
        v_cache.view(-1, kvh, d).index_copy_(0, slots, v)

    t_tri = bench(lambda: reshape_and_cache(k, v, k_cache, v_cache, slots), cuda)
    t_ref = bench(ref, cuda)
    moved = 2 * 2 * k.numel() * k.element_size()  # read k, v; write them
    table.add("write_kv", f"T={tokens}", t_tri, t_ref, moved, peak)


def run_sweep(heads: int, kvh: int, d: int, bs: int, dtype, device, peak: float | None) -> None:
    """Time alternative launch configs; each is checked against the default config's output."""
    scale = d**-0.5
    print("\nconfig sweep (us; err vs default config)")
    for batch, ctx, splits in ((64, 2048, 1), (256, 1024, 1), (1, 8192, 32)):
        paged = Paged([ctx] * batch, kvh, d, bs, dtype, device)
        q = torch.randn(batch, heads, d, dtype=dtype, device=device)
        ws = torch.empty(max(1, decode_workspace_numel(batch, heads, d, splits)), device=device)
        bt, sl = paged.block_tables, paged.seq_lens
        base = paged_decode(q, paged.k_cache, paged.v_cache, bt, sl, scale, None, splits, ws).float()
        kv_bytes = 2 * batch * ctx * kvh * d * paged.k_cache.element_size()
        name = f"decode B={batch} ctx={ctx} splits={splits}"
        for block_n, warps, stages in (
            (32, 4, 2),
            (64, 4, 2),
            (64, 4, 3),
            (64, 4, 4),
            (128, 4, 2),
            (128, 8, 3),
        ):

            def fn(paged=paged, q=q, bt=bt, sl=sl, ws=ws, cfg=(block_n, warps, stages), splits=splits):
                return paged_decode(q, paged.k_cache, paged.v_cache, bt, sl, scale, None, splits, ws, *cfg)

            try:
                err = (fn().float() - base).abs().max().item()
                t = bench(fn, True)
            except Exception as e:  # a config that does not compile (shared memory) is a result too
                print(f"  {name} n={block_n} w={warps} s={stages}: failed {e!r:.80}")
                continue
            roof = f" x{t / (kv_bytes / peak):.2f} roofline" if peak else ""
            print(f"  {name} n={block_n} w={warps} s={stages}: {t * 1e6:.1f}{roof} err {err:.1e}")
        del paged
    for batch, ctx, qlen in ((1, 0, 4096), (8, 1024, 512)):
        paged = Paged([ctx + qlen] * batch, kvh, d, bs, dtype, device)
        q = torch.randn(batch * qlen, heads, d, dtype=dtype, device=device)
        qsl = torch.arange(0, batch * qlen + 1, qlen, dtype=torch.int32, device=device)
        bt, sl = paged.block_tables, paged.seq_lens
        base = paged_prefill(q, paged.k_cache, paged.v_cache, bt, qsl, sl, scale, qlen).float()
        flops = 4 * batch * qlen * (ctx + (qlen + 1) / 2) * heads * d
        name = f"prefill B={batch} ctx={ctx} q={qlen}"
        for bm, bn, warps, stages in (
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (128, 32, 4, 3),
        ):

            def fn(paged=paged, q=q, bt=bt, sl=sl, qsl=qsl, cfg=(bm, bn, warps, stages), qlen=qlen):
                return paged_prefill(q, paged.k_cache, paged.v_cache, bt, qsl, sl, scale, qlen, None, *cfg)

            try:
                err = (fn().float() - base).abs().max().item()
                t = bench(fn, True)
            except Exception as e:
                print(f"  {name} m={bm} n={bn} w={warps} s={stages}: failed {e!r:.80}")
                continue
            rate = f"{flops / t / 1e12:.0f} TFLOP/s"
            print(f"  {name} m={bm} n={bn} w={warps} s={stages}: {t * 1e6:.1f} ({rate}) err {err:.1e}")
        del paged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs (CUDA)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    table = Table()
    if cuda:
        name = torch.cuda.get_device_name()
        peak = peak_bandwidth(name)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        title = (
            f"{name}, peak {peak / 1e12 if peak else '?'} TB/s, {sms} SMs; Llama-3-8B attention bf16 block 16"
        )
        heads, kvh, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
        decode_shapes = [(1, 128), (1, 1024), (1, 8192), (8, 1024), (8, 8192), (32, 1024), (32, 4096),
                         (64, 2048), (128, 1024), (256, 128), (256, 512), (256, 2048)]  # fmt: skip
        prefill_shapes = [(1, 0, 2048), (4, 0, 1024), (1, 4096, 512), (16, 2048, 128)]
        write_tokens = 8192
    else:
        peak, sms = None, 1
        title = "CPU smoke test (Triton interpreter; times are not performance)"
        heads, kvh, d, bs, dtype = 8, 2, 32, 16, torch.float32
        decode_shapes = [(2, 40)]
        prefill_shapes = [(2, 8, 16)]
        write_tokens = 16
    run_decode(table, decode_shapes, heads, kvh, d, bs, dtype, device, peak, sms)
    run_prefill(table, prefill_shapes, heads, kvh, d, bs, dtype, device)
    run_write(table, write_tokens, kvh, d, bs, dtype, device, peak)
    table.print(title)
    worst = max(float(r[-1]) for r in table.rows if r[-1] != "-")
    if worst > 5e-2:
        raise SystemExit(f"kernel output differs from the torch reference by {worst:.3g}")
    if args.sweep and cuda:
        run_sweep(heads, kvh, d, bs, dtype, device, peak)


if __name__ == "__main__":
    main()
