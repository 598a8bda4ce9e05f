"""Hybrid sparse attention vs dense causal SDPA: forward+backward time and FLOP ratio.

    PYTHONPATH=. python benchmarks/attention.py [--T 1024 4096] [--batch 1] [--heads 12] [--dim 64] [--reps 5]

For every T and stride l (T/8, the published default, and l ≈ √T) each pattern runs forward +
backward on the same q, k, v and output gradient as dense causal ``F.scaled_dot_product_attention``.
``kernel`` is what ``hsa_attention`` picked (``fused``: the C++ kernel; ``flash``: ATen's fused CPU
flash-attention calls on the band and residue layouts, merged by log-sum-exp; ``fused+flash``: the
band by the C++ kernel, the residues by flash); ``--stock`` adds rows that force the ``flash`` path.
The runs are interleaved (dense, pattern, dense, pattern, ...) and each keeps its fastest repetition,
so background load hits both sides alike. ``speedup`` = dense time / pattern time; ``flop ratio`` =
dense attended keys / pattern attended keys (what a perfect kernel would gain).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from _timing import add_clock_option, best

from mst_compile.ops.attention import hsa_attention, mean_attended_keys
from mst_compile.ops.attention_kernels import choose_attention_kernel, hsa_kernel


def _fwd_bwd(fn, q, k, v, g):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(g)

    return run


def _stock(p: str, l: int):
    def fn(q, k, v):
        return hsa_kernel(q, k, v, local=p != "strided", strided=p != "local", stride=l, scale=None, kernel="flash")

    return fn


def bench(T: int, l: int, batch: int, heads: int, dim: int, reps: int, patterns, stock: bool, clock: str = "wall") -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, T, dim, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(batch, heads, T, dim, generator=gen)
    runs = {"dense": _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, g)}
    kernel = {}
    for p in patterns:
        runs[p] = _fwd_bwd(lambda q, k, v, p=p: hsa_attention(q, k, v, pattern=p, stride=l), q, k, v, g)
        kernel[p] = choose_attention_kernel(q, k, v, local=p != "strided", strided=p != "local", stride=l)
        if stock and kernel[p] != "flash":
            runs[p + " "] = _fwd_bwd(_stock(p, l), q, k, v, g)
            kernel[p + " "] = "flash"
    fastest = best(runs, reps, clock)  # after a warm-up round: allocator, mask caches
    dense_keys = mean_attended_keys("dense", T, l)
    return [
        dict(pattern=p.strip(), kernel=kernel[p], T=T, l=l, ms=fastest[p] * 1e3, dense_ms=fastest["dense"] * 1e3,
             speedup=fastest["dense"] / fastest[p], flop_ratio=dense_keys / mean_attended_keys(p.strip(), T, l))
        for p in kernel
    ]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--stride", type=int, nargs="*", default=None, help="strides to run (default: T/8 and ≈√T)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--patterns", nargs="+", default=["local", "strided", "sparse"])
    ap.add_argument("--stock", action="store_true", help="also time the stock-kernel path where the fused one runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    add_clock_option(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# fwd+bwd, batch {args.batch}, {args.heads} heads x {args.dim}, fp32, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, best of {args.reps} interleaved runs")
    print("| pattern | kernel | T | l | fwd+bwd ms | dense causal SDPA ms | speedup | FLOP ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for T in args.T:
        strides = args.stride or sorted({T // 8, 2 ** round(math.log2(math.sqrt(T)))}, reverse=True)
        for l in strides:
            for r in bench(T, l, args.batch, args.heads, args.dim, args.reps, args.patterns, args.stock, args.clock):
                rows.append(r)
                print(f"| {r['pattern']} | {r['kernel']} | {r['T']} | {r['l']} | {r['ms']:.1f} | {r['dense_ms']:.1f} | "
                      f"{r['speedup']:.2f}x | {r['flop_ratio']:.2f}x |", flush=True)
    return rows


if __name__ == "__main__":
    main()
